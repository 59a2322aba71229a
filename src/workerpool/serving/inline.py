"""A light model run in the serving process itself: ``inline = true`` (``--inline``).

For a model whose predict takes microseconds (logistic regression, small trees, a tiny
MLP) the server's own cost per request decides its speed, and the hop to a worker process
is most of that cost: measured with bench/light.py (64 -> 10 numpy, JSON, 32 clients),
the server's process spent ~80 us of CPU per request on the hop alone, and a request took
twice gunicorn + FastAPI's time with one client. An inline model is called on the event
loop's thread, where the request was decoded: no queue, no message, no second process.

InlinePool stands where a Pool stands (serve/registry.py, the data plane, metrics, the
status page, hot swaps) with no worker behind it. What inline gives up, by design:
- isolation: a predict that crashes the process takes the server with it, and one that
  runs long holds every other request of the process (the loop waits on it);
- a running call cannot be cut short: a deadline is checked before the call, not during;
- batching and elastic workers: there are no workers (``max_batch_size`` > 1 is refused);
- the lean server: ``load()`` runs here, so the model's framework is imported here.
With ``--http-workers N`` each front end calls its own copy (serve/inline_fronts.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import os
import pickle
import threading
import time
from typing import Any, Callable

from .. import errors, signature
from ..modules import imported, inference_mode
from ..ipc.regions import PlacedCall, RegionTensor
from ..pool import memory
from ..pool.metrics import Metrics
from ..tensors import output_items

# Pool options that shape workers; an inline model has none, so they are not used.
WORKER_OPTIONS = ("workers", "min_workers", "idle_timeout", "start_method",
                  "threads_per_worker", "tf_engine", "preload", "max_message_bytes",
                  "heartbeat_timeout", "max_requests_per_worker", "spare_zygote", "load_in",
                  "max_queue", "max_wait_ms", "numpy_results")

CANNOT_BATCH = ("an inline model is called once per request in the process that serves it, "
                "so it cannot batch: drop max_batch_size, or serve it with workers (inline = "
                "false)")


class InlineSettings:
    """The part of a PoolConfig the server reads, for a model with no workers."""

    workers = 0
    min_workers = 0
    idle_timeout = None
    start_method = "inline"
    max_batch_size = 1
    max_wait_ms = 0.0
    batched = False
    elastic = False

    def __init__(self, timeout: float | None = None):
        self.timeout = timeout


class InlinePool:
    """``predict(model, x)`` called in this process, on the caller's thread, with the
    methods of :class:`workerpool.Pool` a server uses (``submit_async``,
    ``stream_async``, ``submit``, ``reload``, ``stats``, ``close``)."""

    def __init__(self, load: Callable[[], Any], predict: Callable[..., Any], *,
                 inputs=None, outputs=None, warmup=(), timeout: float | None = None,
                 version: str | None = None, max_batch_size: int | None = None,
                 on_call: Callable[[float, int], None] | None = None, **worker_options):
        unknown = set(worker_options) - set(WORKER_OPTIONS) - {"inline"}
        if unknown:
            raise TypeError(f"unexpected options for an inline model: {sorted(unknown)}")
        if max_batch_size not in (None, 1):
            raise errors.ConfigError(CANNOT_BATCH)
        if not callable(predict):
            raise TypeError(f"predict must be a callable predict(model, *args), got {predict!r}")
        self.inputs = signature.specs(inputs)
        self.outputs = signature.specs(outputs)
        self.warmup = list(warmup or ())
        self.config = InlineSettings(timeout)
        self.broken = None
        self._closed = False
        self._reload_lock = threading.Lock()
        self._metrics = Metrics()
        self.on_call = on_call  # (compute seconds, rows) of each call: a front end's tally
        self._load = load
        self._serving = self._loaded(load, predict, version)
        self.generation = 1  # +1 per reload

    # -- loading ---------------------------------------------------------------------
    def _loaded(self, load, predict, version) -> tuple:
        """``(model, predict, version)``: loaded, warmed up, labelled."""
        model = load()
        for sample in self.warmup:
            try:
                _call(predict, model, sample)
            except Exception as exc:
                raise errors.PoolStartError(f"the warm-up call raised {type(exc).__name__}: "
                                            f"{exc}") from exc
        return model, predict, version if version is not None else _content_version(model)

    def reload(self, load=None, *, predict=None, version: str | None = None) -> str:
        """Load (``load``, default the pool's own) and warm the new version, then serve it
        from the next request on; ReloadFailed leaves the old one serving."""
        self._check_open()
        with self._reload_lock:
            load = self._load if load is None else load
            try:
                serving = self._loaded(load, predict or self._serving[1], version)
            except Exception as exc:
                raise errors.ReloadFailed(f"the new version did not load: "
                                          f"{type(exc).__name__}: {exc}") from exc
            self._load, self._serving = load, serving  # one assignment: a call sees either
            self.generation += 1
            return serving[2]

    # -- calls -----------------------------------------------------------------------
    async def submit_async(self, x, timeout: float | None = None, **kwargs):
        """predict's result for ``x``, computed now on this thread."""
        return self.call(x, kwargs)

    def submit(self, x, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        """A future already done: predict's result for ``x``, or its exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(self.call(x, kwargs))
        except Exception as exc:  # noqa: BLE001 - the caller's answer
            future.set_exception(exc)
        return future

    def call(self, x, kwargs: dict | None = None):
        self._check_open()
        model, predict, _ = self._serving
        placed = x if type(x) is PlacedCall else None
        argument = _read_regions(placed.argument if placed is not None else x)
        started = time.perf_counter()
        if imported("torch") is None:  # (no context to enter: ~0.5 us of a light call)
            output = predict(model, argument, **kwargs) if kwargs else predict(model, argument)
        else:
            with inference_mode():
                output = predict(model, argument, **(kwargs or {}))
        self.record(time.perf_counter() - started, _rows(argument))
        if inspect.isgenerator(output):
            output.close()
            raise errors.OutputEncodeError(
                "predict returned a generator: a model that yields is read item by item "
                "(over HTTP: the generate_stream route; over gRPC: ModelStreamInfer)")
        return placed.place(output) if placed is not None else output

    async def stream_async(self, x, timeout: float | None = None, **kwargs):
        """predict's items, for a model that yields (one item for one that returns)."""
        self._check_open()
        model, predict, _ = self._serving
        with inference_mode():
            output = predict(model, _read_regions(x), **kwargs)
        if not inspect.isgenerator(output):
            yield output
            return
        try:
            for item in output:
                yield item
                await asyncio.sleep(0)  # the loop serves others between items
        finally:
            output.close()

    def record(self, compute_s: float, rows: int) -> None:
        """One call's figures (this process's, or a front end's call of its own copy)."""
        self._metrics.computed(compute_s, 1)
        self._metrics.batch(rows)
        if self.on_call is not None:
            self.on_call(compute_s, rows)

    # -- state -----------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._serving[2]

    @property
    def signature(self) -> signature.Signature:
        return signature.Signature()  # what it takes is declared (inputs/outputs) or warmed up

    def is_ready(self) -> bool:
        return not self._closed

    def release_idle_workers(self) -> list:
        return []  # no worker to release: the model lives in the server's process

    def stats(self, memory_usage: bool = True, memory_memo: dict | None = None) -> dict:
        """Pool.stats()'s fields for a model with no workers (``inline``: True)."""
        from ..pool.pool import COUNTERS  # (a front end holding a copy never asks this)

        self._check_open()
        parent = {"pid": os.getpid()}
        stats = {
            "inline": True, "start_method": "inline", "max_workers": 0, "min_workers": 0,
            "idle_timeout": None, "version": self.version, "generation": self.generation,
            "dispatch": "inline", "retiring_versions": [], "model_bytes": 0,
            "file_backed_bytes": 0, "weights_source": "inline", "model_source": None,
            "weight_files": [], "model_buffers": 0, "skeleton_bytes": 0, "workers": [],
            "retiring_workers": [], "retiring_zygotes": [], "spare_zygote": None,
            "parent": parent, "zygote": {"pid": None, "threads_at_boot": None, "pss": 0},
            "queued": 0, **{name: 0 for name in COUNTERS}, **self._metrics.snapshot()}
        if memory_usage:
            memory.add_process_memory(parent, (), memory_memo)
            stats["total_pss"] = parent["pss"]
        return stats

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop answering; the model is dropped. Calls run to their end on the loop, so
        there is nothing in flight to drain."""
        self._closed = True
        self._serving = (None, self._serving[1], self._serving[2])

    def _check_open(self) -> None:
        if self._closed:
            raise errors.PoolClosed("the model is closed")


def _call(predict, model, x):
    with inference_mode():
        output = predict(model, x)
    output_items(output)  # a warm-up's output must be one a request could be answered with
    return output


def _read_regions(argument):
    """``argument`` with tensors in a client's shared memory read (views of its pages)."""
    if type(argument) is RegionTensor:
        return argument.read()
    if isinstance(argument, dict) and any(type(v) is RegionTensor for v in argument.values()):
        return {name: value.read() if type(value) is RegionTensor else value
                for name, value in argument.items()}
    return argument


def _rows(argument) -> int:
    first = next(iter(argument.values()), None) if isinstance(argument, dict) else argument
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 1



def _content_version(model) -> str:
    """A hash of the model's pickle (light models are small), as a Pool hashes its
    weights; a model that does not pickle gets a label no other load has (this process
    and the time)."""
    try:
        data = pickle.dumps(model, protocol=5)
    except Exception:  # noqa: BLE001 - an unpicklable model still serves
        return f"inline-{os.getpid()}-{time.monotonic_ns()}"
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]
