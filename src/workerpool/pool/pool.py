"""The public Pool: one shared copy of a model, served by N worker processes.

    Pool(load, predict)
      load() in this process ──publish──> sealed memfd + skeleton (pool/weights.py)
      Supervisor ──spawn──> zygote: attach once ──fork──> workers (pool/supervisor.py)
      Dispatcher thread ── ROUTER ipc://<0700 dir>/pool.sock ──> workers (pool/dispatcher.py)
      submit()/map() encode in the caller's thread and hand a Request to the dispatcher.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator

from ..config import PoolConfig
from ..errors import PoolBroken, PoolClosed, PoolStartError
from ..ipc import endpoints
from ..ipc.codec import Codec
from . import memory
from .dispatcher import Dispatcher, Request
from .supervisor import Supervisor
from .weights import publish

_live_pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()


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
        start_method: ``"zygote"`` (default: workers are forked from a process that holds
            the attached model; a new worker is ready in milliseconds) or ``"spawn"``
            (each worker is a fresh interpreter attaching the same memfd: for libraries
            where fork is unsafe; costs an import of your framework per worker).
        threads_per_worker: intra-op threads of each worker (torch.set_num_threads).
        max_message_bytes: largest request or result; larger ones raise MessageTooLarge.
        start_timeout: seconds to wait for every worker to be ready.
        close_timeout: seconds ``close()`` waits for workers to exit before killing them.
        heartbeat_timeout: a worker silent this long (stuck inside ``predict``, or
            deadlocked) is aborted (SIGABRT, then SIGKILL) and replaced; the request it was
            running fails with WorkerCrashed carrying the stack where it was stuck. Idle
            workers say they are alive every ``heartbeat_interval`` seconds. None: never.
        max_requests_per_worker: recycle a worker after this many requests plus a random
            0..``max_requests_jitter`` (so they do not all restart at once), to contain
            leaks in model code. Its replacement starts first; queued work is unaffected.

    Inputs passed to ``submit`` are sent without a copy: do not modify them until the
    future is done.
    """

    def __init__(self, load: Callable[[], Any], predict: Callable[..., Any], workers: int = 2,
                 *, start_method: str = "zygote", threads_per_worker: int = 1,
                 max_message_bytes: int = PoolConfig.max_message_bytes,
                 start_timeout: float = PoolConfig.start_timeout,
                 close_timeout: float = PoolConfig.close_timeout,
                 heartbeat_interval: float = PoolConfig.heartbeat_interval,
                 heartbeat_timeout: float | None = PoolConfig.heartbeat_timeout,
                 max_requests_per_worker: int | None = None, max_requests_jitter: int = 0):
        self.config = PoolConfig(
            workers=workers, start_method=start_method, threads_per_worker=threads_per_worker,
            max_message_bytes=max_message_bytes, start_timeout=start_timeout,
            close_timeout=close_timeout, heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout, max_requests_per_worker=max_requests_per_worker,
            max_requests_jitter=max_requests_jitter)
        self._closed = False
        self._close_lock = threading.Lock()
        self._ids = itertools.count()
        self._codec = Codec(allow_pickle=True, max_message_bytes=self.config.max_message_bytes,
                            zero_copy_threshold=self.config.zero_copy_threshold)
        self._dispatcher: Dispatcher | None = None
        self._published = publish(load(), predict)
        self._private_dir = endpoints.make_private_dir()
        endpoint = endpoints.pool_endpoint(self._private_dir)
        self._supervisor = Supervisor(self.config, self._published, self._private_dir, endpoint)
        try:
            self._supervisor.start_zygote()
            self._dispatcher = Dispatcher(self.config, self._supervisor, endpoint, self._codec)
            self._dispatcher.start()
            if not self._dispatcher.started.wait(self.config.start_timeout):
                raise PoolStartError(
                    f"workers were not ready within start_timeout={self.config.start_timeout} s")
            if self._dispatcher.start_error is not None:
                raise self._dispatcher.start_error
        except BaseException:
            self.close()
            raise
        _live_pools.add(self)

    # -- work ----------------------------------------------------------------------------
    def submit(self, *args, **kwargs) -> Future:
        """Run ``predict(model, *args, **kwargs)`` in a worker; returns a Future at once."""
        self._check_open()
        body, frames = self._codec.encode((args, kwargs))
        future: Future = Future()
        self._dispatcher.submit(Request(next(self._ids), future, body, frames))
        return future

    def map(self, inputs: Iterable, *, window: int | None = None) -> Iterator:
        """``predict(model, x)`` for each ``x``, yielded in input order.

        At most ``window`` requests are in flight at once (default: enough to keep every
        worker busy), so an endless generator runs in constant memory. The first error is
        raised where its result would have been yielded.
        """
        window = window or self.config.workers * self.config.credits_per_worker * 2
        in_flight: collections.deque[Future] = collections.deque()
        for x in inputs:
            in_flight.append(self.submit(x))
            if len(in_flight) >= window:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    # -- observation ---------------------------------------------------------------------
    def stats(self, memory_usage: bool = True) -> dict:
        """Per-worker pid, state, requests served, start time, and (``memory_usage``) PSS,
        USS, RSS, shared bytes and the weights' resident/proportional/copied bytes; the
        pool's total PSS (parent + zygote + workers); the published model's size.
        Counters: restarts, crashes, hung, retired, retried_requests, late_replies."""
        if self._closed:
            raise PoolClosed("the pool is closed")
        workers, queued, counters = self._dispatcher.call(self._dispatcher_snapshot, timeout=30)
        zygote = {"pid": self._supervisor.zygote_pid,
                  "threads_at_boot": self._supervisor.zygote_threads}
        parent = {"pid": os.getpid()}
        stats = {
            "start_method": self.config.start_method,
            "model_bytes": self._published.weight_bytes,
            "model_buffers": self._published.n_buffers,
            "skeleton_bytes": len(self._published.skeleton),
            "workers": workers,
            "parent": parent,
            "zygote": zygote,
            "queued": queued,
            **counters,
        }
        if memory_usage:
            for row in (parent, zygote, *workers):
                row.update(memory.process_memory(row["pid"]))
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
            "restarts", "crashes", "hung", "retired", "retried_requests", "late_replies")}
        return rows, len(d.pending) + len(d.retries), counters

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
        segment is left when it returns.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _live_pools.discard(self)
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher.is_alive():
            dispatcher.request_close(drain)
            dispatcher.join(timeout)
            if dispatcher.is_alive():
                dispatcher.request_close(drain=False)
                dispatcher.join(self.config.close_timeout)
            if dispatcher.is_alive():  # the zygote is not answering: stop it the hard way
                self._supervisor.kill_zygote()
                dispatcher.join()
        self._supervisor.stop_zygote()
        self._published.close()
        endpoints.remove_private_dir(self._private_dir)

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosed("the pool is closed; create a new Pool")
        if self._dispatcher.broken is not None:
            raise self._dispatcher.broken if isinstance(self._dispatcher.broken, PoolBroken) \
                else PoolBroken(str(self._dispatcher.broken))

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<workerpool.Pool {state} workers={self.config.workers} "
                f"start_method={self.config.start_method} "
                f"model_bytes={self._published.weight_bytes}>")


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_live_pools):
        pool.close(drain=True, timeout=pool.config.close_timeout)
