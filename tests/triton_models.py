"""Triton's standard example models, written as workerpool load/predict functions, for
tests/integration/test_triton.py (served by reference: tests/ is on the server's path).

    simple         INPUT0, INPUT1: INT32 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference
    simple_string  the same on BYTES tensors holding decimal numbers (object arrays of bytes)
    simple_int8    the same on INT8
    repeat_int32   decoupled: IN [n] INT32 (and DELAY [n] UINT32 ms, WAIT [1] UINT32) ->
                   one response per element, OUT [1] and IDX [1]

and two for tests/integration/test_shared_memory.py: ``scale`` (FP32 x -> 2x) and
``slow_sum`` (the sum of x, when the test lets it).
"""

from __future__ import annotations

import os
import time

import numpy as np


def load():
    return {"unit": np.ones(1, np.int32)}


def add_sub(model, inputs):
    a, b = inputs["INPUT0"], inputs["INPUT1"]
    return {"OUTPUT0": a + b, "OUTPUT1": a - b}


def add_sub_int8(model, inputs):
    a, b = inputs["INPUT0"].astype(np.int8), inputs["INPUT1"].astype(np.int8)
    return {"OUTPUT0": (a + b).astype(np.int8), "OUTPUT1": (a - b).astype(np.int8)}


def add_sub_strings(model, inputs):
    """Triton's simple_string: numbers as strings in, numbers as strings out; what arrives
    is an object array of bytes, and one goes back."""
    a, b = inputs["INPUT0"], inputs["INPUT1"]
    assert isinstance(a, np.ndarray) and a.dtype == object, type(a)
    ints = np.vectorize(int, otypes=[np.int64])
    x, y = ints(a), ints(b)
    as_bytes = np.vectorize(lambda v: str(v).encode(), otypes=[object])
    return {"OUTPUT0": as_bytes(x + y), "OUTPUT1": as_bytes(x - y)}


def repeat(model, inputs):
    values = np.asarray(inputs["IN"]).reshape(-1)
    delays = np.asarray(inputs["DELAY"]).reshape(-1)
    time.sleep(float(np.asarray(inputs["WAIT"]).reshape(-1)[0]) / 1000)
    for index, (value, delay) in enumerate(zip(values, delays)):
        time.sleep(float(delay) / 1000)
        yield {"OUT": np.array([value], np.int32), "IDX": np.array([index], np.uint32)}


def scale(model, x):
    """One FP32 tensor in, twice it out (the large shared-memory round trip)."""
    return x * np.float32(2)


WAITING_SIZE = 1 << 16


def slow_sum(model, x):
    """The sum of x, once the test lets it: it touches $WP_TEST_SIGNALS/started, then waits
    for $WP_TEST_SIGNALS/go (a request in flight while the test unregisters and unlinks its
    region; the worker mapped the region before predict began)."""
    signals = os.environ.get("WP_TEST_SIGNALS")
    if signals and x.size == WAITING_SIZE:  # (not the server's warm-up call)
        open(os.path.join(signals, "started"), "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(signals, "go")) and time.monotonic() < deadline:
            time.sleep(0.01)
    return np.asarray([x.sum()], dtype=x.dtype)
