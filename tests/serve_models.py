"""Models the server tests serve, importable by reference in the server's process and its
workers (the server runs with tests/ on its PYTHONPATH)."""

from __future__ import annotations

import os
import time

import numpy as np


def numbers():
    return {"scale": np.arange(4, dtype=np.float32)}


def sleep_then_echo(model, x):
    """Sleeps x[0, 0] seconds, then returns x."""
    time.sleep(float(np.asarray(x).reshape(-1)[0]))
    return x


def fail(model, x):
    raise ValueError("the model refuses this input")


def slow_numbers():
    """Loads in $SLOW_LOAD_S seconds (default 3): long enough to see the server loading.
    With $UNATTACHABLE_ONCE, no new zygote can attach it once that file exists."""
    time.sleep(float(os.environ.get("SLOW_LOAD_S", "3")))
    model = numbers()
    if os.environ.get("UNATTACHABLE_ONCE"):
        model["guard"] = AttachGuard(os.environ["UNATTACHABLE_ONCE"])
    return model


class AttachGuard:
    """Rides along in a model (or is one); unpickled wherever the model is attached (each
    zygote, each spawned worker), where it fails once ``marker`` exists: a pool whose
    zygote or workers die then cannot start others."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (attach_guard, (self.marker,))


def attach_guard(marker: str) -> AttachGuard:
    if os.path.exists(marker):
        raise ImportError(f"cannot attach: {marker} exists")
    return AttachGuard(marker)


def texts(model, x):
    """BYTES in, BYTES and numbers out: each item upper-cased, and its length."""
    items = np.asarray(x, dtype=object).reshape(-1).tolist()
    return {"upper": [item.upper() for item in items],
            "length": np.array([len(item) for item in items], dtype=np.int32)}


def linear():
    """The empty module of the versioned weight files (a builder)."""
    import torch

    return torch.nn.Linear(4, 4)


def save_version(path, version: int) -> None:
    """A state-dict file whose model answers 4 * version for a row of ones, written beside
    ``path`` and renamed over it (how a new model file should be published)."""
    import torch

    model = linear()
    with torch.no_grad():
        model.weight.fill_(float(version))
        model.bias.zero_()
    staged = f"{path}.partial"
    torch.save(model.state_dict(), staged)
    os.replace(staged, path)


def version_of(output) -> int:
    """The version whose weights produced ``output`` (for a row of ones); fails unless the
    output is exactly one version's."""
    output = np.asarray(output)
    version = int(output.reshape(-1)[0]) // 4
    assert np.array_equal(output, np.full(output.shape, 4.0 * version, np.float32)), output
    return version


def echo(model, x):
    return x


def misbehaving_output(model, x):
    """What predict returns, chosen by x's first value: outputs the server cannot send."""
    import threading

    choice = int(np.asarray(x).reshape(-1)[0])
    return {
        1: lambda: None,  # the worker cannot encode it
        2: threading.Lock(),
        3: np.array([object(), 1], dtype=object),
        4: None,  # the server cannot name it
        5: {1: np.zeros(1, np.float32), (2, 3): np.zeros(1, np.float32)},
        6: np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32),  # strict JSON
    }.get(choice, x)


WARM_UP_VALUE = -1.0


def slow_warm_up(model, x):
    """Echoes x; on the warm-up input (WARM_UP_VALUE) first sleeps $WARM_UP_S seconds, then
    leaves a file warm-PID in $WARM_MARKERS: which workers finished their warm-up, when."""
    if float(np.asarray(x).reshape(-1)[0]) == WARM_UP_VALUE:
        time.sleep(float(os.environ.get("WARM_UP_S", "2")))
        with open(os.path.join(os.environ["WARM_MARKERS"], f"warm-{os.getpid()}"), "w"):
            pass
    return x


def scaled_and_total(model, x):
    """Two named outputs: x scaled by 2, and each row's sum."""
    return {"scaled": x * np.float32(2.0), "total": x.sum(axis=-1)}


# -- traced models: what ran in the worker, seen from the test (files in $TRACE_DIR) --------
def _trace(name: str) -> None:
    open(os.path.join(os.environ["TRACE_DIR"], name), "w").close()


def traced_sleep(model, x):
    """Sleeps x[0, 0] seconds, leaving call-<x[0, 1]> in $TRACE_DIR first; returns x."""
    flat = np.asarray(x).reshape(-1)
    _trace(f"call-{int(flat[1])}")
    time.sleep(float(flat[0]))
    return x


def traced_characters(model, inputs):
    """The streaming demo (workerpool.serve.demo_generator), 20 ms a character, leaving
    item-<i> in $TRACE_DIR for each character made and exit-<prompt> on GeneratorExit."""
    from workerpool.serve import demo_generator

    prompt = bytes(np.asarray(inputs["text_input"], dtype=object).reshape(-1)[0]).decode()
    try:
        for i, item in enumerate(demo_generator.predict(model, inputs, delay=0.02)):
            _trace(f"item-{prompt}-{i}")
            yield item
    except GeneratorExit:
        _trace(f"exit-{prompt}")
        raise


def chatty(model, x):
    """Echoes x after printing a line and logging a warning (each tagged with the request
    id that asked: workers/tagged_output.py)."""
    import logging
    import sys

    print(f"chatty predict saw {list(np.asarray(x).shape)}", file=sys.stderr, flush=True)
    logging.getLogger("chatty").warning("chatty logged %s values", np.asarray(x).size)
    return x


def scaled_with_pid(model, x):
    """x scaled by the model's 'scale', and the pid of the process that computed it."""
    return {"y": x * model["scale"], "pid": np.array([os.getpid()], np.int64)}
