"""Prometheus metrics of a server: per request as they happen, per pool when scraped.

    each inference request ──> requests_total{model, outcome, protocol},
                               request_duration_seconds{model, protocol}
        protocol: kserve_http, kserve_grpc, tfserving_grpc, tfserving_rest
    GET /metrics ──> PoolCollector: pool.stats() of every model, read at scrape time:
        queue/compute duration and batch-size histograms (cumulative, from the pool),
        queue depth, live workers, restarts, per-worker PSS/USS, weights' shared bytes

One registry per server (not prometheus-client's global one), so servers in one process
(tests) never mix their numbers.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

from ..pool.metrics import LATENCY_BUCKETS_S, Histogram
from ..serving.errors import outcome_of
from ..serving.model import ModelState

log = logging.getLogger("workerpool.serve")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    def __init__(self, registry):
        self.models = registry  # the server's Registry (self.registry: Prometheus')
        self.registry = CollectorRegistry()
        self.registry.register(RequestCollector(self))
        self.registry.register(PoolCollector(registry))
        # Counted on the server's loop, read by a scrape (in a thread): plain counts and
        # the pool's histograms, no locks (prometheus-client's Counter and Histogram cost
        # ~1.2 us of a light model's request, their labels() ~10 us more uncached).
        self.counts: dict[tuple[str, str, str], int] = {}  # (model, outcome, protocol)
        self.durations: dict[tuple[str, str], Histogram] = {}  # (model, protocol)
        self.history = None  # serve/history.py's History: the status page's charts

    def observe(self, model: str, outcome: str, seconds: float, protocol: str) -> None:
        key = (model, outcome, protocol)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        histogram = self.durations.get((model, protocol))
        if histogram is None:
            histogram = self.durations[model, protocol] = Histogram(LATENCY_BUCKETS_S)
        histogram.observe(seconds)
        if self.history is not None:
            self.history.observe(model, seconds)

    def finished(self, model: str, protocol: str, error: BaseException | None,
                 seconds: float) -> None:
        """A request that ended (``error`` None: it succeeded; errors.outcome_of names the
        others), counted only for a model this server has (no label per unknown name)."""
        if model in self.models.versions:
            self.observe(model, "success" if error is None else outcome_of(error), seconds,
                         protocol)

    def exposition(self) -> bytes:
        """The text format; reads every pool's stats (call it off the event loop)."""
        return generate_latest(self.registry)


class RequestCollector:
    """The requests a server answered, by model, outcome and protocol, and their durations
    (``ServerMetrics.counts`` and ``durations``)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # (labels come and go with the models served)

    def collect(self):
        requests = CounterMetricFamily("workerpool_requests", "Inference requests by outcome",
                                       labels=["model", "outcome", "protocol"])
        for labels, count in list(self.metrics.counts.items()):  # (one C call: no race)
            requests.add_metric(list(labels), count)
        durations = HistogramMetricFamily(
            "workerpool_request_duration_seconds",
            "Inference requests, from the first byte read to the response, in seconds",
            labels=["model", "protocol"])
        for labels, histogram in list(self.metrics.durations.items()):
            add_histogram(durations, list(labels), histogram.snapshot())
        yield requests
        yield durations


def add_histogram(family, labels: list[str], histogram: dict) -> None:
    """A Histogram.snapshot() as the ``family``'s sample for ``labels``."""
    buckets = [(floatToGoString(bound), count) for bound, count in histogram["buckets"]]
    buckets.append(("+Inf", histogram["count"]))
    family.add_metric(labels, buckets, histogram["sum"])


_MODEL, _WORKER = ["model", "version"], ["model", "version", "pid"]
# (key, kind, metric name, help, labels) of what is read from each pool at scrape time
FAMILIES = (
    ("ready", GaugeMetricFamily, "workerpool_model_ready",
     "1 while the model has live, warmed-up workers", _MODEL),
    ("queued", GaugeMetricFamily, "workerpool_queue_depth", "Requests waiting in the pool",
     _MODEL),
    ("live", GaugeMetricFamily, "workerpool_live_workers", "Workers taking work", _MODEL),
    ("restarts", CounterMetricFamily, "workerpool_worker_restarts",
     "Workers replaced (crashed, hung, recycled)", _MODEL),
    ("crashes", CounterMetricFamily, "workerpool_worker_crashes",
     "Workers that died unasked", _MODEL),
    ("pss", GaugeMetricFamily, "workerpool_worker_pss_bytes",
     "Proportional set size of each worker process", _WORKER),
    ("uss", GaugeMetricFamily, "workerpool_worker_uss_bytes",
     "Memory only this worker process maps (USS)", _WORKER),
    ("private", GaugeMetricFamily, "workerpool_worker_private_bytes",
     "Memory each worker holds alone, shared weights left out (a copy of the model shows "
     "here)", _WORKER),
    ("mapped", GaugeMetricFamily, "workerpool_worker_weights_mapped_bytes",
     "Bytes of the shared weights each worker maps", _WORKER),
    ("total", GaugeMetricFamily, "workerpool_pool_pss_bytes",
     "PSS of the whole pool: parent, zygote and workers", _MODEL),
    ("weights", GaugeMetricFamily, "workerpool_weights_shared_bytes",
     "Bytes of weights every worker shares (one copy)", _MODEL),
    ("saved", GaugeMetricFamily, "workerpool_weights_saved_bytes",
     "Memory the shared weights save against one copy per worker", _MODEL),
    ("queue_s", HistogramMetricFamily, "workerpool_queue_duration_seconds",
     "Time requests waited in the pool", _MODEL),
    ("compute_s", HistogramMetricFamily, "workerpool_compute_duration_seconds",
     "Time predict took per request", _MODEL),
    ("batch", HistogramMetricFamily, "workerpool_batch_size", "Rows per predict call", _MODEL),
)


class PoolCollector:
    """Reads each model version's pool when Prometheus scrapes."""

    def __init__(self, registry):
        self.registry = registry

    def describe(self):
        return []  # the metrics depend on the models loaded; collected fresh every time

    def collect(self):
        families = {key: kind(name, text, labels=labels)
                    for key, kind, name, text, labels in FAMILIES}
        memo: dict = {}  # each process's memory read once per scrape (pool.stats)
        for model in self.registry.models:
            name = [model.name, model.version]
            families["ready"].add_metric(name, 1.0 if model.ready else 0.0)
            pool = model.pool
            if pool is None or model.state != ModelState.LOADED:
                continue
            try:
                stats = pool.stats(memory_memo=memo)
            except Exception as exc:  # noqa: BLE001 - a closing pool: skip it this time
                log.debug("no stats for %s: %s", name, exc)
                continue
            add_pool_stats(families, name, stats)
        yield from families.values()


def add_pool_stats(families: dict, name: list[str], stats: dict) -> None:
    """One model version's pool figures; ``name``: its [model, version] labels."""
    workers = stats["workers"]
    families["queued"].add_metric(name, stats["queued"])
    families["live"].add_metric(name, sum(w["state"] == "ready" for w in workers))
    families["restarts"].add_metric(name, stats["restarts"])
    families["crashes"].add_metric(name, stats["crashes"])
    for worker in workers + stats["retiring_workers"]:  # both versions' during a swap
        families["pss"].add_metric([*name, str(worker["pid"])], worker["pss"])
        for key, field in (("uss", "uss"), ("private", "private"),
                           ("mapped", "weights_mapped")):
            families[key].add_metric([*name, str(worker["pid"])], worker[field])
    families["total"].add_metric(name, stats["total_pss"])
    families["weights"].add_metric(name, stats["model_bytes"])
    families["saved"].add_metric(name, saved_bytes(stats))
    for key, histogram in (("queue_s", stats["queue_seconds_histogram"]),
                           ("compute_s", stats["compute_seconds_histogram"])):
        add_histogram(families[key], name, histogram)
    calls = stats["batch_size_histogram"]  # rows per predict call -> calls
    cumulative = [(floatToGoString(bound), sum(n for size, n in calls.items() if size <= bound))
                  for bound in BATCH_BUCKETS]
    cumulative.append(("+Inf", sum(calls.values())))
    families["batch"].add_metric(name, cumulative, sum(size * n for size, n in calls.items()))


def saved_bytes(stats: dict) -> int:
    """What the workers' shared weights save against a copy each: the weight bytes every
    live worker maps, less the one copy they all map (measured, never assumed)."""
    mapped = [w["weights_mapped"] for w in stats["workers"] if w["state"] != "stopping"]
    return max(0, sum(mapped) - max(mapped, default=0))
