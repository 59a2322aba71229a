"""The model ``workerpool serve`` serves when given none: a small numpy MLP built from a seed.

No download and no framework: 64 features in, 10 class probabilities and the most likely
label out, about 4.3 MiB of float32 weights (shared by every worker, like any model's).
"""

from __future__ import annotations

import numpy as np

from ..signature import TensorSpec

FEATURES, HIDDEN, CLASSES = 64, 1024, 10
INPUTS = (TensorSpec("features", "FP32", (-1, FEATURES)),)
OUTPUTS = (TensorSpec("probabilities", "FP32", (-1, CLASSES)),
           TensorSpec("label", "INT64", (-1,)))


def load(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def layer(n_in, n_out):
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    return {"w1": layer(FEATURES, HIDDEN), "b1": np.zeros(HIDDEN, np.float32),
            "w2": layer(HIDDEN, HIDDEN), "b2": np.zeros(HIDDEN, np.float32),
            "w3": layer(HIDDEN, CLASSES), "b3": np.zeros(CLASSES, np.float32)}


def predict(model: dict, features: np.ndarray) -> dict:
    hidden = np.maximum(features @ model["w1"] + model["b1"], 0)
    hidden = np.maximum(hidden @ model["w2"] + model["b2"], 0)
    logits = hidden @ model["w3"] + model["b3"]
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return {"probabilities": probabilities.astype(np.float32),
            "label": probabilities.argmax(axis=1).astype(np.int64)}


def example(rows: int = 1, seed: int = 1) -> np.ndarray:
    """Inputs of the right shape (also the warm-up input)."""
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)
