"""Predict functions the scoring tests run in `workerpool score` processes (by reference)."""

from __future__ import annotations

import os
import time

from workerpool.sources.files import default_predict

MARKER = 1000.0  # a feature-0 value picky_predict refuses


def slow_predict(model, x):
    """The model's own call, after $SCORE_SLEEP_S seconds (long enough to stop a run)."""
    time.sleep(float(os.environ.get("SCORE_SLEEP_S", "0.2")))
    return default_predict(model, x)


def picky_predict(model, x):
    """Raises on any row whose first feature is MARKER."""
    if (x[:, 0] == MARKER).any():
        raise ValueError(f"feature 0 is {MARKER}: out of range")
    return default_predict(model, x)


def rowwise_predict(model, x):
    """default_predict one row at a time: each row's output is the same however the rows
    were batched (math libraries pick kernels by batch size, which moves the low bits)."""
    import numpy as np

    return np.concatenate([default_predict(model, x[i:i + 1]) for i in range(len(x))])
