"""The public Pool: one shared copy of a model, served by N worker processes.

    Pool(load, predict)
      load() in this process ──publish──> sealed memfd + skeleton (pool/weights.py)
      Supervisor ──spawn──> zygote: attach once ──fork──> workers (pool/supervisor.py)
      Dispatcher thread ── ROUTER ipc://<0700 dir>/pool.sock ──> workers (pool/dispatcher.py)
      submit()/map() encode in the caller's thread and hand a Request to the dispatcher.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import warnings
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from .. import signature
from ..config import PoolConfig, deadline_seconds
from ..errors import PoolBroken, PoolClosed, PoolStartError, QueueFull, WrongProcess
from ..ipc import endpoints
from ..ipc.codec import Codec
from ..sources import files
from . import memory
from .batching import batch_key_of
from .dispatcher import Dispatcher, Request
from .shutdown import Shutdown
from .supervisor import Supervisor
from .weights import publish


class Pool:
    """A pool of worker processes serving one model whose weights exist once, in shared memory.

    ``load()`` runs once, in this process. It may return a torch ``nn.Module``, any object
    graph holding torch tensors and numpy arrays (a dict of modules plus a tokenizer, say),
    or a plain numpy model. Every tensor and array goes into one sealed, read-only memfd;
    workers rebuild the object over it without copying. ``predict(model, *args, **kwargs)``
    runs in a worker (under ``torch.inference_mode()`` when torch is loaded) and returns
    arrays, tensors, numbers, strings, or lists/tuples/dicts of them.

    Args:
        load: called with no arguments; returns the model.
        predict: ``predict(model, *args, **kwargs)``; module-level functions travel by
            reference, functions from ``__main__`` and closures by value (cloudpickle).
        workers: number of worker processes.

    Options (keywords; defaults in :class:`workerpool.config.PoolConfig`):
        start_method: ``"zygote"`` (default: workers are forked from a process that holds
            the attached model; a new worker is ready in milliseconds) or ``"spawn"``
            (each worker is a fresh interpreter attaching the same memfd: for libraries
            where fork is unsafe; costs an import of your framework per worker).
        threads_per_worker: intra-op threads of each worker (default: usable cores //
            workers, at least 1). ``pin_cpus=True`` pins each worker to its own CPUs.
        max_batch_size: rows per ``predict`` call (default 1: no batching). Requests of one
            array each, with the same dtype and trailing shape, are concatenated along
            axis 0; ``predict`` must then return arrays (or tuples/lists/dicts of arrays)
            with the batch on axis 0, which are cut back per request.
        max_wait_ms: how long the oldest queued request may wait for company (default 0:
            batch only what is already queued; a lone request never waits).
        batched: False never merges requests, whatever ``max_batch_size`` says.
        max_queue: requests waiting in this process; past it ``submit`` raises QueueFull
            at once (``map`` never does). Default: unbounded.
        timeout: default deadline of each request, in seconds (``submit(..., timeout=)``
            overrides it). A request still queued at its deadline fails with TaskTimeout
            unsent; a running one fails with TaskTimeout and its worker is replaced.
        max_message_bytes: largest request or result; larger ones raise MessageTooLarge.
        heartbeat_interval, heartbeat_timeout: a worker silent for ``heartbeat_timeout``
            seconds (stuck inside ``predict``, or deadlocked) is aborted (SIGABRT, then
            SIGKILL) and replaced; the request it was running fails with WorkerCrashed
            carrying the stack where it was stuck. None: never.
        max_requests_per_worker, max_requests_jitter: recycle a worker after that many
            requests plus a random 0..jitter, to contain leaks in model code. Its
            replacement starts first; queued work is unaffected.
        start_timeout: seconds to wait for every worker to be ready.
        close_timeout: seconds ``close()`` waits for workers to exit before killing them.
        warmup: inputs to run ``predict(model, x)`` on in every worker before it takes
            work (replacements included), so no request pays first-call costs (page
            faults of the mapping, lazy initialisation). A warm-up that raises is a start
            error naming it.
        inputs, outputs: what the model takes and returns, declared for servers
            (:class:`workerpool.TensorSpec`, or dicts/tuples of name, datatype, shape);
            the pool itself does not check them.

    Inputs passed to ``submit`` are sent without a copy: do not modify them until the
    future is done.
    """

    def __init__(self, load: Callable[[], Any] | str | os.PathLike, predict: Callable[..., Any],
                 workers: int = 2, **options):
        if isinstance(load, (str, os.PathLike)):
            load = files.loader_for(os.fspath(load), options.pop("builder", None),
                                    options.pop("trust_pickle", False))
        if not callable(load):
            raise TypeError(f"load must be a callable or a model path, got {load!r}")
        if not callable(predict):
            raise TypeError(f"predict must be a callable predict(model, *args), got {predict!r}")
        self.inputs = signature.specs(options.pop("inputs", None))
        self.outputs = signature.specs(options.pop("outputs", None))
        self.warmup = list(options.pop("warmup", None) or ())
        self.config = PoolConfig(workers=workers, **options)
        self._ids = itertools.count()
        self._codec = Codec(allow_pickle=True, max_message_bytes=self.config.max_message_bytes,
                            zero_copy_threshold=self.config.zero_copy_threshold)
        self._dispatcher: Dispatcher | None = None
        encoded_warmup = self._codec.encode(self.warmup)
        self._private_dir = private_dir = endpoints.make_private_dir()
        try:
            model = load()
            self._published = publish(model, predict, use_files=not self.config.preload,
                                      options={"tf_engine": self.config.tf_engine,
                                               "private_dir": private_dir})
        except BaseException:
            endpoints.remove_private_dir(private_dir)
            raise
        self._weights_source = _weights_source(model, self.config.start_method,
                                               self._published)
        del model
        endpoint = endpoints.pool_endpoint(private_dir)
        self._supervisor = Supervisor(self.config, self._published, private_dir, endpoint,
                                      encoded_warmup)
        self._shutdown = Shutdown(self.config, self._supervisor, self._published, private_dir)
        try:
            self._supervisor.start_zygote()
            self._dispatcher = Dispatcher(self.config, self._supervisor, endpoint, self._codec,
                                          on_exit=self._shutdown.release)
            self._shutdown.dispatcher = self._dispatcher
            self._dispatcher.start()
            if not self._dispatcher.started.wait(self.config.start_timeout):
                raise PoolStartError(
                    f"workers were not ready within start_timeout={self.config.start_timeout} s")
            if self._dispatcher.start_error is not None:
                raise self._dispatcher.start_error
        except BaseException:
            self._shutdown.close(drain=False)
            raise

    @classmethod
    def from_file(cls, path: str | os.PathLike, predict: Callable[..., Any], *,
                  builder: Callable[[], Any] | None = None, trust_pickle: bool = False,
                  **options) -> "Pool":
        """A pool serving the model at ``path``, without a private copy in this process.

        ``path``: a ``.safetensors`` file or a ``torch.save`` zip checkpoint (a state dict:
        with ``builder``, a zero-argument function returning the empty module, the state is
        assigned into it; built on the ``meta`` device, so nothing is allocated twice), a
        Hugging Face model directory (``predict`` gets ``.model``, ``.tokenizer``,
        ``.config``), a TorchScript archive or ``torch.export`` ``.pt2`` file (loaded in the
        zygote; forked workers share its pages), or a remote URL (``s3://``, ``gs://``,
        ``hdfs://``, ``https://``... through fsspec, fetched once per machine into a
        cache). Whole pickled modules load only with ``trust_pickle=True``: unpickling runs
        code from the file. ``preload=True`` copies the weights into the shared segment
        instead of serving them from the file's pages.
        """
        return cls(files.loader_for(os.fspath(path), builder, trust_pickle), predict, **options)

    # -- work ----------------------------------------------------------------------------
    def submit(self, *args, timeout: float | None = None, **kwargs) -> Future:
        """Run ``predict(model, *args, **kwargs)`` in a worker; returns a Future at once.

        ``timeout`` (seconds) overrides the pool's; it is not passed to ``predict``.
        Raises QueueFull at once when ``max_queue`` requests are waiting.
        """
        return self._submit(args, kwargs, timeout, self.config.max_queue)

    def _submit(self, args: tuple, kwargs: dict, timeout: float | None,
                max_queue: int | None) -> Future:
        self._check_open()
        timeout = self.config.timeout if timeout is None else deadline_seconds(timeout)
        body, frames = self._codec.encode((args, kwargs))
        batch_key, rows = batch_key_of(args, kwargs)
        request = Request(next(self._ids), Future(), body, frames, batch_key=batch_key,
                          rows=rows, timeout=timeout)
        if not self._dispatcher.queue_gauge.try_add(max_queue):
            raise QueueFull(f"{max_queue} requests are already waiting (max_queue); retry "
                            "later, add workers, or raise max_queue")
        try:
            self._dispatcher.submit(request)
        except BaseException:
            self._dispatcher.queue_gauge.remove()
            raise
        return request.future

    def map(self, inputs: Iterable, *, window: int | None = None,
            timeout: float | None = None) -> Iterator:
        """``predict(model, x)`` for each ``x``, yielded in input order.

        At most ``window`` requests are in flight at once (default: enough to keep every
        worker busy and batches full), so an endless generator runs in constant memory; it
        never raises QueueFull. The first error is raised where its result would have been
        yielded.
        """
        window = window or self._default_window()
        timeout = deadline_seconds(timeout)
        in_flight: collections.deque[Future] = collections.deque()
        for x in inputs:
            in_flight.append(self._submit((x,), {}, timeout, None))
            if len(in_flight) >= window:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    async def submit_async(self, *args, timeout: float | None = None, **kwargs):
        """``await``-able :meth:`submit`, answered on the running event loop (no thread)."""
        return await asyncio.wrap_future(self.submit(*args, timeout=timeout, **kwargs))

    async def map_async(self, inputs, *, window: int | None = None,
                        timeout: float | None = None) -> AsyncIterator:
        """``async for y in pool.map_async(xs)``: :meth:`map` for asyncio; ``inputs`` may be
        an iterable or an async iterable."""
        window = window or self._default_window()
        timeout = deadline_seconds(timeout)
        in_flight: collections.deque[asyncio.Future] = collections.deque()
        async for x in _aiter(inputs):
            in_flight.append(asyncio.wrap_future(self._submit((x,), {}, timeout, None)))
            if len(in_flight) >= window:
                yield await in_flight.popleft()
        while in_flight:
            yield await in_flight.popleft()

    def _default_window(self) -> int:
        config = self.config
        return config.workers * config.credits_per_worker * max(config.max_batch_size, 2)

    # -- observation ---------------------------------------------------------------------
    def stats(self, memory_usage: bool = True) -> dict:
        """Per-worker pid, state, requests served, start time, and (``memory_usage``) PSS,
        USS, RSS, shared bytes and the weights' resident/proportional/copied bytes; the
        pool's total PSS (parent + zygote + workers); the published model's size; queue
        depth, batch-size histogram (rows per predict call), p50/p99 queue and compute
        time per request (ms). Counters: restarts, crashes, hung, aborted, timeouts,
        retired, retried_requests, late_replies."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        workers, queued, counters, metrics = self._dispatcher.call(self._dispatcher_snapshot,
                                                                   timeout=30)
        zygote = {"pid": self._supervisor.zygote_pid,
                  "threads_at_boot": self._supervisor.zygote_threads}
        parent = {"pid": os.getpid()}
        stats = {
            "start_method": self.config.start_method,
            "model_bytes": (self._published.weight_bytes + self._published.file_bytes
                            + self._published.region_bytes),
            "file_backed_bytes": self._published.file_bytes,
            "weights_source": self._weights_source,
            "weight_files": list(self._published.file_paths),
            "model_buffers": self._published.n_buffers,
            "skeleton_bytes": len(self._published.skeleton),
            "workers": workers,
            "parent": parent,
            "zygote": zygote,
            "queued": queued,
            **counters,
            **metrics,
        }
        if memory_usage:
            files = tuple(self._published.file_paths)
            for row in (parent, zygote, *workers):
                row.update(memory.process_memory(row["pid"], files))
            stats["total_pss"] = sum(row["pss"] for row in (parent, zygote, *workers))
        return stats

    def _dispatcher_snapshot(self):
        d = self._dispatcher
        rows = [{"worker_id": w.worker_id, "pid": w.pid, "state": w.state,
                 "requests_served": w.served, "in_flight": len(w.inflight),
                 "start_to_ready_ms": None if w.ready_at is None
                 else round((w.ready_at - w.started_at) * 1000, 3)}
                for w in d.workers.values()]
        counters = {name: d.counters[name] for name in (
            "restarts", "crashes", "hung", "aborted", "timeouts", "retired", "retried_requests",
            "late_replies", "rejected_peers", "malformed_messages")}
        return rows, len(d.pending) + len(d.retries), counters, d.metrics.snapshot()

    @property
    def broken(self) -> PoolBroken | None:
        """Why the pool cannot serve any more (its zygote died, workers keep failing to
        start), or None."""
        return self._dispatcher.broken if self._dispatcher is not None else None

    def is_ready(self) -> bool:
        """True while the pool is open, not broken, and at least one worker (attached and
        warmed up) takes work. Cheap: no round trip to the pool's thread."""
        if self._closed or self.broken is not None:
            return False
        return any(w.state == "ready" for w in list(self._dispatcher.workers.values()))

    @property
    def pids(self) -> list[int]:
        """Pids of the current workers (ready or starting)."""
        return [row["pid"] for row in self._dispatcher.call(self._dispatcher_snapshot)[0]
                if row["pid"]]

    @property
    def zygote_pid(self) -> int | None:
        return self._supervisor.zygote_pid

    # -- lifecycle -----------------------------------------------------------------------
    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work, stop every worker, release the weights. Idempotent.

        ``drain=True`` finishes the requests already accepted first (for at most
        ``timeout`` seconds, then as with ``drain=False``); ``drain=False`` fails every
        unanswered request with PoolClosed at once. Either way no worker, socket or
        segment is left when it returns. Safe from any thread: called from a future's
        done-callback (the pool's own thread) it only starts the close, which then
        finishes by itself; interrupted (Ctrl-C), a second call finishes it. In a process
        forked from the pool's owner it does nothing: the pool is not that process's.
        """
        self._shutdown.close(drain, timeout)

    @property
    def _closed(self) -> bool:
        return self._shutdown.requested

    def _check_open(self) -> None:
        if self._shutdown.foreign:
            raise WrongProcess(
                f"this Pool belongs to process {self._shutdown.owner_pid}, and this process "
                f"({os.getpid()}) was forked from it; create a Pool in this process instead")
        if self._shutdown.requested:
            raise PoolClosed("the pool is closed; create a new Pool")
        if self._dispatcher.broken is not None:
            raise self._dispatcher.broken

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        shutdown = getattr(self, "_shutdown", None)
        if shutdown is None or shutdown.requested or shutdown.foreign:
            return
        # Like an unclosed file or Popen: say so, and let the pool's own thread wind it
        # down (drain, stop the workers, release the weights) without blocking here.
        warnings.warn(f"unclosed {self!r}; call close() or use `with Pool(...) as pool:`",
                      ResourceWarning, source=self)
        shutdown.close_soon()

    def __repr__(self) -> str:
        shutdown = getattr(self, "_shutdown", None)
        state = "closed" if shutdown is None or shutdown.requested else "open"
        return (f"<workerpool.Pool {state} workers={self.config.workers} "
                f"start_method={self.config.start_method} "
                f"model_bytes={self._published.weight_bytes}>")


def _weights_source(model, start_method: str, published) -> str:
    """Where the workers' weights live, in words for stats()."""
    if isinstance(model, files.ZygoteLoaded):
        return ("loaded by the zygote, shared copy-on-write by its workers"
                if start_method == "zygote" else "loaded by each worker (a copy per worker)")
    places = [name for name, size in (("shared memfd", published.weight_bytes),
                                      ("mapped weight file", published.file_bytes)) if size]
    return "; ".join([" + ".join(places), *published.notes]).strip("; ") or \
        "none (no arrays in the model)"


async def _aiter(inputs):
    if hasattr(inputs, "__aiter__"):
        async for x in inputs:
            yield x
    else:
        for x in inputs:
            yield x
