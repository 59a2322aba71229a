"""Triton's statistics and model configuration extensions, as every protocol answers them.

    statistics(model)   {"name", "version", "last_inference" (ms since the epoch),
                         "inference_count" (rows), "execution_count" (predict calls),
                         "inference_stats": {success, fail, queue, compute_infer, ...:
                         {"count", "ns"}}, "batch_stats": [{"batch_size", "compute_infer":
                         {"count", "ns"}}]}: success and fail counted by the data plane (each
                         request, from its first byte to its answer), queue and compute
                         time from the pool (its cumulative histograms' counts and sums)
    config(model)       {"name", "platform", "backend", "max_batch_size", "input",
                         "output", "instance_group", "dynamic_batching"}: the pool's
                         settings and the model's signature in Triton's terms
    pool_overrides(c)   what a repository load's config override changes: max_batch_size,
                         instance_group[0].count (workers), dynamic_batching's
                         max_queue_delay_microseconds (max_wait_ms); BadRequest for
                         anything else, or a value of the wrong kind

Triton's max_batch_size excludes the batch axis from ``dims``: a batching pool's inputs are
described without their first (-1) axis, a pool that does not batch reports 0 and the
whole shape. What is not measured here (compute_input, compute_output, cache hits, the time
of each batch size) is 0.
"""

from __future__ import annotations

import threading
import time

from .errors import BadRequest

PLATFORM = "workerpool"
_NOT_MEASURED = ("compute_input", "compute_output", "cache_hit", "cache_miss")


class InferenceStatistics:
    """Successes and failures of one served version, as the data plane saw them."""

    __slots__ = ("lock", "success_count", "success_ns", "fail_count", "fail_ns",
                 "last_inference_ms")

    def __init__(self):
        self.lock = threading.Lock()  # requests end on the loop; relayed ones too
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.last_inference_ms = 0

    def record(self, ok: bool, seconds: float) -> None:
        ns = int(seconds * 1e9)
        with self.lock:
            if ok:
                self.success_count += 1
                self.success_ns += ns
            else:
                self.fail_count += 1
                self.fail_ns += ns
            self.last_inference_ms = int(time.time() * 1000)


def _duration(count: int, ns: int) -> dict:
    return {"count": int(count), "ns": int(ns)}


def statistics(model) -> dict:
    """Triton's statistics of ``model`` (a ServedModel); reads its pool's stats (a round
    trip to the pool's thread: call it off the event loop)."""
    counted = model.statistics
    pool = model.pool
    stats = pool.stats(memory_usage=False) if pool is not None else {}
    queue = stats.get("queue_seconds_histogram", {"count": 0, "sum": 0.0})
    compute = stats.get("compute_seconds_histogram", {"count": 0, "sum": 0.0})
    calls = stats.get("batch_size_histogram", {})
    inference_stats = {
        "success": _duration(counted.success_count, counted.success_ns),
        "fail": _duration(counted.fail_count, counted.fail_ns),
        "queue": _duration(queue["count"], queue["sum"] * 1e9),
        "compute_infer": _duration(compute["count"], compute["sum"] * 1e9),
        **{key: _duration(0, 0) for key in _NOT_MEASURED},
    }
    return {
        "name": model.name, "version": model.version,
        "last_inference": counted.last_inference_ms,
        "inference_count": sum(int(rows) * n for rows, n in calls.items()),
        "execution_count": sum(calls.values()),
        "inference_stats": inference_stats,
        "batch_stats": [{"batch_size": int(rows), "compute_infer": _duration(n, 0),
                         "compute_input": _duration(n, 0), "compute_output": _duration(n, 0)}
                        for rows, n in sorted(calls.items())],
    }


def config(model) -> dict:
    """Triton's model configuration of ``model`` (a ServedModel)."""
    pool = model.pool
    settings = pool.config if pool is not None else None
    batching = settings is not None and settings.batched and settings.max_batch_size > 1
    signature = model.signature

    def tensors(specs) -> list:
        described = []
        for spec in specs or ():
            dims = list(spec.shape)
            if batching and dims[:1] == [-1]:
                dims = dims[1:]
            described.append({"name": spec.name, "data_type": f"TYPE_{_type(spec.datatype)}",
                              "dims": dims})
        return described

    answer = {"name": model.name, "platform": PLATFORM, "backend": "python",
              "max_batch_size": settings.max_batch_size if batching else 0,
              "input": tensors(signature.inputs), "output": tensors(signature.outputs),
              "instance_group": [{"name": model.name, "kind": "KIND_CPU",
                                  "count": settings.workers if settings else 0}]}
    if batching:
        answer["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000)}
    return answer


def _type(datatype: str) -> str:
    return "STRING" if datatype == "BYTES" else datatype  # Triton's name for BYTES


# Triton configuration fields a load may give that say what the model already is (its
# name, its tensors): accepted and left as they are.
_DESCRIPTIVE = {"name", "platform", "backend", "input", "output", "version_policy",
                "parameters"}


def pool_overrides(override: dict) -> dict:
    """The pool options a repository load's Triton config override sets."""
    options = {}
    for key, value in override.items():
        if key == "max_batch_size":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest(f"max_batch_size must be a whole number >= 0, got {value!r}")
            options["max_batch_size"] = max(1, value)
        elif key == "instance_group":
            counts = [group.get("count") for group in value if isinstance(group, dict)] \
                if isinstance(value, list) else [None]
            if len(counts) != 1 or not isinstance(counts[0], int) or counts[0] < 1:
                raise BadRequest("instance_group must be one group with a count >= 1 (the "
                                 f"number of workers), got {value!r}")
            options["workers"] = counts[0]
        elif key == "dynamic_batching":
            delay = value.get("max_queue_delay_microseconds", 0) \
                if isinstance(value, dict) else None
            if not isinstance(delay, (int, float)) or isinstance(delay, bool) or delay < 0:
                raise BadRequest("dynamic_batching must be an object whose "
                                 f"max_queue_delay_microseconds is >= 0, got {value!r}")
            options["max_wait_ms"] = delay / 1000
        elif key not in _DESCRIPTIVE:
            raise BadRequest(f"the config override sets {key!r}, which this server cannot "
                             "change; it takes max_batch_size, instance_group (count) and "
                             "dynamic_batching (max_queue_delay_microseconds)")
    return options
