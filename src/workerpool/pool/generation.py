"""One version of a pool's model and everything serving it.

    Generation(load, predict)
      load() once, here or in a loader process ──publish──> sealed memfd + skeleton (its
      own segment)
      its own private dir, zygote (spawned, or forked by a shared Runtime), workers,
      dispatcher thread, Shutdown
      version: the user's label, or a content hash of what was published

A Pool serves from one generation at a time; ``Pool.reload`` starts the next one beside it,
switches new requests to it once its workers are warm, and retires the old one: the old
dispatcher drains what it holds, stops its workers and releases its segment on its way out.
Two generations never share a process, a socket or a segment, so a failed start of the new
one cannot disturb the old.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Callable

from ..config import PoolConfig
from ..errors import PoolClosed, PoolStartError
from ..ipc import endpoints
from ..ipc.codec import Codec
from ..publishing import PublishedModel
from ..signature import Signature, specs
from .dispatcher import Dispatcher
from .loading import load_and_publish
from .runtime import Runtime
from .shutdown import Shutdown
from .supervisor import PrestartedZygote, Supervisor

_HASH_CHUNK = 8 * 1024 * 1024


class Generation:
    """The published model of one version, its zygote, workers and dispatcher thread.

    ``on_exit(generation)`` runs on the dispatcher thread as its last act, after every
    worker has stopped and the segment is released.
    """

    def __init__(self, number: int, config: PoolConfig, codec: Codec, encoded_warmup,
                 load: Callable[[], Any], predict: Callable[..., Any],
                 version: str | None = None, on_exit: Callable | None = None,
                 prestarted: PrestartedZygote | None = None, runtime: Runtime | None = None):
        self.number = number
        self.config = config
        self.final: tuple | None = None  # (counters, metrics) once the dispatcher is gone
        self.exited = threading.Event()
        self._on_exit = on_exit
        self.private_dir = private_dir = endpoints.make_private_dir()
        try:
            self.published, self.weights_source = load_and_publish(load, predict, config,
                                                                   private_dir, runtime)
        except BaseException:
            endpoints.remove_private_dir(private_dir)
            if prestarted is not None:
                prestarted.discard()
            raise
        self._version = version
        self._hasher = hasher = None
        if version is None:  # hashed beside the start, and never in the way of a swap
            self._hasher = hasher = _Hasher(self.published)
            hasher.start()
        endpoint = endpoints.pool_endpoint(private_dir)
        self.supervisor = Supervisor(config, self.published, private_dir, endpoint,
                                     encoded_warmup, runtime)
        self.shutdown = Shutdown(config, self.supervisor, self.published, private_dir)
        self.dispatcher: Dispatcher | None = None
        try:
            self.supervisor.start_zygote(prestarted)
            self.dispatcher = Dispatcher(config, self.supervisor, endpoint, codec,
                                         on_exit=self._exit)
            self.shutdown.dispatcher = self.dispatcher
            self.dispatcher.start()
            if not self.dispatcher.started.wait(config.start_timeout):
                raise PoolStartError(
                    f"workers were not ready within start_timeout={config.start_timeout} s")
            if self.dispatcher.start_error is not None:
                raise self.dispatcher.start_error
        except BaseException:
            if hasher is not None:
                hasher.join()
            if prestarted is not None:
                prestarted.discard()  # if the supervisor did not take it
            self.shutdown.close(drain=False)
            raise

    @property
    def signature(self) -> Signature:
        """What the published model says it takes and returns (Signature() if nothing)."""
        return _signature(self.published.signature)

    @property
    def version(self) -> str:
        """The label given, else a content hash (waits for the hash: about 1 s per GiB)."""
        if self._version is None:
            self._version = self._hasher.result()
        return self._version

    def _exit(self) -> None:
        if self._hasher is not None:
            self._hasher.join()  # it reads the fds release() closes
        self.shutdown.release()
        d = self.dispatcher
        self.final = (dict(d.counters), d.metrics.copy())
        self.exited.set()
        if self._on_exit is not None:
            self._on_exit(self)

    def snapshot(self, timeout: float = 30) -> tuple:
        """(counters, metrics copy, worker rows, queued) of this generation, read on its
        dispatcher thread; its final figures once that thread is gone."""
        d = self.dispatcher

        def read():
            return (dict(d.counters), d.metrics.copy(), worker_rows(d), d.scheduler.queued())

        try:
            return d.call(read, timeout=timeout)
        except PoolClosed:
            self.exited.wait(timeout)
            counters, metrics = self.final or ({}, None)
            return counters, metrics, [], 0

    def retire(self) -> None:
        """Take no new work, finish what is accepted, then stop and release (on the
        dispatcher thread: returns at once)."""
        self.shutdown.close_soon()


def worker_rows(dispatcher: Dispatcher) -> list[dict]:
    """The workers of one dispatcher, for stats(); read on its thread."""
    return [{"worker_id": w.worker_id, "pid": w.pid, "state": str(w.state),
             "requests_served": w.served, "in_flight": len(w.inflight),
             "start_to_ready_ms": None if w.ready_at is None
             else round((w.ready_at - w.started_at) * 1000, 3)}
            for w in dispatcher.workers.values()]


class _Hasher(threading.Thread):
    """sha256 of everything a generation published: the skeleton, the segment, the weight
    files and mapped constants. hashlib releases the GIL on large updates."""

    def __init__(self, published: PublishedModel):
        super().__init__(name="workerpool-version-hash", daemon=True)
        self.fds = published.all_fds()
        self.skeleton = published.skeleton
        self.digest: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            digest = hashlib.sha256(self.skeleton)
            view = memoryview(bytearray(_HASH_CHUNK))
            for fd in self.fds:
                # Read, not mapped: pages mapped here would count in this process's
                # resident set as if it held a copy.
                offset = 0
                while True:
                    n = os.preadv(fd, [view], offset)
                    if n == 0:
                        break
                    digest.update(view[:n])
                    offset += n
            self.digest = "sha256:" + digest.hexdigest()[:16]
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self) -> str:
        self.join()
        if self.error is not None:  # cannot happen short of a bug; the pool serves anyway
            return f"unhashed ({self.error!r})"
        return self.digest


def _signature(told: dict | None) -> Signature:
    """A published signature ({"inputs", "outputs", "named": {name: {...}}}) as a Signature."""
    if not told:
        return Signature()
    named = {name: _signature(described) for name, described in told.get("named", {}).items()}
    return Signature(specs(told.get("inputs")), specs(told.get("outputs")), "model", named)
