"""The pool's state machine: every request and worker the pool holds, and what to do next.

The scheduler owns the tables (queued requests, retries, worker slots, tasks in flight,
deadlines, timers, counters) and makes every decision on them, but performs no I/O and
reads no clock: each event handler takes ``now`` and returns the actions that follow, for
pool/dispatcher.py to carry out in order:

    Send(worker, frames, requests)   a TASK to a worker (handed back by ``unreachable``
                                     if the worker's connection is gone)
    Stop(worker)                     STOP to a worker, best effort
    Answer(request, value, error)    settle the request's future
    Deliver(request, body, frames)   decode a worker's answer, then settle the future
    Item(request, body, frames)      decode an item of a stream, hand it to its consumer
    StartWorker(worker_id, identity, cpus) / Signal(worker_id, signum)   via the zygote

Events: ``submit``, ``close``, ``on_message`` (anything a worker sent), ``on_started``,
``on_exit``, ``on_start_error``, ``on_zygote_died`` / ``on_zygote_restarted`` /
``on_zygote_lost``, and ``tick(now)`` (timers, deadlines,
then sending what can be sent). tests/unit/test_scheduler.py drives it by hand: no
sockets, processes or sleeps. The policies it applies are the pure functions of
pool/scheduling.py.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import random
import signal
import threading
import time
from concurrent.futures import Future
from typing import Callable, NamedTuple

from ..config import PoolConfig
from ..errors import PoolBroken, PoolClosed, PoolStartError, ProtocolError, TaskTimeout, \
    WorkerCrashed
from ..ipc import wire
from ..ipc.codec import frame_nbytes
from .batching import Batcher
from .metrics import Metrics
from .scheduling import (ABORTED_STATES, CALL_SAMPLES, AfterBootFailure, Fate, Overdue, Task,
                         WorkerSlot, WorkerState, after_boot_failure, chunk_size, fate,
                         overdue, pick_worker, ready_credit, still_running)
from .supervisor import describe_exit

log = logging.getLogger("workerpool")

ABORT_GRACE_S = 1.0  # SIGABRT (the worker's faulthandler dumps its stack), then SIGKILL


class Request:
    """One call the pool holds. A stream (``credit`` not None: pool/streams.py) is a call
    whose items come back one by one: ``future`` is then its consumer's sink, ``credit``
    the items it may be sent so far and ``items`` those the worker sent."""

    __slots__ = ("id", "future", "body", "frames", "attempts", "batch_key", "rows",
                 "enqueued_at", "deadline", "timeout", "worker", "answered", "credit",
                 "items", "tag", "trace")

    def __init__(self, request_id: int, future: Future, body: bytes, frames: list, *,
                 batch_key: tuple | None = None, rows: int = 1, timeout: float | None = None,
                 now: float | None = None, credit: int | None = None,
                 tag: str | None = None):
        self.id = request_id
        self.tag = tag  # the server's request id, for the worker's log lines
        self.trace: dict | None = None  # its times, for a tracer (request_ids.timings)
        self.credit = credit
        self.items = 0
        self.future = future
        self.body = body
        self.frames = frames
        self.attempts = 0
        self.batch_key = batch_key
        self.rows = rows
        self.enqueued_at = time.monotonic() if now is None else now
        self.timeout = timeout
        self.deadline = None if timeout is None else self.enqueued_at + timeout
        self.worker: WorkerSlot | None = None  # where it is in flight
        self.answered = False  # an Answer or Deliver was issued for it

    @property
    def nbytes(self) -> int:
        """Bytes it takes in a TASK; only the batcher asks (not every submit pays for it)."""
        return len(self.body) + sum(frame_nbytes(f) for f in self.frames)

    def done(self) -> bool:
        """Answered, or given up on by its caller (a cancelled future)."""
        return self.answered or self.future.done()


class QueueGauge:
    """Requests accepted but not yet sent; checked by submit() in callers' threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def try_add(self, limit: int | None) -> bool:
        with self._lock:
            if limit is not None and self.count >= limit:
                return False
            self.count += 1
            return True

    def remove(self, n: int = 1) -> None:
        with self._lock:
            self.count -= n


# -- actions --------------------------------------------------------------------------------
class Send(NamedTuple):
    worker: WorkerSlot
    frames: list  # the worker's identity first, for wire.send
    requests: list  # what it carries (empty for a STOP)


class Stop(NamedTuple):
    worker: WorkerSlot


class Answer(NamedTuple):
    request: Request
    value: object = None
    error: BaseException | None = None


class Deliver(NamedTuple):
    request: Request
    body: bytes
    frames: list


class Item(NamedTuple):
    request: Request
    body: bytes
    frames: list


class StartWorker(NamedTuple):
    worker_id: int
    identity: bytes
    cpus: list[int] | None


class Signal(NamedTuple):
    worker_id: int
    signum: int


# Deaths before READY that say nothing about the worker's own code.
_KILLED_FROM_OUTSIDE = (-signal.SIGKILL, -signal.SIGTERM)


class Scheduler:
    """See the module docstring. ``admit(meta, head_frame) -> bool`` says whether a READY
    comes from a process the pool started (the secret and peer credentials live with the
    dispatcher)."""

    def __init__(self, config: PoolConfig, admit: Callable[[dict, object], bool]):
        self.config = config
        self.admit = admit
        self.started = False  # every first worker was READY once
        self.zygote_up = True  # workers can be started
        self.start_error: BaseException | None = None
        self.broken: PoolBroken | None = None
        self.closing = False
        self.pending: collections.deque[Request] = collections.deque()
        self.retries: collections.deque[Request] = collections.deque()  # from dead workers
        self.workers: dict[int, WorkerSlot] = {}  # worker id -> slot
        self.by_identity: dict[bytes, WorkerSlot] = {}
        self.worker_ids = itertools.count(1)
        # How many workers (its workers, min_workers and idle_timeout): a fixed pool keeps
        # `workers`; an elastic one grows while requests wait and shrinks after
        # idle_timeout. resize() and release_idle() replace it; the rest of `config` stays.
        self.size = config
        self.idle_checking = False  # check_idle's timer is set
        self.boot_failures = 0  # in a row: workers that failed by themselves before READY
        self.start_deaths = 0  # in a row: workers that died before READY, for any reason
        self.timers: list[tuple[float, int, Callable[[float], None]]] = []
        self.timer_seq = itertools.count()
        self.counters = collections.Counter()  # restarts, crashes, hung, retired, ...
        # A TASK must fit the worker's message size limit, whatever the rows say.
        self.batcher = Batcher(config.max_batch_size if config.batched else 1,
                               config.max_wait_ms / 1000, max_bytes=config.max_message_bytes)
        self.queue_gauge = QueueGauge()
        self.deadlines: list[tuple[float, int, Request]] = []
        self.batch_wake_at: float | None = None
        self.metrics = Metrics()
        # The compute seconds of the latest replies (a call each, or a batch): their median
        # is the typical call that sizes chunks; a median, so one slow call does not stop
        # a fast model's chunking.
        self.call_seconds: collections.deque[float] = collections.deque(maxlen=CALL_SAMPLES)
        self._actions: list = []

    def _take_actions(self) -> list:
        actions, self._actions = self._actions, []
        return actions

    def _answer(self, request: Request, value=None, error: BaseException | None = None):
        request.answered = True
        self._actions.append(Answer(request, value, error))

    # -- life of the pool ----------------------------------------------------------------
    def start(self, now: float) -> list:
        """The first workers, and the liveness check's (and idle check's) first round."""
        for _ in range(self.size.first_workers):
            self.start_worker(now)
        self.call_later(now, self.config.heartbeat_interval, self.check_liveness)
        self.check_idle_soon(now)
        return self._take_actions()

    @property
    def max_workers(self) -> int:
        return self.size.workers

    @property
    def min_workers(self) -> int:
        return self.size.min_workers

    @property
    def elastic(self) -> bool:
        return self.size.elastic

    def submit(self, request: Request) -> list:
        """A request posted by a caller (already counted in ``queue_gauge``)."""
        if self.broken is not None or self.closing:
            self.queue_gauge.remove()
            self._answer(request, error=self.broken or PoolClosed("the pool is closed"))
        else:
            self.pending.append(request)
            self.watch_deadline(request)
        return self._take_actions()

    def watch_deadline(self, request: Request) -> None:
        """``request`` fails at its deadline, if it has one (expire_deadlines)."""
        if request.deadline is not None:
            heapq.heappush(self.deadlines, (request.deadline, request.id, request))

    def lone_task(self, request: Request) -> Send | None:
        """The TASK that sends ``request`` at once, when it finds the pool idle (nothing
        queued) and a worker free: what ``submit`` and ``tick`` would send, decided without
        passing through the queue. Nothing is recorded until ``lone_sent``: the caller
        sends it first (the worker starts while the caller writes it down). None when it
        must be submitted as usual: something is queued, no worker is idle, the pool is
        broken or closing, it is a stream, the batcher would have it wait for company, or
        its caller gave up on it."""
        if self.pending or self.retries or self.broken is not None or self.closing or \
                request.credit is not None or \
                (self.batcher.max_wait_s and not self.batcher.alone(request)):
            return None
        worker = pick_worker(self.workers.values(), idle=True, recent=self.elastic)
        if worker is None or not mark_running(request):
            return None
        return self.task_for(worker, [request], True)

    def lone_sent(self, sent: Send, now: float) -> list:
        """Record ``sent`` (``lone_task``'s), sent: the pool holds it as ``tick`` would
        have, its deadline included."""
        (request,) = sent.requests
        self.queue_gauge.remove()
        self.watch_deadline(request)
        self.record_sent(sent, True, now)
        return self._take_actions()

    def close(self, drain: bool) -> list:
        """Accept nothing more; ``drain``: finish accepted work, else fail it (PoolClosed)
        and kill the workers (any of them may be running a request just failed)."""
        self.closing = True
        if not drain:
            self.fail_all(PoolClosed("the pool was closed before this request finished"))
            for worker in self.workers.values():
                worker.become(WorkerState.STOPPING)
                self._actions.append(Signal(worker.worker_id, signal.SIGKILL))
        return self._take_actions()

    def shutdown(self) -> list:
        """STOP every worker; one still starting may not be connected yet, so a STOP could
        never reach it: kill it."""
        for worker in self.workers.values():
            if worker.state == WorkerState.STARTING:
                self._actions.append(Signal(worker.worker_id, signal.SIGKILL))
            else:
                self.stop_worker(worker)
        return self._take_actions()

    def finished(self) -> bool:
        if self.start_error is not None:
            return True
        return self.closing and not self.pending and not self.retries and not any(
            w.inflight for w in self.workers.values())

    def may_start_workers(self) -> bool:
        """Workers may start: not broken, and not closing unless accepted work still waits
        for one (a draining pool, a retiring version among them, whose worker or zygote
        died: its requests are retried there, as before the close, never failed)."""
        return self.broken is None and (not self.closing or bool(self.pending or self.retries))

    def has_idle_worker(self) -> bool:
        """Nothing waits and a ready worker runs nothing: a request now is sent at once.
        Also read without the baton, as a hint (Dispatcher.submit)."""
        if self.pending or self.retries:
            return False
        workers = self._workers_now()
        return workers is not None and pick_worker(workers, idle=True) is not None

    def alone_in_flight(self) -> bool:
        """At most one request is out: the one of a caller that waits for it alone
        (Dispatcher.drive_until). Read without the baton, as a hint."""
        workers = self._workers_now()
        return workers is not None and sum(len(w.inflight) for w in workers) <= 1

    def _workers_now(self) -> list | None:
        """The worker table as a list, safe to read from any thread; None when it
        changed while being copied (a worker came or went)."""
        try:
            return list(self.workers.values())
        except RuntimeError:
            return None

    def queued(self) -> int:
        """Requests waiting to be sent (retries included)."""
        return len(self.pending) + len(self.retries)

    def next_wake(self) -> float | None:
        """When ``tick`` has something to do next (None: only an event can bring work)."""
        wake = self.batch_wake_at  # (asked several times a round trip: no list built)
        if self.timers and (wake is None or self.timers[0][0] < wake):
            wake = self.timers[0][0]
        if self.deadlines and (wake is None or self.deadlines[0][0] < wake):
            wake = self.deadlines[0][0]
        return wake

    def tick(self, now: float) -> list:
        """Due timers, requests past their deadline, then send what workers can take."""
        if not (self.pending or self.retries or self.batch_wake_at is not None):
            wake = self.next_wake()  # a timer's or a deadline's
            if wake is None or wake > now:
                return self._take_actions()  # nothing is due: the idle pool's every reply
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn(now)
        self.expire_deadlines(now)
        self.dispatch(now)
        return self._take_actions()

    def fail_everything(self, error: BaseException) -> list:
        """Answer every request the pool holds with ``error``."""
        self.fail_all(error)
        return self._take_actions()

    def fail_all(self, error: BaseException) -> None:
        while self.retries:
            self._answer(self.retries.popleft(), error=error)
        self.queue_gauge.remove(len(self.pending))
        while self.pending:
            self._answer(self.pending.popleft(), error=error)
        for worker in self.workers.values():
            for request in worker.inflight.values():
                self._answer(request, error=error)
            worker.inflight.clear()

    # -- sending work --------------------------------------------------------------------
    def dispatch(self, now: float) -> None:
        if (self.pending or self.retries) and len(self.workers) < self.max_workers:
            self.grow(now)  # before chunking hands a backlog to the workers there are
        while self.retries:
            worker = pick_worker(self.workers.values(), idle=True, recent=self.elastic)
            if worker is None:
                break
            request = self.retries.popleft()
            if not request.done():
                worker.isolating = True
                self.send(worker, [request], False, now)
        self.batch_wake_at = None
        call_s = self.typical_call_s() if len(self.pending) > 1 else None
        while self.pending:
            worker = pick_worker(self.workers.values(), idle=False, recent=self.elastic)
            if worker is None:
                return
            batch, wake_at = self.batcher.take(self.pending, now,
                                               chunk=chunk_size(self.workers.values(),
                                                                len(self.pending), worker,
                                                                call_s))
            if not batch:
                self.batch_wake_at = wake_at  # the head waits for company until then
                return
            self.queue_gauge.remove(len(batch))
            each = not self.batcher.together(batch)
            batch = [request for request in batch if mark_running(request)]
            if batch:
                self.send(worker, batch, each, now)

    def typical_call_s(self) -> float | None:
        """The median compute seconds of the latest replies; None before the first."""
        if not self.call_seconds:
            return None
        return sorted(self.call_seconds)[len(self.call_seconds) // 2]

    def send(self, worker: WorkerSlot, batch: list[Request], each: bool, now: float) -> None:
        sent = self.task_for(worker, batch, each)
        self._actions.append(sent)
        self.record_sent(sent, each, now)

    def task_for(self, worker: WorkerSlot, batch: list[Request], each: bool) -> Send:
        """The TASK that sends ``batch`` to ``worker``; ``record_sent`` records it."""
        tags = [r.tag for r in batch] if any(r.tag for r in batch) else None
        return Send(worker, [worker.identity, *wire.task(
            [r.id for r in batch], [(r.body, r.frames) for r in batch], each,
            coalesces(batch, each), batch[0].credit, tags)], batch)

    def record_sent(self, sent: Send, each: bool, now: float) -> None:
        """What the pool holds once ``sent`` (``task_for``'s) is sent: its requests in
        flight on its worker, the worker's task and credit, the metrics."""
        worker, batch = sent.worker, sent.requests
        worker.last_sent = now
        for request in batch:
            request.attempts += 1
            request.worker = worker
            if request.trace is not None:
                request.trace["sent"] = now
            worker.inflight[request.id] = request
            self.metrics.queued(now - request.enqueued_at)
        stream = batch[0].credit  # (a stream travels alone)
        # A stream holds its worker until its consumer is done with it: nothing is queued
        # behind it there (a task behind a long stream would wait all of it).
        taken = max(1, worker.credits) if stream is not None else 1
        worker.tasks.append(Task([r.id for r in batch], each, coalesces(batch, each),
                                 started_at=None if worker.tasks else now, credits=taken))
        worker.credits -= taken
        worker.sent += len(batch)
        if worker.retire_after and worker.sent >= worker.retire_after:
            self.retire_worker(worker, now)  # it has its share: nothing more is sent to it
        if each:  # a chunk: a predict call each
            for request in batch:
                self.metrics.batch(request.rows)
        else:
            self.metrics.batch(sum(r.rows for r in batch))

    def unreachable(self, sent: Send, now: float) -> list:
        """``sent`` could not be sent: the worker's connection is gone (the zygote will
        report its exit). Its requests go back to the front of the retries, as unsent."""
        worker = sent.worker
        worker.credits = 0
        for request in sent.requests:
            if worker.inflight.pop(request.id, None) is not None:
                request.attempts -= 1
                request.worker = None
        ids = {r.id for r in sent.requests}
        for task in list(worker.tasks):
            if ids.intersection(task.ids):
                worker.tasks.remove(task)
        if worker.isolating and not worker.inflight:
            worker.isolating = False
        self.retries.extendleft(reversed(sent.requests))
        self.dispatch(now)
        return self._take_actions()

    # -- what workers say ----------------------------------------------------------------
    def on_message(self, frames: list, now: float) -> list:
        """One message from a peer, ``[identity, head, *frames]``. Only a worker we
        started, admitted by ``admit``, is read any further: nothing from another peer is
        ever unpickled. A malformed message is counted and dropped, never raised."""
        try:
            self._on_message(frames, now)
        except ProtocolError as exc:
            self.count_bad_message("malformed_messages", str(exc))
        return self._take_actions()

    def _on_message(self, frames: list, now: float) -> None:
        worker = self.by_identity.get(frames[0])
        if worker is None:
            self.counters["late_replies"] += 1  # from a worker we buried, or a stranger
            return
        if len(frames) < 2:
            raise ProtocolError(f"a message of {len(frames)} frames")
        try:
            kind, meta = wire.read_head(frames[1])
            ids = wire.reply_ids(meta) if kind in (wire.RESULT, wire.ERROR, wire.ITEM,
                                                   wire.END) else None
        except ProtocolError as exc:
            if worker.admitted and worker.state in (WorkerState.READY, WorkerState.RETIRING):
                # Which requests it answered cannot be known: rather than leave them in
                # flight until their deadline (or forever), replace the worker; its
                # requests are retried like a crash's.
                self.abort_worker(worker, f"it sent a message the pool cannot read ({exc})",
                                  now, state=WorkerState.GARBLED)
            raise
        if not worker.admitted:
            if kind != wire.READY or not self.admit(meta, frames[1]):
                self.count_bad_message("rejected_peers", "a peer that did not present the "
                                       "pool's secret, or is not a child of its zygote")
                return
            worker.admitted = True
        worker.last_seen = now
        if kind == wire.RESULT:
            self.on_result(worker, ids, meta, frames[2:], now)
        elif kind == wire.ITEM:
            self.on_items(worker, ids, meta, frames[2:])
        elif kind == wire.END:
            self.on_end(worker, ids, meta, now)
        elif kind == wire.ERROR:
            self.on_error(worker, ids, meta, now)
        elif kind == wire.READY:
            wire.check_ready(meta)
            if worker.state == WorkerState.STARTING:
                self.on_ready(worker, meta, now)
        elif kind == wire.BYE:
            worker.become(WorkerState.STOPPING)  # it leaves: send it nothing more
            log.debug("workerpool: worker %s (pid %s) is leaving", worker.worker_id, worker.pid)
        elif kind != wire.HEARTBEAT:
            raise ProtocolError(f"unknown message kind {kind[:16]!r}")

    def count_bad_message(self, counter: str, what: str) -> None:
        self.counters[counter] += 1
        n = self.counters[counter]
        if n <= 10 or n % 1000 == 0:
            log.warning("workerpool: dropped a message (%s, %d so far): %s", counter, n, what)

    def on_ready(self, worker: WorkerSlot, meta: dict, now: float) -> None:
        worker.become(WorkerState.READY)
        worker.pid = meta["pid"]
        worker.credits = meta["credits"]
        worker.ready_at = worker.idle_since = now
        limit = self.config.max_requests_per_worker
        if limit:
            worker.retire_after = limit + random.randint(0, self.config.max_requests_jitter)
        self.boot_failures = self.start_deaths = 0
        log.info("workerpool: worker %s (pid %s) ready in %.3f s", worker.worker_id, worker.pid,
                 worker.ready_at - worker.started_at)
        if not self.started and all(w.state == WorkerState.READY
                                    for w in self.workers.values()):
            self.started = True

    def on_result(self, worker: WorkerSlot, ids: list[int], meta: dict, frames: list,
                  now: float) -> None:
        items = []

        def check(meta):
            wire.check_compute_s(meta)
            items.extend(wire.split_items(meta, frames))

        requests = self.finish_reply(worker, ids, meta, check, now)
        for request, (body, part_frames) in zip(requests, items):
            if request is not None:  # else a late answer to one already failed: dropped
                request.answered = True
                self._actions.append(Deliver(request, body, part_frames))

    def on_items(self, worker: WorkerSlot, ids: list[int], meta: dict, frames: list) -> None:
        """Items of a stream, for its consumer; dropped when it gave up (cancelled, timed
        out): the worker stops at the CANCEL it was sent."""
        items = wire.split_items(meta, frames)
        if len(set(ids)) != 1:
            raise ProtocolError(f"ITEM for several streams {sorted(set(ids))[:8]}")
        request = worker.inflight.get(ids[0])
        if request is None or request.credit is None:
            self.counters["late_replies"] += 1
            return
        request.items += len(items)
        if request.done():
            return
        for body, part_frames in items:
            self._actions.append(Item(request, body, part_frames))

    def on_end(self, worker: WorkerSlot, ids: list[int], meta: dict, now: float) -> None:
        """A stream's generator is done: its consumer has every item."""
        for request in self.finish_reply(worker, ids, meta, wire.check_end, now):
            if request is not None and not request.done():
                self._answer(request)

    def stream_credit(self, request: Request, n: int) -> list:
        """The consumer of ``request`` (a stream) took items: ``n`` more may come."""
        request.credit += n
        self._tell_stream(request, wire.stream_more(request.id, n))
        return self._take_actions()

    def cancel_stream(self, request: Request) -> list:
        """The consumer of ``request`` closed it: a queued stream is never sent, a running
        one is told to stop (its generator gets GeneratorExit) and frees its worker."""
        if self._tell_stream(request, wire.stream_cancel(request.id)):
            self.counters["cancelled_streams"] += 1
        return self._take_actions()

    def _tell_stream(self, request: Request, head: bytes) -> bool:
        """Send ``head`` (a MORE or CANCEL) to the worker running the stream ``request``;
        False when none runs it (queued: its TASK carries its credit when sent)."""
        worker = request.worker
        if worker is None or worker.inflight.get(request.id) is not request:
            return False
        self._actions.append(Send(worker, [worker.identity, head], []))
        return True

    def on_error(self, worker: WorkerSlot, ids: list[int], meta: dict, now: float) -> None:
        for request in self.finish_reply(worker, ids, meta, wire.check_error, now):
            if request is not None:
                self._answer(request, error=wire.rebuild_exception(meta))

    def finish_reply(self, worker: WorkerSlot, ids: list[int], meta: dict, check,
                     now: float) -> list[Request | None]:
        """The requests a RESULT or ERROR answers, ``ids`` (None for those already given up
        on), once ``check(meta)`` passes. A reply that fails the check still answers them,
        with ProtocolError; the check's error is raised to be counted."""
        try:
            check(meta)
        except ProtocolError as exc:
            for request in self.finish_task(worker, ids, {}, now):  # meta is not trusted
                if request is not None:
                    self._answer(request, error=ProtocolError(
                        f"worker {worker.pid} sent a malformed reply ({exc}); this is a bug "
                        "in workerpool, please report it"))
            raise
        return self.finish_task(worker, ids, meta, now)

    def finish_task(self, worker: WorkerSlot, ids: list[int], meta: dict,
                    now: float) -> list[Request | None]:
        """The requests ``ids`` name (None for those already given up on)."""
        answered(worker, ids, now)
        requests = []
        for request_id in ids:
            request = worker.inflight.pop(request_id, None)
            if request is None:
                self.counters["late_replies"] += 1
            else:
                request.worker = None
                worker.served += 1
                if request.trace is not None:
                    request.trace.update(answered=now, compute_s=meta.get("compute_s"))
            requests.append(request)
        if "compute_s" in meta:
            self.metrics.computed(meta["compute_s"], sum(r is not None for r in requests))
            self.call_seconds.append(meta["compute_s"])
        if not worker.inflight:
            worker.idle_since = now
            if worker.state == WorkerState.RETIRING:
                self.stop_worker(worker)
        return requests

    # -- what the zygote says ------------------------------------------------------------
    def on_started(self, worker_id: int, pid: int) -> list:
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.pid = pid
        return self._take_actions()

    def on_start_error(self, worker_id: int, traceback: str, now: float) -> list:
        worker = self.workers.get(worker_id)
        if worker is not None:
            self.forget(worker)
            self.on_boot_failure(f"the zygote could not start a worker:\n{traceback}", now)
        return self._take_actions()

    def on_zygote_died(self, now: float) -> list:
        """The zygote is gone, and its workers with it (they watch it and exit): their
        requests are retried, and this death does not count as an attempt against them
        (it was not theirs). No worker starts until ``on_zygote_restarted``."""
        self.zygote_up = False
        lost = 0
        for worker in list(self.workers.values()):
            self.forget(worker)
            requests = list(worker.inflight.values())
            worker.inflight.clear()
            for request in reversed(requests):
                request.worker = None
                request.attempts -= 1
                if not request.done():
                    lost += 1
                    self.retries.appendleft(request)
        self.counters["retried_requests"] += lost
        log.warning("workerpool: the worker zygote died, and its workers with it; %d requests "
                    "in flight will be retried once a new zygote has started", lost)
        if not self.may_start_workers():  # closing, with nothing left to retry
            self.mark_broken(PoolBroken("the worker zygote died while the pool was closing"))
        return self._take_actions()

    def on_zygote_restarted(self, now: float) -> list:
        """A new zygote holds the model: start the first set of workers from it (more, if
        an elastic pool has requests waiting)."""
        self.zygote_up = True
        self.counters["zygote_restarts"] += 1
        for _ in range(self.size.first_workers - len(self.live_workers())):
            self.start_worker(now)
        return self._take_actions()

    def on_zygote_lost(self, message: str) -> list:
        """No new zygote could be started, after retries: the pool is broken."""
        self.mark_broken(PoolBroken(
            f"the worker zygote died and {message}; the pool cannot start workers any more. "
            "Close it and create a new Pool (or reload it)"))
        return self._take_actions()

    def on_exit(self, worker_id: int, status: int, report: str, now: float) -> list:
        """A worker's process ended with ``status`` (a negative signal number or an exit
        code, as the zygote reaped it); ``report``: what its faulthandler left."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            self.worker_exited(worker, status, report, now)
        return self._take_actions()

    def worker_exited(self, worker: WorkerSlot, status: int, report: str,
                      now: float) -> None:
        self.forget(worker)
        if worker.state == WorkerState.STOPPING:
            # told to leave (or killed by close(drain=False)), with nothing in flight
            log.info("workerpool: worker %s (pid %s) %s", worker.worker_id, worker.pid,
                     "stopped" if status == wire.EXIT_OK else
                     f"left: {describe_exit(worker.pid, status)}")
            return
        if worker.state == WorkerState.STARTING:
            self.on_boot_failure(f"{describe_exit(worker.pid, status)} while starting" +
                                 (f":\n{report}" if report else ""), now,
                                 self_inflicted=status not in _KILLED_FROM_OUTSIDE)
            return
        if worker.state != WorkerState.ABORTED:  # we killed it for a request's deadline
            self.counters["crashes"] += 1
        description = describe_exit(worker.pid, status)
        requests = list(worker.inflight.values())
        worker.inflight.clear()
        retried = 0
        for request in reversed(requests):
            request.worker = None
            if request.done():
                continue
            what = fate(worker, request.id, request.attempts)
            if request.items:
                self._answer(request, error=crash_error(
                    worker, status, report,
                    f"{description}, after {request.items} items of this stream; a stream "
                    "partly delivered is not retried"))
            elif what is Fate.FAILED_HUNG:
                self._answer(request, error=crash_error(
                    worker, status, report, f"{worker.hang_reason}, so it was aborted"))
            elif what is Fate.FAILED_CRASHES:
                self._answer(request, error=crash_error(
                    worker, status, report,
                    f"{description}. The request was in flight on {request.attempts} workers "
                    "that died, so it is not retried again"))
            else:
                retried += 1
                self.counters["retried_requests"] += 1
                self.retries.appendleft(request)
        log.warning("workerpool: worker %s: %s%s; %d of its %d requests in flight retried%s",
                    worker.worker_id, description,
                    f" ({worker.hang_reason})" if worker.hang_reason else "", retried,
                    len(requests), f"\n{trim_report(report)}" if report else "")
        # (retiring and stopping ones were replaced already)
        if worker.state not in (WorkerState.RETIRING, WorkerState.STOPPING):
            self.replace_worker(now)

    def on_boot_failure(self, message: str, now: float, self_inflicted: bool = True) -> None:
        """A worker died before READY: restart with backoff; after several that failed by
        themselves (an import error, a crash), stop trying and mark the pool broken. A
        worker killed from outside while starting backs off the restarts but does not
        count toward broken."""
        self.start_deaths += 1
        self.boot_failures += self_inflicted
        then, delay = after_boot_failure(self.started, not self.may_start_workers(),
                                         self.boot_failures, self.start_deaths)
        if then is AfterBootFailure.START_ERROR:
            self.start_error = PoolStartError(f"a worker failed to start: {message}")
        elif then is AfterBootFailure.BROKEN:
            self.mark_broken(PoolBroken(
                f"{self.boot_failures} workers in a row failed to start, so the pool stopped "
                f"trying; the last one: {message}"))
        elif then is AfterBootFailure.RESTART:
            log.warning("workerpool: a worker failed to start (%d in a row); the next starts "
                        "in %.1f s: %s", self.start_deaths, delay, message)
            self.call_later(now, delay, self.replace_worker)

    def mark_broken(self, error: PoolBroken) -> None:
        if self.broken is None:
            log.error("workerpool: %s", error)
            self.broken = error
            self.fail_all(error)

    # -- starting, retiring, stopping, aborting workers -----------------------------------
    def start_worker(self, now: float) -> None:
        if not self.may_start_workers() or not self.zygote_up:
            return  # (a new zygote starts a full set)
        taken = {w.slot for w in self.workers.values()
                 if w.state not in (WorkerState.RETIRING, WorkerState.STOPPING)}
        free = [slot for slot in range(self.max_workers) if slot not in taken]
        worker = WorkerSlot(next(self.worker_ids), free[0] if free else 0, now=now)
        self.workers[worker.worker_id] = worker
        self.by_identity[worker.identity] = worker
        self._actions.append(StartWorker(worker.worker_id, worker.identity,
                                         self.config.cpus_for(worker.slot)))
        log.info("workerpool: starting worker %s", worker.worker_id)

    def replace_worker(self, now: float) -> None:
        if self.may_start_workers() and \
                len(self.live_workers()) < self.max_workers:  # (resize may have lowered it)
            self.counters["restarts"] += 1
            log.info("workerpool: replacing a worker")
            self.start_worker(now)

    def retire_worker(self, worker: WorkerSlot, now: float) -> None:
        """It was sent its share (max_requests_per_worker): no new work, a replacement now."""
        worker.become(WorkerState.RETIRING)
        self.counters["retired"] += 1
        log.info("workerpool: worker %s (pid %s) retires after %d requests", worker.worker_id,
                 worker.pid, worker.sent)
        self.replace_worker(now)

    def stop_worker(self, worker: WorkerSlot) -> None:
        worker.become(WorkerState.STOPPING)
        self._actions.append(Stop(worker))

    # -- elastic workers ------------------------------------------------------------------
    def live_workers(self) -> list[WorkerSlot]:
        """Workers that serve or soon will: starting, ready, or about to be replaced."""
        return [w for w in self.workers.values()
                if w.state not in (WorkerState.RETIRING, WorkerState.STOPPING)]

    def grow(self, now: float) -> None:
        """More requests wait than the workers have credit for: start workers (up to
        max_workers) until ready and starting ones have credit for all that wait. From
        zero this is the wake: a fork from the zygote, no reload. Not while starts back
        off after failures (their timer starts the next)."""
        if not self.may_start_workers() or not self.zygote_up or self.start_deaths:
            return
        live = self.live_workers()
        per_worker = self.config.credits_per_worker
        credit = ready_credit(live) + \
            per_worker * sum(w.state == WorkerState.STARTING for w in live)
        waiting = len(self.pending) + len(self.retries)
        for _ in range(min(self.max_workers - len(live), -(-(waiting - credit) // per_worker))):
            self.counters["scaled_up"] += 1
            self.start_worker(now)

    def check_idle_soon(self, now: float) -> None:
        """Set check_idle's timer, once, while the pool is elastic."""
        if self.elastic and not self.idle_checking:
            self.idle_checking = True
            self.call_later(now, min(self.size.idle_timeout / 4, 1.0), self.check_idle)

    def check_idle(self, now: float) -> None:
        """Stop workers idle for idle_timeout, the longest idle first, down to min_workers;
        enough of them stay for the requests waiting now. Again soon, while elastic."""
        self.idle_checking = False
        if self.elastic and not self.closing:
            live = self.live_workers()
            idle = sorted((w for w in live if w.state == WorkerState.READY and not w.inflight
                           and not w.isolating
                           and now - w.idle_since >= self.size.idle_timeout),
                          key=lambda w: w.idle_since)
            waiting = len(self.pending) + len(self.retries)
            credit = ready_credit(live)
            for worker in idle[:max(0, len(live) - self.min_workers)]:
                if credit - worker.credits < waiting:
                    break
                credit -= worker.credits
                log.info("workerpool: worker %s (pid %s) idle for %.1f s: stopped",
                         worker.worker_id, worker.pid, now - worker.idle_since)
                self.counters["scaled_down"] += 1
                self.stop_worker(worker)
        self.check_idle_soon(now)

    def release_idle(self, size: PoolConfig, now: float) -> tuple[list[int], list]:
        """Stop every worker holding no work, min_workers or not (a server past its memory
        budget), and from now on keep ``size`` (elastic down to zero: the next request
        wakes a worker). Returns the pids stopped and the actions."""
        self.size = size
        self.check_idle_soon(now)
        stopped = []
        if not self.closing:
            for worker in self.live_workers():
                if worker.state == WorkerState.READY and not worker.inflight \
                        and not worker.isolating:
                    self.counters["released"] += 1
                    self.stop_worker(worker)
                    stopped.append(worker.pid)
        return stopped, self._take_actions()

    def resize(self, size: PoolConfig, now: float) -> list:
        """Serve with ``size`` (at most its ``workers``, at least its ``min_workers``) from
        now on: starts what is missing; past the new most, stops idle workers first, then
        those still starting, and lets busy ones finish what they hold (nothing is lost)."""
        self.size = size
        self.check_idle_soon(now)
        live = self.live_workers()
        for _ in range(self.min_workers - len(live)):
            self.start_worker(now)
        excess = len(live) - self.max_workers
        if excess > 0:
            order = {WorkerState.READY: 0, WorkerState.STARTING: 1}
            for worker in sorted(live, key=lambda w: (bool(w.inflight),
                                                      order.get(w.state, 2)))[:excess]:
                if worker.state == WorkerState.STARTING:
                    worker.become(WorkerState.STOPPING)  # not connected: STOP cannot reach it
                    self._actions.append(Signal(worker.worker_id, signal.SIGKILL))
                elif worker.state == WorkerState.READY and worker.inflight:
                    worker.become(WorkerState.RETIRING)  # stops once its work is answered
                elif worker.state == WorkerState.READY:
                    self.stop_worker(worker)
                # (one being aborted leaves by itself; it is replaced only if needed)
        self.dispatch(now)
        return self._take_actions()

    def check_liveness(self, now: float) -> None:
        """Abort workers silent past heartbeat_timeout, or not ready after start_timeout."""
        for worker in list(self.workers.values()):
            if worker.pid is None or worker.state in (*ABORTED_STATES, WorkerState.STOPPING):
                continue
            if worker.state == WorkerState.STARTING:
                if now - worker.started_at > self.config.start_timeout:
                    self.abort_worker(worker, f"not ready after {self.config.start_timeout} s",
                                      now)
            elif self.config.heartbeat_timeout is not None and \
                    now - worker.last_seen > self.config.heartbeat_timeout:
                self.abort_worker(worker, f"worker {worker.pid} was silent for more than "
                                          f"heartbeat_timeout={self.config.heartbeat_timeout} s",
                                  now)
        self.call_later(now, self.config.heartbeat_interval, self.check_liveness)

    def expire_deadlines(self, now: float) -> None:
        """Fail requests past their deadline: unsent ones stay unsent; a running one takes
        its worker down with it (the other requests there are retried)."""
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self.deadlines)
            if request.done():
                continue
            worker = request.worker
            cost = overdue(worker, request.id, now, request.timeout)
            if cost is Overdue.UNSENT:
                if request in self.pending:
                    self.pending.remove(request)
                    self.queue_gauge.remove()
                elif request in self.retries:
                    self.retries.remove(request)
                self._answer(request, error=TaskTimeout(
                    f"the request waited {now - request.enqueued_at:.3f} s in the queue, past "
                    f"its timeout of {request.timeout} s; it was never sent to a worker"))
                continue
            self.counters["timeouts"] += 1
            if request.credit is not None:
                self.stream_timed_out(worker, request, now)
                continue
            worker.inflight.pop(request.id, None)
            request.worker = None
            if cost is Overdue.WAITING:  # its late answer is dropped
                self._answer(request, error=TaskTimeout(
                    f"the request was not answered within its timeout of {request.timeout} s"))
                continue
            if cost is Overdue.STARTED_LATE:  # its late answer is dropped
                task = worker.tasks[0]
                self._answer(request, error=TaskTimeout(
                    f"the request was not answered within its timeout of {request.timeout} s "
                    f"(it waited {task.started_at - request.enqueued_at:.3f} s for a worker)"))
                self.call_later(now, task.started_at + request.timeout - now,
                                self._abort_if_still_running(worker, task, request))
                continue
            self._answer(request, error=TaskTimeout(
                f"predict ran past the request's timeout of {request.timeout} s (in worker "
                f"{worker.pid}); the worker was aborted and is being replaced"))
            if worker.state in (WorkerState.READY, WorkerState.RETIRING):
                self.abort_worker(worker, f"a request ran past its timeout of {request.timeout} s",
                                  now, state=WorkerState.ABORTED)

    def stream_timed_out(self, worker: WorkerSlot, request: Request, now: float) -> None:
        """A stream sent to ``worker`` is past its deadline: its consumer gets TaskTimeout
        after the items it had, the generator is told to stop, and the worker is aborted
        only if it is still at it ABORT_GRACE_S later (stuck inside one item)."""
        self._answer(request, error=TaskTimeout(
            f"the stream was not done within its timeout of {request.timeout} s "
            f"({request.items} items were sent)"))
        self._tell_stream(request, wire.stream_cancel(request.id))
        for task in worker.tasks:
            if request.id in task.ids:
                self.call_later(now, ABORT_GRACE_S,
                                self._abort_if_still_running(worker, task, request))

    def _abort_if_still_running(self, worker: WorkerSlot, task: Task, request: Request):
        """A timer: abort ``worker`` if it still runs ``request``'s call, which has then
        run for the request's whole timeout."""
        def check(now: float) -> None:
            if self.workers.get(worker.worker_id) is worker and worker.state in (
                    WorkerState.READY, WorkerState.RETIRING) and \
                    still_running(worker, task, request.id):
                self.abort_worker(worker, f"predict ran past a request's timeout of "
                                          f"{request.timeout} s", now, state=WorkerState.ABORTED)
        return check

    def abort_worker(self, worker: WorkerSlot, reason: str, now: float,
                     state: WorkerState = WorkerState.HUNG) -> None:
        """SIGABRT (its faulthandler writes where it was stuck), SIGKILL after a grace."""
        self.counters[state.value] += 1
        if worker.state != WorkerState.STARTING:  # not ready: it stays a start failure
            worker.become(state)
        worker.hang_reason = reason
        log.warning("workerpool: aborting worker %s (pid %s): %s", worker.worker_id,
                    worker.pid, reason)
        self._actions.append(Signal(worker.worker_id, signal.SIGABRT))

        def kill_if_still_there(now: float) -> None:
            if self.workers.get(worker.worker_id) is worker:
                self._actions.append(Signal(worker.worker_id, signal.SIGKILL))
        self.call_later(now, ABORT_GRACE_S, kill_if_still_there)

    def forget(self, worker: WorkerSlot) -> None:
        self.workers.pop(worker.worker_id, None)
        self.by_identity.pop(worker.identity, None)

    def call_later(self, now: float, delay: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self.timers, (now + delay, next(self.timer_seq), fn))


def answered(worker: WorkerSlot, ids: list[int], now: float) -> None:
    """Strike ``ids`` off the task they belong to; a task wholly answered gives its credit
    back (the worker answers its tasks in order: it is the first, but a stray reply naming
    other ids is looked for in all of them). What runs next began ``now``."""
    for task in worker.tasks:
        if ids[0] in task.ids:
            for request_id in ids:
                if request_id in task.ids:
                    task.ids.remove(request_id)
            if not task.ids:
                worker.tasks.remove(task)
                worker.credits += task.credits
                worker.isolating = False
                if worker.tasks and worker.tasks[0].started_at is None:
                    worker.tasks[0].started_at = now
            elif task.each and task is worker.tasks[0]:
                task.started_at = now  # a chunk's next call
            return


def coalesces(batch: list[Request], each: bool) -> bool:
    """Whether a chunk's answers may come together: only where no deadline needs to know
    which call runs; a worker that hangs on such a chunk has all of it retried, each call
    alone, and the one that hangs again is then known."""
    return each and len(batch) > 1 and all(r.deadline is None for r in batch)


def mark_running(request: Request) -> bool:
    """Move a queued request's future to running; False if it was answered, cancelled by
    its caller, or has timed out."""
    if request.done():
        return False
    future = request.future
    return future.running() or future.set_running_or_notify_cancel()


def crash_error(worker: WorkerSlot, status, report: str, message: str) -> WorkerCrashed:
    if report:
        message += f".\nPython stack at the crash:\n{trim_report(report)}"
    return WorkerCrashed(message, pid=worker.pid, exitcode=status, crash_traceback=report)


def trim_report(report: str) -> str:
    """faulthandler's dump without its list of loaded extension modules."""
    return report.split("\nExtension modules:", 1)[0].strip()
