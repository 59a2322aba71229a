"""Which queued requests go to a worker together: pure logic, no sockets, injected time.

A request is batchable when it carries exactly one array (numpy or torch) of at least one
dimension and no keyword arguments; its ``batch_key`` is (kind, dtype, trailing shape) and
its ``rows`` the length of axis 0. A batch is the head of the queue plus later requests with
the same key, in queue order, up to ``max_rows`` rows and ``max_bytes`` bytes (a batch
travels as one message and must fit the link's size limit). The head never waits longer than
``max_wait_s`` for company; with ``max_wait_s == 0`` (the default) a batch is only what is
already queued, so a lone request is dispatched at once. A request with more rows than
``max_rows`` is served alone; requests of other keys keep their place in the queue.
Requests that run alone may still travel together, as a chunk of separate calls, when the
dispatcher has a backlog (``chunk``); a stream (``credit`` not None) always travels alone.
"""

from __future__ import annotations

import collections
import math
from typing import Protocol, Sequence

import numpy as np

from ..ipc.codec import dtype_name

# How far past the head the batcher looks for compatible requests; bounds the work per batch.
SCAN_LIMIT_PER_ROW = 4


class Batchable(Protocol):
    batch_key: tuple | None
    rows: int
    nbytes: int
    enqueued_at: float


def batch_key_of(args: tuple, kwargs: dict) -> tuple[tuple | None, int]:
    """(batch_key, rows) of a request's arguments; (None, 1) when it cannot be batched."""
    if kwargs or len(args) != 1:
        return None, 1
    (value,) = args
    if type(value) is np.ndarray:  # (the usual case, without the string work below)
        shape = value.shape
        return (("numpy", dtype_name(value.dtype), shape[1:]), shape[0]) if shape else (None, 1)
    kind = type(value).__module__.split(".", 1)[0]
    if kind not in ("numpy", "torch") or not hasattr(value, "shape") or len(value.shape) < 1:
        return None, 1
    if kind == "numpy" and type(value).__name__ != "ndarray":
        return None, 1
    if kind == "torch" and type(value).__name__ not in ("Tensor", "Parameter"):
        return None, 1
    dtype = dtype_name(value.dtype) if kind == "numpy" else str(value.dtype)
    return (kind, dtype, tuple(value.shape[1:])), int(value.shape[0])


class Batcher:
    """Takes batches off the head of a deque of Batchable items."""

    def __init__(self, max_rows: int, max_wait_s: float = 0.0, max_bytes: float = math.inf):
        if max_rows < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_rows}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_s * 1000}")
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.max_bytes = max_bytes

    def take(self, queue: collections.deque, now: float,
             chunk: int = 1) -> tuple[list, float | None]:
        """``(batch, None)`` to send now, or ``([], wake_at)`` when the head should wait
        for company until ``wake_at``; ``([], None)`` for an empty queue. A head that runs
        alone comes with up to ``chunk - 1`` more such requests queued right behind it: a
        chunk, run one by one in one worker (see :meth:`together`)."""
        if not queue:
            return [], None
        head = queue[0]
        if self.alone(head):
            taken = [queue.popleft()]
            while len(taken) < chunk and queue and self.alone(queue[0]) and \
                    not _streams(head) and not _streams(queue[0]):
                taken.append(queue.popleft())
            return taken, None
        chosen, rows = self._compatible(queue, head)
        wake_at = head.enqueued_at + self.max_wait_s
        if rows < self.max_rows and now < wake_at:
            return [], wake_at
        batch = [queue[index] for index in chosen]
        for index in reversed(chosen):
            del queue[index]
        return batch, None

    def alone(self, item) -> bool:
        """Runs by itself: unbatchable, as large as a batch, or the pool does not batch."""
        return item.batch_key is None or item.rows >= self.max_rows or self.max_rows == 1

    def together(self, taken: list) -> bool:
        """A batch (one ``predict`` on the rows of all), not a chunk of separate calls."""
        return len(taken) > 1 and not self.alone(taken[0])

    def _compatible(self, queue: Sequence, head) -> tuple[list[int], int]:
        chosen, rows, nbytes = [0], head.rows, head.nbytes
        limit = min(len(queue), 1 + SCAN_LIMIT_PER_ROW * self.max_rows)
        for index in range(1, limit):
            item = queue[index]
            if item.batch_key == head.batch_key and rows + item.rows <= self.max_rows and \
                    nbytes + item.nbytes <= self.max_bytes:
                chosen.append(index)
                rows += item.rows
                nbytes += item.nbytes
                if rows == self.max_rows:
                    break
        return chosen, rows


def _streams(item) -> bool:
    return getattr(item, "credit", None) is not None
