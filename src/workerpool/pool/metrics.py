"""What the dispatcher measures per request: batch sizes, queue and compute times.

Percentiles come from a reservoir of the latest samples; cumulative histograms (Prometheus
style: a count per upper bound, a sum, a count) from every sample since the start, so a
scraper can compute rates and quantiles over any window.
"""

from __future__ import annotations

import bisect
import collections

import numpy as np

RESERVOIR = 10_000  # latest samples kept for percentiles
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Counts of observations at or below each bound, plus their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def absorb(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.sum += other.sum

    def snapshot(self) -> dict:
        cumulative, total = [], 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            cumulative.append([bound, total])
        return {"buckets": cumulative, "count": total + self.counts[-1], "sum": self.sum}


class Metrics:
    def __init__(self):
        self.batch_rows = collections.Counter()  # rows per predict call -> calls
        self.queue_s: collections.deque[float] = collections.deque(maxlen=RESERVOIR)
        self.compute_s: collections.deque[float] = collections.deque(maxlen=RESERVOIR)
        self.queue_histogram = Histogram(LATENCY_BUCKETS_S)
        self.compute_histogram = Histogram(LATENCY_BUCKETS_S)

    def batch(self, rows: int) -> None:
        self.batch_rows[rows] += 1

    def queued(self, seconds: float) -> None:
        self.queue_s.append(seconds)
        self.queue_histogram.observe(seconds)

    def computed(self, seconds: float, requests: int) -> None:
        if requests == 1:
            self.compute_s.append(seconds)
        else:
            self.compute_s.extend([seconds] * requests)
        self.compute_histogram.observe(seconds, requests)

    def copy(self) -> "Metrics":
        return Metrics().absorb(self)

    def absorb(self, other: "Metrics") -> "Metrics":
        """Add ``other``'s observations to these (a retired generation's, say)."""
        self.batch_rows.update(other.batch_rows)
        self.queue_s.extend(other.queue_s)
        self.compute_s.extend(other.compute_s)
        self.queue_histogram.absorb(other.queue_histogram)
        self.compute_histogram.absorb(other.compute_histogram)
        return self

    def snapshot(self) -> dict:
        calls = sum(self.batch_rows.values())
        rows = sum(size * n for size, n in self.batch_rows.items())
        return {
            "batch_size_histogram": dict(sorted(self.batch_rows.items())),
            "mean_batch_size": rows / calls if calls else 0.0,
            "queue_ms": _percentiles(self.queue_s),
            "compute_ms": _percentiles(self.compute_s),
            "queue_seconds_histogram": self.queue_histogram.snapshot(),
            "compute_seconds_histogram": self.compute_histogram.snapshot(),
        }


def _percentiles(samples) -> dict:
    if not samples:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(np.fromiter(samples, dtype=float), [50, 99]) * 1000
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}
