"""What the dispatcher measures per request: batch sizes, queue and compute times."""

from __future__ import annotations

import collections

import numpy as np

RESERVOIR = 10_000  # latest samples kept for percentiles


class Metrics:
    def __init__(self):
        self.batch_rows = collections.Counter()  # rows per predict call -> calls
        self.queue_s: collections.deque[float] = collections.deque(maxlen=RESERVOIR)
        self.compute_s: collections.deque[float] = collections.deque(maxlen=RESERVOIR)

    def batch(self, rows: int) -> None:
        self.batch_rows[rows] += 1

    def queued(self, seconds: float) -> None:
        self.queue_s.append(seconds)

    def computed(self, seconds: float, requests: int) -> None:
        self.compute_s.extend([seconds] * requests)

    def snapshot(self) -> dict:
        calls = sum(self.batch_rows.values())
        rows = sum(size * n for size, n in self.batch_rows.items())
        return {
            "batch_size_histogram": dict(sorted(self.batch_rows.items())),
            "mean_batch_size": rows / calls if calls else 0.0,
            "queue_ms": _percentiles(self.queue_s),
            "compute_ms": _percentiles(self.compute_s),
        }


def _percentiles(samples) -> dict:
    if not samples:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.fromiter(samples, dtype=float), [50, 99]) * 1000
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
