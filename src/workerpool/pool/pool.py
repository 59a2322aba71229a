"""The public Pool: one shared copy of a model, served by N worker processes.

    Pool(load, predict)
      load() here (load_in="parent") or in a loader process (load_in="loader",
        pool/loading.py) ──publish──> sealed memfd + weight files + skeleton (publishing/)
      a Generation per version (pool/generation.py): its Supervisor spawns the zygote, which
        attaches once and forks the workers; its Dispatcher thread talks to them over
        ROUTER ipc://<0700 dir>/pool.sock; its Shutdown releases everything
      submit() encodes in the caller's thread and hands a Request to the dispatcher; map()
        keeps a bounded window of submits in flight and yields in input order; stream()
        hands one whose items come back as predict yields them (pool/streams.py); reload()
        starts the next Generation beside the serving one and swaps once it is warm
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import os
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from .. import request_ids, signature
from ..config import PoolConfig, deadline_seconds
from ..errors import PoolBroken, PoolClosed, QueueFull, ReloadFailed, WrongProcess
from ..ipc.codec import Codec
from ..sources import files
from . import memory
from .batching import batch_key_of
from .dispatcher import Request, settle
from .driven_future import DrivenFuture
from .scheduling import MAX_CHUNK
from .generation import Generation, worker_rows
from .loop_answer import LoopAnswer
from .streams import WINDOW as STREAM_WINDOW
from .streams import AsyncStream, Stream
from .metrics import Metrics
from .supervisor import PrestartedZygote


class Pool:
    """A pool of worker processes serving one model whose weights exist once, in shared memory.

    ``load()`` runs once, in this process (or a loader process: ``load_in``). It may
    return a torch ``nn.Module``, any object graph holding torch tensors and numpy arrays
    (a dict of modules plus a tokenizer, say), or a plain numpy model. Every tensor and
    array goes into one sealed, read-only memfd; workers rebuild the object over it
    without copying. ``predict(model, *args, **kwargs)`` runs in a worker (under
    ``torch.inference_mode()`` when torch is loaded) and returns arrays, tensors, numbers,
    strings, or lists/tuples/dicts of them.

    Args:
        load: called with no arguments; returns the model.
        predict: ``predict(model, *args, **kwargs)``; module-level functions travel by
            reference, functions from ``__main__`` and closures by value (cloudpickle).
        workers: number of worker processes (the most, for an elastic pool).
        min_workers, idle_timeout: elastic workers. The pool starts ``min_workers`` (at
            least one), grows toward ``workers`` while requests wait, and stops a worker
            idle for ``idle_timeout`` seconds, down to ``min_workers``; 0 scales to zero:
            the model stays published and the zygote keeps it attached, so the next
            request wakes a worker by a fork (milliseconds), never by a reload. Given
            ``idle_timeout`` alone, ``min_workers`` is 0; ``min_workers`` alone, the idle
            timeout is 60 s. Neither: a fixed pool of ``workers``. See :meth:`resize`.

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
            at once (``map`` never does). Each worker also holds up to 2 tasks beyond it.
            Default: unbounded.
        timeout: default deadline of each request, in seconds from ``submit``, queueing
            included (``submit(..., timeout=)`` overrides it). At its deadline a request
            fails with TaskTimeout (a queued one is never sent); its worker is aborted and
            replaced only once the call itself has run ``timeout`` seconds.
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
        version: a label for this version of the model (default: a content hash of the
            published weights); see :meth:`reload`.
        load_in: ``"parent"``: ``load()`` runs in this process, which keeps the
            framework it imported (and, for Keras, about one copy of the weights);
            ``"loader"``: it runs in a short-lived process that publishes the weights,
            hands over their descriptors and exits, so this process never imports torch
            or TensorFlow. Costs a process start and a framework import per (re)load;
            ``load`` and ``predict`` must pickle (module-level, or cloudpickle-able).
            Default: ``"loader"`` for a TensorFlow model path (SavedModel, ``.keras``),
            else ``"parent"``. Pass ``"loader"`` for a ``load()`` that builds a Keras
            model, or when this process does not import the framework itself.
        numpy_results: torch tensors in results arrive as numpy arrays (bfloat16 as
            float32), so this process need not import torch to read them.
        spare_zygote: keep the next version's zygote started (its framework imported), so
            :meth:`reload` skips that (about 2 s for torch); costs one idle process.
        spin_wait_ms: a caller waiting alone in ``result()`` for a fast call (the latest
            calls' typical compute under half of it) looks for its answer this long before
            it sleeps in poll(), holding a core and the GIL meanwhile: waking a sleeping
            thread cost a quarter of a round trip on our 2-core VM. Default 0.25; 0: never
            (a program whose other threads compute in Python while it waits). Never on one
            usable core.
        runtime: a :class:`workerpool.Runtime` shared with other pools: this pool's zygote
            (each version's) is forked from that one process, which has imported the
            frameworks once, instead of starting a fresh interpreter; N models then cost
            one framework runtime. Workers still serve one model each. Close the pools
            before the runtime.
        inputs, outputs: what the model takes and returns, declared for servers
            (:class:`workerpool.TensorSpec`, or dicts/tuples of name, datatype, shape);
            the pool itself does not check them.

    Inputs passed to ``submit`` are sent without a copy: do not modify them until the
    future is done.
    """

    def __init__(self, load: Callable[[], Any] | str | os.PathLike, predict: Callable[..., Any],
                 workers: int = 2, **options):
        self._builder = options.pop("builder", None)
        self.runtime = options.pop("runtime", None)
        self._trust_pickle = options.pop("trust_pickle", False)
        if options.get("load_in") is None:
            options["load_in"] = default_load_in(load)
        load = self._loader(load)
        if not callable(predict):
            raise TypeError(f"predict must be a callable predict(model, *args), got {predict!r}")
        self.inputs = signature.specs(options.pop("inputs", None))
        self.outputs = signature.specs(options.pop("outputs", None))
        self.warmup = list(options.pop("warmup", None) or ())
        version = _version_label(options.pop("version", None))
        self.config = PoolConfig(workers=workers, **options)
        self._ids = itertools.count()
        self._codec = Codec(allow_pickle=True, max_message_bytes=self.config.max_message_bytes,
                            zero_copy_threshold=self.config.zero_copy_threshold,
                            tensors_as_arrays=self.config.numpy_results)
        self._encoded_warmup = self._codec.encode(self.warmup)
        self._load, self._predict = load, predict
        # submit() reads the serving generation and hands it the request under this lock,
        # so a swap never leaves a request with a generation that has stopped taking work.
        self._swap_lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time
        self._close_requested = False
        # Figures of retired generations, so counters and histograms never go backwards.
        self._history_lock = threading.Lock()
        self._history_counters: collections.Counter = collections.Counter()
        self._history_metrics = Metrics()
        self._retiring: list[Generation] = []
        self._spare: PrestartedZygote | None = None  # the next version's zygote, started
        self._drive_loop: asyncio.AbstractEventLoop | None = None  # see drive_on()
        self._generation = self._start_generation(1, load, predict, version)
        try:
            self._keep_a_spare()
        except BaseException:
            self.close(drain=False)
            raise

    def _loader(self, load) -> Callable[[], Any]:
        if isinstance(load, (str, os.PathLike)):
            load = files.loader_for(os.fspath(load), self._builder, self._trust_pickle)
        if not callable(load):
            raise TypeError(f"load must be a callable or a model path, got {load!r}")
        return load

    def _start_generation(self, number: int, load, predict, version,
                          prestarted: PrestartedZygote | None = None) -> Generation:
        return Generation(number, self.config, self._codec, self._encoded_warmup, load,
                          predict, version, on_exit=_fold_into_history(self),
                          prestarted=prestarted, runtime=self.runtime)

    def _prestart_zygote(self) -> PrestartedZygote:
        """The next version's zygote, importing what the serving one imported."""
        return PrestartedZygote(self._generation.supervisor.zygote_modules)

    def _keep_a_spare(self) -> None:
        # A shared runtime is every version's spare already: its imports are done.
        if self.config.spare_zygote and self._spare is None and not self._closed \
                and self.runtime is None:
            self._spare = self._prestart_zygote()

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
        return cls(os.fspath(path), predict, builder=builder, trust_pickle=trust_pickle,
                   **options)

    # -- work ----------------------------------------------------------------------------
    def submit(self, *args, timeout: float | None = None, **kwargs) -> Future:
        """Run ``predict(model, *args, **kwargs)`` in a worker; returns a Future at once.

        ``timeout`` (seconds) overrides the pool's; it is not passed to ``predict``.
        Raises QueueFull at once when ``max_queue`` requests are waiting.
        """
        return self._submit(args, kwargs, timeout, self.config.max_queue)

    def _submit(self, args: tuple, kwargs: dict, timeout: float | None,
                max_queue: int | None, answer: Future | LoopAnswer | None = None,
                stream=None, direct: bool = True):
        """The request's ``answer`` (a new Future unless given): what its caller waits on;
        with ``stream`` (a Stream's or AsyncStream's sink), a streaming call whose items
        go there. ``direct``: the caller may send it itself when a worker is idle
        (Dispatcher.submit)."""
        self._check_open()
        timeout = self.config.timeout if timeout is None else deadline_seconds(timeout)
        body, frames = self._codec.encode_call(args, kwargs)
        tag = request_ids.current.get()
        if stream is not None:
            request = Request(next(self._ids), stream, body, frames, timeout=timeout,
                              credit=STREAM_WINDOW, tag=tag)
        else:
            batch_key, rows = batch_key_of(args, kwargs)
            request = Request(next(self._ids), answer or DrivenFuture(), body, frames,
                              batch_key=batch_key, rows=rows, timeout=timeout, tag=tag)
        trace = request_ids.timings.get()
        if trace is not None:  # a tracer wants its queue and compute times
            request.trace = trace
            trace["enqueued"] = request.enqueued_at
        with self._swap_lock:
            dispatcher = self._generation.dispatcher
            if stream is not None:
                stream.attach(functools.partial(dispatcher.stream_control, request))
            if not dispatcher.queue_gauge.try_add(max_queue):
                raise QueueFull(f"{max_queue} requests are already waiting (max_queue); "
                                "retry later, add workers, or raise max_queue")
            if type(request.future) is DrivenFuture:
                request.future.dispatcher = dispatcher
            try:
                later = dispatcher.submit(request, direct)
            except BaseException:
                dispatcher.queue_gauge.remove()
                raise
        for future, value, error in later:  # other requests' answers, outside the lock
            settle(future, value, error)
        return request.future

    def stream(self, *args, timeout: float | None = None, **kwargs) -> Stream:
        """Run ``predict(model, *args, **kwargs)`` in a worker and iterate over what it
        yields, item by item, as the worker yields them (``predict`` a generator function,
        or returning an iterator; a plain value is a stream of one item).

        ``timeout`` bounds the whole stream, queueing included. Closing the stream early
        (``break`` and ``close()``, a ``with`` block, or dropping it) stops the generator in
        its worker (GeneratorExit where it yielded) and frees the worker at once. An error
        in ``predict``, the deadline, or a worker that dies mid-stream (WorkerCrashed) is
        raised after the items already delivered; a stream that delivered items is never
        retried. The worker runs ahead of its consumer by at most a window of items.
        """
        stream = Stream()
        self._submit(args, kwargs, timeout, self.config.max_queue, stream=stream.sink)
        return stream

    def stream_async(self, *args, timeout: float | None = None, **kwargs) -> AsyncStream:
        """``async for item in pool.stream_async(...)``: :meth:`stream` answered on the
        running event loop; ``aclose()``, or cancelling the task that iterates, stops the
        generator in its worker."""
        stream = AsyncStream(asyncio.get_running_loop())
        self._submit(args, kwargs, timeout, self.config.max_queue, stream=stream.sink)
        return stream

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
            # A plain Future, posted: map keeps a window in flight, which the pool's
            # thread sends in chunks; a caller sending its own request gains nothing here.
            in_flight.append(self._submit((x,), {}, timeout, None, answer=Future(),
                                          direct=False))
            if len(in_flight) >= window:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    async def submit_async(self, *args, timeout: float | None = None, **kwargs):
        """``await``-able :meth:`submit`, answered on the running event loop (no thread)."""
        dispatcher = self._generation.dispatcher  # (its loop, if we run on it: no getpid())
        loop = dispatcher.loop_here() if dispatcher is not None else None
        answer = LoopAnswer(loop or asyncio.get_running_loop())
        self._submit(args, kwargs, timeout, self.config.max_queue, answer)
        return await answer.future

    def drive_on(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run this pool's dispatch on ``loop``'s thread (None: back on the pool's own).

        For a program whose requests come from one event loop (``workerpool serve``):
        ``submit_async`` there then hands its request over without a thread hop, and the
        answer comes back the same way. Other threads may still submit (their requests
        wake the loop). Close the pool from another thread while the loop runs
        (``await asyncio.to_thread(pool.close)``); a loop that stops for good gives the
        pool back to its thread within half a second. New versions (``reload``) are
        driven by the same loop."""
        self._drive_loop = loop
        with self._history_lock:
            generations = [self._generation, *self._retiring]
        for generation in generations:
            generation.dispatcher.drive_on(loop)

    async def map_async(self, inputs, *, window: int | None = None,
                        timeout: float | None = None) -> AsyncIterator:
        """``async for y in pool.map_async(xs)``: :meth:`map` for asyncio; ``inputs`` may be
        an iterable or an async iterable."""
        window = window or self._default_window()
        timeout = deadline_seconds(timeout)
        in_flight: collections.deque[asyncio.Future] = collections.deque()
        loop = asyncio.get_running_loop()
        async for x in _aiter(inputs):
            in_flight.append(self._submit((x,), {}, timeout, None, LoopAnswer(loop)).future)
            if len(in_flight) >= window:
                yield await in_flight.popleft()
        while in_flight:
            yield await in_flight.popleft()

    def _default_window(self) -> int:
        # Enough for full batches, or for chunks of unbatchable calls (a chunk per credit).
        config = self.config
        return config.workers * config.credits_per_worker * max(config.max_batch_size,
                                                                MAX_CHUNK)

    # -- observation ---------------------------------------------------------------------
    def stats(self, memory_usage: bool = True, memory_memo: dict | None = None) -> dict:
        """Per-worker pid, state, requests served, start time, and (``memory_usage``) PSS,
        USS, RSS, shared bytes, the weights' resident/proportional/copied bytes, and what
        is really shared: ``weights_mapped`` (bytes of the published weights this process
        reads from the shared mappings) against ``private`` (bytes it alone holds, weights
        it only happens to be the sole mapper of left out: a private copy of the model shows
        here); the
        pool's total PSS (parent + zygotes + workers, a retiring version's and the spare
        zygote included); the published model's size and ``model_source`` (for a SavedModel
        directory: the ``path`` served and its ``version`` number when it came from a base
        path of numbered versions; else None); the serving ``version`` (the label
        given, or a content hash of the published weights) and ``generation`` (1, then +1
        per reload); queue
        depth, batch-size histogram (rows per predict call), p50/p99 queue and compute
        time per request (ms). Counters (restarts, crashes, hung, aborted, timeouts,
        retired, retried_requests, late_replies, ...) and histograms count every version
        since the pool started.

        ``memory_memo``: a dict shared by the ``stats()`` calls of one reading (a scrape of
        every model of a server): a process's memory is read once per reading, not once per
        pool (the server's own process is every pool's parent)."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        with self._history_lock:
            serving = self._generation
            generations = [serving, *self._retiring]
            snapshots = [g.snapshot() for g in generations]
            counters = collections.Counter(self._history_counters)
            metrics = self._history_metrics.copy()
        queued, workers, retiring_workers, zygotes = 0, [], [], []
        for generation, (gen_counters, gen_metrics, rows, gen_queued) in zip(generations,
                                                                              snapshots):
            counters.update(gen_counters)
            if gen_metrics is not None:
                metrics.absorb(gen_metrics)
            queued += gen_queued
            for row in rows:
                row["version"] = generation.version
            if generation is serving:
                workers.extend(rows)
            else:
                retiring_workers.extend(rows)
                if generation.supervisor.zygote_pid and not generation.exited.is_set():
                    zygotes.append({"pid": generation.supervisor.zygote_pid,
                                    "version": generation.version})
        spare_process = getattr(self._spare, "process", None)
        spare = {"pid": spare_process.pid} if spare_process is not None else None
        published = serving.published
        zygote = {"pid": serving.supervisor.zygote_pid,
                  "threads_at_boot": serving.supervisor.zygote_threads}
        parent = {"pid": os.getpid()}
        stats = {
            "start_method": self.config.start_method,
            "max_workers": self.config.workers,
            "min_workers": self.config.min_workers,
            "idle_timeout": self.config.idle_timeout if self.config.elastic else None,
            "version": serving.version,
            "generation": serving.number,
            # where the scheduler runs: its own thread, or a loop's (drive_on)
            "dispatch": "event loop" if serving.dispatcher.driver is not None else "thread",
            "retiring_versions": [g.version for g in generations[1:]],
            "model_bytes": (published.weight_bytes + published.file_bytes
                            + published.region_bytes),
            "file_backed_bytes": published.file_bytes,
            "weights_source": serving.weights_source,
            "model_source": published.source,
            "weight_files": list(published.file_paths),
            "model_buffers": published.n_buffers,
            "skeleton_bytes": len(published.skeleton),
            "workers": workers,
            "retiring_workers": retiring_workers,
            "retiring_zygotes": zygotes,
            "spare_zygote": spare,
            "parent": parent,
            "zygote": zygote,
            "queued": queued,
            **{name: counters[name] for name in COUNTERS},
            **metrics.snapshot(),
        }
        if memory_usage:
            files = tuple(published.file_paths)
            rows = (parent, zygote, *workers, *zygotes, *retiring_workers,
                    *([spare] if spare else []))
            for row in rows:
                memory.add_process_memory(row, files, memory_memo)
            stats["total_pss"] = sum(row["pss"] for row in rows)
        return stats

    @property
    def broken(self) -> PoolBroken | None:
        """Why the pool cannot serve any more (its zygote died and no new one could attach
        the model, or new workers keep failing to start), or None."""
        dispatcher = self._generation.dispatcher
        return dispatcher.broken if dispatcher is not None else None

    @property
    def signature(self) -> signature.Signature:
        """What the model itself says it takes and returns, as published with its weights
        (a Keras model's inputs and outputs, a SavedModel's signature); ``Signature()``
        (source "none") when it says nothing. Declarations are ``inputs``/``outputs``."""
        return self._generation.signature

    def is_ready(self) -> bool:
        """True while the pool is open, not broken, and at least one worker (attached and
        warmed up) takes work; or, an elastic pool, while its zygote can wake one (scaled
        to zero is ready: a request waits the milliseconds a fork takes). Cheap: no round
        trip to the pool's thread."""
        if self._closed or self.broken is not None:
            return False
        scheduler = self._generation.dispatcher.scheduler
        if scheduler.elastic and scheduler.zygote_up:
            return True
        for worker in list(scheduler.workers.values()):  # (asked per request: a loop)
            if worker.state == "ready":
                return True
        return False

    def release_idle_workers(self) -> list[int]:
        """Stop every worker that holds no work now, ``min_workers`` or not, and keep the
        pool at zero until requests come (it turns elastic: ``min_workers=0``, the idle
        timeout it had or 60 s). What a server past its memory budget does to the least
        recently used models; the model stays published and ready, and the next request
        wakes a worker by a fork. Returns the pids stopped."""
        self._check_usable()
        with self._reload_lock:
            self._check_usable()
            self.config = dataclasses.replace(
                self.config, min_workers=0,
                idle_timeout=self.config.idle_timeout if self.config.elastic else None)
            dispatcher = self._generation.dispatcher

            def release():
                stopped, actions = dispatcher.scheduler.release_idle(self.config,
                                                                     time.monotonic())
                dispatcher.carry_out(actions)
                return stopped

            return dispatcher.call(release)

    def resize(self, workers: int, min_workers: int | None = None) -> None:
        """Serve with at most ``workers`` processes from now on (and every later version).

        A fixed pool becomes a fixed pool of ``workers``; an elastic one keeps its
        ``min_workers`` (lowered to ``workers`` if above it) unless given. Growing starts
        workers at once (forked from the zygote: milliseconds); shrinking stops idle
        workers first and lets busy ones finish what they hold: no request is lost.
        Returns once the change is decided, not when new workers are ready.
        """
        self._check_usable()
        if min_workers is None:
            min_workers = workers if not self.config.elastic else \
                min(self.config.min_workers, workers)
        config = dataclasses.replace(self.config, workers=workers, min_workers=min_workers)
        with self._reload_lock:  # after a reload under way: its version gets the new size
            self._check_usable()
            self.config = config
            dispatcher = self._generation.dispatcher
            dispatcher.call(lambda: dispatcher.carry_out(dispatcher.scheduler.resize(
                config, time.monotonic())))

    @property
    def pids(self) -> list[int]:
        """Pids of the current workers (ready or starting)."""
        dispatcher = self._generation.dispatcher
        return [row["pid"] for row in dispatcher.call(lambda: worker_rows(dispatcher))
                if row["pid"]]

    @property
    def ipc_dir(self) -> str:
        """The private (0700) directory of the serving version's socket; removed when the
        pool closes, or by the zygote when this process dies."""
        return self._generation.private_dir

    @property
    def zygote_pid(self) -> int | None:
        return self._generation.supervisor.zygote_pid

    # -- versions ------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """The serving version: the label given (``version=``), or ``sha256:`` and the
        first 16 hex digits of a hash of everything published (weights and skeleton)."""
        return self._generation.version

    def reload(self, load: Callable[[], Any] | str | os.PathLike | None = None, *,
               predict: Callable[..., Any] | None = None, version: str | None = None) -> str:
        """Swap in a new version of the model with no request lost; returns its version.

        ``load`` (default: the pool's own, run again: a model file re-read, say) runs once,
        here; its weights go into a new segment; a new zygote and a full set of workers
        attach and warm up beside the serving ones. Then every new request goes to them,
        at once; requests already accepted finish on the version they were accepted by,
        whose workers then leave and whose segment is released. Memory during the swap:
        one copy of each version. ``predict`` replaces the pool's when given.

        A reload that fails (``load()`` raises, workers cannot start, warm-up raises)
        raises ReloadFailed naming the cause and leaves the old version serving. Reloading
        a broken pool replaces it. One reload runs at a time; a second
        call waits for the first.
        """
        self._check_usable()
        with self._reload_lock:
            self._check_usable()
            try:
                load = self._load if load is None else self._loader(load)
                predict = self._predict if predict is None else predict
                if not callable(predict):
                    raise TypeError(f"predict must be a callable, got {predict!r}")
                version = _version_label(version)
                # The new zygote starts now, importing its frameworks while load() runs
                # (a shared runtime has imported them already: it forks the zygote).
                prestarted, self._spare = self._spare, None
                if self.runtime is None and (prestarted is None
                                             or prestarted.process.poll() is not None):
                    if prestarted is not None:
                        prestarted.discard()  # it died idle: start another
                    prestarted = self._prestart_zygote()
                generation = self._start_generation(self._generation.number + 1, load,
                                                    predict, version, prestarted)
                if self._drive_loop is not None:
                    generation.dispatcher.drive_on(self._drive_loop)
            except Exception as exc:
                raise ReloadFailed(f"reload failed, version {self.version} still serving: "
                                   f"{type(exc).__name__}: {exc}") from exc
            with self._swap_lock:
                closed = self._closed
                if not closed:
                    with self._history_lock:
                        old, self._generation = self._generation, generation
                        self._retiring.append(old)
            if closed:
                generation.shutdown.close(drain=False)
                raise PoolClosed("the pool was closed during reload")
            self._load, self._predict = load, predict
            old.retire()
            self._keep_a_spare()
            return generation.version

    async def reload_async(self, load=None, *, predict=None, version: str | None = None) -> str:
        """``await``-able :meth:`reload` (it runs in a thread; the event loop keeps serving)."""
        return await asyncio.to_thread(self.reload, load, predict=predict, version=version)

    # -- lifecycle -----------------------------------------------------------------------
    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work, stop every worker, release the weights. Idempotent.

        ``drain=True`` finishes the requests already accepted first (for at most
        ``timeout`` seconds, then as with ``drain=False``); ``drain=False`` fails every
        unanswered request with PoolClosed at once. Either way no worker, socket or
        segment is left when it returns (a retiring version's included). Safe from any
        thread: called from a future's done-callback (the pool's own thread) it only
        starts the close, which then finishes by itself; interrupted (Ctrl-C), a second
        call finishes it. In a process forked from the pool's owner it does nothing: the
        pool is not that process's.
        """
        with self._swap_lock:
            self._close_requested = True
        if self._generation.shutdown.foreign:
            return
        with self._reload_lock:  # a reload under way finishes (and sees the close) first
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()
        for generation in [self._generation, *list(self._retiring)]:
            generation.shutdown.close(drain, timeout)

    @property
    def _closed(self) -> bool:
        return self._close_requested or self._generation.shutdown.requested

    def _check_usable(self) -> None:
        if self._generation.shutdown.foreign:
            raise WrongProcess(
                f"this Pool belongs to process {self._generation.shutdown.owner_pid}, and this "
                f"process ({os.getpid()}) was forked from it; create a Pool in this process "
                "instead")
        if self._closed:
            raise PoolClosed("the pool is closed; create a new Pool")

    def _check_open(self) -> None:
        self._check_usable()
        if self._generation.dispatcher.broken is not None:
            raise self._generation.dispatcher.broken

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        generation = getattr(self, "_generation", None)
        if generation is None or self._closed or generation.shutdown.foreign:
            return
        # Like an unclosed file or Popen: say so, and let the pool's own thread wind it
        # down (drain, stop the workers, release the weights) without blocking here.
        warnings.warn(f"unclosed {self!r}; call close() or use `with Pool(...) as pool:`",
                      ResourceWarning, source=self)
        self._close_requested = True
        for generation in [generation, *self._retiring]:
            generation.shutdown.close_soon()

    def __repr__(self) -> str:
        generation = getattr(self, "_generation", None)
        if generation is None:
            return "<workerpool.Pool (not started)>"
        state = "closed" if self._closed else "open"
        # The generation, not the version: a content hash may still be computing, and
        # repr (in a warning from __del__, say) must not wait for it.
        return (f"<workerpool.Pool {state} generation={generation.number} "
                f"workers={self.config.workers} start_method={self.config.start_method} "
                f"model_bytes={generation.published.weight_bytes}>")


COUNTERS = ("restarts", "crashes", "hung", "aborted", "timeouts", "retired",
            "retried_requests", "late_replies", "rejected_peers", "malformed_messages",
            "zygote_restarts", "scaled_up", "scaled_down", "released")


def default_load_in(source) -> str:
    """Where load() runs unless the caller says: a loader process for a TensorFlow model
    file or directory (Keras keeps a copy of the weights in the process that loads it:
    measured 270 MiB of a 128 MiB model), this process for everything else (a torch
    program that imports torch anyway saves nothing and would wait ~1.2 s longer)."""
    if isinstance(source, (str, os.PathLike)) and files.is_tensorflow_file(os.fspath(source)):
        return "loader"
    return "parent"


def _version_label(version) -> str | None:
    if version is None:
        return None
    if not isinstance(version, (str, int)) or isinstance(version, bool) or not str(version):
        raise TypeError(f"version must be a non-empty str or int label, got {version!r}")
    return str(version)


def _fold_into_history(pool: "Pool"):
    """on_exit of a generation: a retired one's final figures join the pool's history.
    Holds the pool weakly: an unreachable pool must stay collectable."""
    pool_ref = weakref.ref(pool)

    def fold(generation: Generation) -> None:
        pool = pool_ref()
        if pool is None:
            return
        with pool._history_lock:
            if generation in pool._retiring:
                pool._retiring.remove(generation)
                counters, metrics = generation.final
                pool._history_counters.update(counters)
                pool._history_metrics.absorb(metrics)
    return fold


async def _aiter(inputs):
    if hasattr(inputs, "__aiter__"):
        async for x in inputs:
            yield x
    else:
        for x in inputs:
            yield x
