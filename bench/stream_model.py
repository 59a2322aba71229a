"""The streaming benchmark's model (bench/streaming.py): a generator with no compute of its
own, so what each server adds per item is what is measured. numpy only: it is imported by
workerpool's workers and by LitServe's (bench/peers/litserve/stream_app.py).

``predict(model, n)`` yields ``n`` items, each the model's 16 float32 weights times the
item's index (a small array, as a token's logits or an embedding would be, much smaller).
"""

from __future__ import annotations

import numpy as np

WIDTH = 16


def load() -> dict:
    return {"w": np.linspace(0.0, 1.0, WIDTH, dtype=np.float32)}


def predict(model: dict, n):
    w = model["w"]
    for i in range(int(np.asarray(n).reshape(-1)[0])):
        yield w * np.float32(i)


def first(model: dict, n):
    """The first item as a plain answer: what a unary call of the same model returns (the
    benchmark's reference for the time to a first item)."""
    return model["w"] * np.float32(0)
