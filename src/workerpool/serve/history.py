"""The last minutes of each model, for the status page's charts: every ``history_interval``
seconds (``[server] history_interval``, default 5) a sample per model of

    requests_total   inference requests answered so far (as workerpool_requests_total)
    rps              requests answered per second over the interval
    p50_ms, p99_ms   their latency (first byte to answer), from the interval's requests
    queued           the pool's queue depth now
    worker_pss       {pid: PSS bytes} of each live worker now (as workerpool_worker_pss_bytes)

kept for the last ``KEEP`` samples (10 minutes at the default interval), in GET /status as
``history``. The requests' latencies are noted as the metrics count them (ServerMetrics
calls :meth:`History.observe`); a sample reads each pool's stats (smaps: in a thread).
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

from ..pool.memory import pss_of

KEEP = 120
MAX_LATENCIES = 10_000  # per model and interval: a uniform sample of them beyond that


class History:
    def __init__(self, registry, interval_s: float = 5.0):
        self.registry = registry
        self.interval_s = interval_s
        self.samples: dict[str, collections.deque] = {}
        self._lock = threading.Lock()  # observe (the loop) vs sample (a thread)
        self._totals: collections.Counter = collections.Counter()
        self._latencies: dict[str, list[float]] = {}
        self._seen: collections.Counter = collections.Counter()  # this interval's requests
        self._last_sampled = time.monotonic()

    def observe(self, model: str, seconds: float) -> None:
        """One answered request of ``model`` and its latency."""
        with self._lock:  # (the totals take this interval's count when it is sampled)
            seen = self._seen[model] = self._seen[model] + 1
            latencies = self._latencies.get(model)
            if latencies is None:
                latencies = self._latencies[model] = []
            if len(latencies) < MAX_LATENCIES:
                latencies.append(seconds)
            else:  # reservoir: every request of the interval equally likely to be kept
                slot = random.randrange(seen)
                if slot < MAX_LATENCIES:
                    latencies[slot] = seconds

    def sample(self) -> None:
        """One sample of every loaded model (blocking: reads the pools' stats)."""
        now = time.monotonic()
        with self._lock:
            elapsed = max(now - self._last_sampled, 1e-9)
            self._last_sampled = now
            seen, self._seen = self._seen, collections.Counter()
            self._totals.update(seen)
            totals = dict(self._totals)
            latencies, self._latencies = self._latencies, {}
        stamp = time.time()
        for model in self.registry.models:
            pool = model.pool
            if pool is None:
                continue
            try:
                # The workers' PSS only, from smaps_rollup: the full accounting would walk
                # the smaps of the server and every process of every model, each sample
                # (~24 ms of this process's CPU per model of 2 workers here).
                stats = pool.stats(memory_usage=False)
            except Exception:  # noqa: BLE001 - closing or broken: no sample this time
                continue
            worker_pss = {str(w["pid"]): pss for w in stats["workers"]
                          if w.get("pid") and (pss := pss_of(w["pid"])) is not None}
            times = sorted(latencies.get(model.name, []))
            self.samples.setdefault(model.name, collections.deque(maxlen=KEEP)).append({
                "time": round(stamp, 3), "requests_total": totals.get(model.name, 0),
                "rps": round(seen.get(model.name, 0) / elapsed, 3),
                "p50_ms": _quantile_ms(times, 0.5), "p99_ms": _quantile_ms(times, 0.99),
                "queued": stats["queued"],
                "worker_pss": worker_pss})

    def report(self) -> dict[str, list[dict]]:
        return {name: list(samples) for name, samples in self.samples.items()}

    async def run(self) -> None:
        """Sample every interval until cancelled (a task of the server's loop)."""
        while True:
            await asyncio.sleep(self.interval_s)
            await asyncio.to_thread(self.sample)


def _quantile_ms(times: list[float], q: float) -> float | None:
    if not times:
        return None
    return round(1000 * times[min(len(times) - 1, int(q * len(times)))], 3)
