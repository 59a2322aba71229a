"""Triton's standard example models, written as workerpool load/predict functions, for
tests/integration/test_triton.py (served by reference: tests/ is on the server's path).

    simple         INPUT0, INPUT1: INT32 [-1, 16] -> OUTPUT0 = sum, OUTPUT1 = difference
    simple_string  the same on BYTES tensors holding decimal numbers (object arrays of bytes)
    simple_int8    the same on INT8
    repeat_int32   decoupled: IN [n] INT32 (and DELAY [n] UINT32 ms, WAIT [1] UINT32) ->
                   one response per element, OUT [1] and IDX [1]
"""

from __future__ import annotations

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
