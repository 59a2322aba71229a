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
    """Loads in $SLOW_LOAD_S seconds (default 3): long enough to see the server loading."""
    time.sleep(float(os.environ.get("SLOW_LOAD_S", "3")))
    return numbers()


def texts(model, x):
    """BYTES in, BYTES and numbers out: each item upper-cased, and its length."""
    items = [item for row in x for item in row] if x and isinstance(x[0], list) else list(x)
    return {"upper": [item.upper() for item in items],
            "length": np.array([len(item) for item in items], dtype=np.int32)}
