"""The models of bench/server_memory.py and bench/load_in.py. This module imports no
framework: load() imports torch or TensorFlow itself, so naming these functions costs a
server nothing."""

from __future__ import annotations

import os

import numpy as np


def size() -> int:
    return int(os.environ.get("WORKERPOOL_BENCH_MIB", "64"))


def torch_mlp():
    from common import build_mlp

    return build_mlp(size())


def keras_mlp():
    from tf_memory import build_keras_mlp

    return build_keras_mlp(size())


def torch_predict(model, x):
    import torch

    return model(torch.from_numpy(x))


def call(model, x):
    return model(x)


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """Both models called in this process, as the server's workers call them."""
    import torch

    from tf_memory import set_tf_threads

    set_tf_threads(1)  # one thread each, as the workers run
    torch.set_num_threads(1)
    with torch.inference_mode():
        torch_out = torch_mlp()(torch.from_numpy(x)).numpy()
    return {"torch_mlp": torch_out, "keras_mlp": np.asarray(keras_mlp()(x, training=False))}


def torch_mlp_counted():
    """``torch_mlp``, noting each call in $WORKERPOOL_BENCH_LOADS: bench/many_models.py
    checks that waking a model from zero workers never loads it again."""
    path = os.environ.get("WORKERPOOL_BENCH_LOADS")
    if path:
        with open(path, "a") as loads:
            loads.write(f"{os.getpid()}\n")
    return torch_mlp()
