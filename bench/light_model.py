"""The light model of bench/light.py: logistic regression, 64 features in, 10 class
probabilities out, numpy only (the first advice for serving on little memory). Its compute
is a few microseconds, so a server's own cost per request decides its speed.

Imported by ``workerpool serve`` (``source = "light_model:load"``) and by the FastAPI app
of bench/peers/light, so both serve the same weights with the same arithmetic.
"""

from __future__ import annotations

import numpy as np

FEATURES, CLASSES = 64, 10


def load(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": (rng.standard_normal((FEATURES, CLASSES)) / 8).astype(np.float32),
            "b": rng.standard_normal(CLASSES).astype(np.float32)}


def predict(model: dict, features: np.ndarray) -> dict:
    logits = features @ model["w"] + model["b"]
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return {"probabilities": probabilities.astype(np.float32)}


def example(rows: int = 1) -> np.ndarray:
    return np.linspace(-1, 1, rows * FEATURES, dtype=np.float32).reshape(rows, FEATURES)
