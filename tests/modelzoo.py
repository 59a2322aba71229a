"""Small real models for the tests, importable by reference from worker processes."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

MIB = 1024 * 1024


def mlp(in_features: int = 32, hidden: int = 128, out_features: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features)).eval()


def mlp_of_size(mib: int, width: int = 1024, seed: int = 0):
    """An MLP of about ``mib`` MiB of fp32 weights (width x width layers)."""
    torch.manual_seed(seed)
    layers = max(1, round(mib * MIB / (width * width * 4)))
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*modules).eval()


def mlp_64mib():
    return mlp_of_size(64)


def transformer(seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                       batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def numpy_model(seed: int = 0):
    """A dict-of-arrays model with non-array state riding along."""
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((32, 64)).astype(np.float32),
        "b1": rng.standard_normal(64).astype(np.float32),
        "w2": rng.standard_normal((64, 4)).astype(np.float64),
        "labels": ["a", "b", "c", "d"],
    }


def numpy_predict(model, x):
    hidden = np.maximum(x @ model["w1"] + model["b1"], 0)
    scores = hidden.astype(np.float64) @ model["w2"]
    return {"scores": scores, "label": [model["labels"][i] for i in scores.argmax(axis=1)]}


def torch_predict(model, x):
    return model(x)


def echo(model, x):
    """``x`` back, as it came."""
    return x


_PINNED: list = []


def heap_churn(model, mib: int) -> int:
    """Allocate ``mib`` MiB of heap in 64 KiB blocks (under glibc's mmap threshold) and free
    all but the last, which stays alive: the freed blocks sit below it, where glibc's own
    trim of the heap's top cannot reach them. Answers how many blocks it freed."""
    blocks = [bytearray(64 * 1024) for _ in range(16 * mib)]
    if blocks:
        _PINNED.append(blocks.pop())
    return len(blocks)


@contextlib.contextmanager
def torch_threads(n: int):
    """Reference outputs are computed with the workers' thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(load, predict, *args):
    with torch_threads(1), torch.inference_mode():
        return predict(load(), *args)


def mlp_64mib_builder():
    """The empty module that a 64 MiB state dict is loaded into."""
    return mlp_of_size(64)


def save_weight_files(directory) -> dict:
    """The 64 MiB MLP as a safetensors file and as a torch.save state-dict checkpoint."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in mlp_of_size(64).state_dict().items()}
    paths = {"safetensors": str(directory / "mlp.safetensors"),
             "checkpoint": str(directory / "mlp.pt")}
    save_file(state, paths["safetensors"])
    torch.save(state, paths["checkpoint"])
    return paths
