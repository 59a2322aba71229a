"""The streaming demo ``workerpool serve`` serves beside the demo MLP: a character-level
text generator whose predict yields one character at a time.

Its "weights" are the letter-to-letter transition probabilities of the paragraph below
(counted at load: nothing is downloaded), a 40 x 40 float32 table shared by its workers
like any model's. Sampling is seeded by the prompt, so the same prompt always continues the
same way (what the tests compare against this module run in-process).

    curl -N -d '{"text_input": "Once upon", "max_tokens": 40}' \\
        http://127.0.0.1:8000/v2/models/textgen/generate_stream
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from ..signature import TensorSpec

CORPUS = (
    "once upon a time there was a small pool of workers that shared one copy of a model. "
    "each worker read the same weights from the same pages of memory, and when one of them "
    "fell over, another was forked in a moment and took its place. the workers answered "
    "questions all day and all night, one token at a time, and nobody loaded the model "
    "twice. when the questions stopped, the workers went to sleep, and the model stayed "
    "where it was, ready for the next question, which woke a worker in a few milliseconds."
)
ALPHABET = "".join(sorted(set(CORPUS)))
INPUTS = (TensorSpec("text_input", "BYTES", (1,)), TensorSpec("max_tokens", "INT32", (1,)))
OUTPUTS = (TensorSpec("text_output", "BYTES", (1,)),)
MAX_TOKENS = 4096


def load() -> dict:
    index = {c: i for i, c in enumerate(ALPHABET)}
    counts = np.ones((len(ALPHABET), len(ALPHABET)), np.float32)  # add-one smoothing
    for a, b in zip(CORPUS, CORPUS[1:]):
        counts[index[a], index[b]] += 1
    probabilities = counts ** 2  # sharper than the counts: a little more like words
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return {"transitions": probabilities,
            "alphabet": np.frombuffer(ALPHABET.encode(), np.uint8).copy()}


def predict(model: dict, inputs: dict, delay: float = 0.0):
    """Yield ``max_tokens`` characters continuing ``text_input``, each as
    ``{"text_output": [char as bytes]}`` (a BYTES tensor of one element). ``delay``:
    seconds per character (a slow model, for tests)."""
    prompt = _first(inputs["text_input"])
    prompt = prompt.decode("utf-8", "replace") if isinstance(prompt, bytes) else str(prompt)
    count = int(_first(inputs["max_tokens"]))
    if not 0 <= count <= MAX_TOKENS:
        raise ValueError(f"max_tokens must be between 0 and {MAX_TOKENS}, got {count}")
    alphabet = model["alphabet"].tobytes().decode()
    transitions = model["transitions"]
    rng = np.random.default_rng(zlib.crc32(prompt.encode()))
    current = alphabet.find(prompt[-1].lower()) if prompt else -1
    if current < 0:
        current = alphabet.find(" ")
    for _ in range(count):
        if delay:
            time.sleep(delay)
        current = int(rng.choice(len(alphabet), p=transitions[current]))
        yield {"text_output": [alphabet[current].encode()]}


def complete(prompt: str, max_tokens: int) -> str:
    """What the model generates for ``prompt``, run here (no pool)."""
    items = predict(load(), {"text_input": [prompt.encode()], "max_tokens": [max_tokens]})
    return "".join(item["text_output"][0].decode() for item in items)


def example() -> dict:
    """An input of the right form (also the warm-up input)."""
    return {"text_input": [b"once"], "max_tokens": np.array([2], np.int32)}


def _first(value):
    return np.asarray(value, dtype=object).reshape(-1)[0]
