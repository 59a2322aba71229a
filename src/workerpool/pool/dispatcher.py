"""The dispatcher thread: the only owner of the ROUTER socket and of all request state.

    caller threads ── submit(Request) / call(fn) / close ──> Inbox (pool/inbox.py) ───────┐
                                                                                          ▼
    Dispatcher.run():  poll [ROUTER, inbox eventfd, zygote control socket] + timers
        ROUTER  <- READY{credits} | RESULT | ERROR | HEARTBEAT | BYE   (per worker identity)
        ROUTER  -> TASK to a ready worker with credit: one request, a batch of compatible
                   ones (pool/batching.py), or under a backlog a chunk of calls run one by
                   one; STOP to one leaving. Message layout: ipc/wire.py
        control <- started / exited{status} / start_error              (from the zygote)
        futures <- result, the remote exception, or WorkerCrashed / PoolClosed / PoolBroken

Every accepted request gets exactly one answer. A worker that dies has its in-flight
requests retried once; each retry runs alone on an idle worker (nothing else is sent there
meanwhile), so a request that kills workers (a poison pill) fails with WorkerCrashed on its
second crash without taking innocent requests down with it. A reply from a worker that was
given up on is dropped, never delivered to another request. Replacements are forked from
the zygote, which still holds the attached model: nothing is reloaded.

A request past its deadline fails with TaskTimeout: unsent if still queued; if running, its
worker is aborted and replaced and the other requests it held are retried.

A worker's life: starting -> ready -> (retiring: served max_requests | hung: silent past
heartbeat_timeout | aborted: ran past a request's deadline | garbled: sent a message that
cannot be read; all three SIGABRT, then SIGKILL) -> stopping (told to, or said BYE) -> gone.
"""

from __future__ import annotations

import collections
import heapq
import hmac
import itertools
import logging
import math
import os
import random
import signal
import threading
import time
from concurrent.futures import Future, InvalidStateError

import zmq

from ..config import PoolConfig
from ..errors import (PoolBroken, PoolClosed, PoolStartError, ProtocolError, TaskTimeout,
                      WorkerCrashed)
from ..ipc import wire
from ..ipc.codec import Codec, frame_nbytes
from .batching import Batcher
from .inbox import Inbox
from .metrics import Metrics
from .scheduling import (ABORTED_STATES, AfterBootFailure, Fate, Overdue, Task, WorkerSlot,
                         WorkerState, after_boot_failure, chunk_size, fate, overdue,
                         pick_worker)
from .supervisor import Supervisor, describe_exit

log = logging.getLogger("workerpool")

ABORT_GRACE_S = 1.0  # SIGABRT (the worker's faulthandler dumps its stack), then SIGKILL


class Request:
    __slots__ = ("id", "future", "body", "frames", "attempts", "batch_key", "rows",
                 "enqueued_at", "deadline", "timeout", "worker")

    def __init__(self, request_id: int, future: Future, body: bytes, frames: list, *,
                 batch_key: tuple | None = None, rows: int = 1, timeout: float | None = None):
        self.id = request_id
        self.future = future
        self.body = body
        self.frames = frames
        self.attempts = 0
        self.batch_key = batch_key
        self.rows = rows
        self.enqueued_at = time.monotonic()
        self.timeout = timeout
        self.deadline = None if timeout is None else self.enqueued_at + timeout
        self.worker: WorkerSlot | None = None  # where it is in flight

    @property
    def nbytes(self) -> int:
        """Bytes it takes in a TASK; only the batcher asks (not every submit pays for it)."""
        return len(self.body) + sum(frame_nbytes(f) for f in self.frames)


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


class Dispatcher(threading.Thread):
    def __init__(self, config: PoolConfig, supervisor: Supervisor, endpoint: str,
                 codec: Codec, on_exit=None):
        super().__init__(name="workerpool-dispatcher", daemon=True)
        self.on_exit = on_exit  # called last, on this thread (releases the pool)
        self.config = config
        self.supervisor = supervisor
        self.endpoint = endpoint
        self.codec = codec
        self.inbox = Inbox()
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self.broken: PoolBroken | None = None
        self.closing = False
        self.pending: collections.deque[Request] = collections.deque()
        self.retries: collections.deque[Request] = collections.deque()  # from dead workers
        self.workers: dict[int, WorkerSlot] = {}  # worker id -> slot
        self.by_identity: dict[bytes, WorkerSlot] = {}
        self.worker_ids = itertools.count(1)
        self.boot_failures = 0  # in a row: workers that failed by themselves before READY
        self.start_deaths = 0  # in a row: workers that died before READY, for any reason
        self.timers: list[tuple[float, int, object]] = []
        self.timer_seq = itertools.count()
        self.counters = collections.Counter()  # restarts, crashes, hung, retired, ...
        self.router: zmq.Socket | None = None
        # A TASK must fit the worker's message size limit, whatever the rows say.
        self.batcher = Batcher(config.max_batch_size if config.batched else 1,
                               config.max_wait_ms / 1000, max_bytes=config.max_message_bytes)
        self.queue_gauge = QueueGauge()
        self.deadlines: list[tuple[float, int, Request]] = []
        self.batch_wake_at: float | None = None
        self.metrics = Metrics()

    # -- called from other threads -------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Hand over a request; PoolClosed once the thread has stopped taking them."""
        self.inbox.post(request)

    def call(self, fn, timeout: float | None = None):
        """Run ``fn()`` on the dispatcher thread and return its result."""
        future: Future = Future()
        self.inbox.post((fn, future))
        return future.result(timeout)

    def request_close(self, drain: bool) -> None:
        """Accept nothing more; ``drain``: finish accepted work, else fail it (PoolClosed)."""
        try:
            self.inbox.post(_Close(drain))
        except PoolClosed:
            pass

    def stop_accepting(self) -> None:
        """Last act of the thread: refuse new items and answer those still in the inbox."""
        for item in self.inbox.close():
            if isinstance(item, Request):
                self.queue_gauge.remove()
                settle(item.future, error=self.broken or PoolClosed("the pool is closed"))
            elif isinstance(item, tuple):
                settle(item[1], error=PoolClosed("the pool is closed"))

    # -- the thread ----------------------------------------------------------------------
    def run(self) -> None:
        context = zmq.Context(io_threads=1)
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + 1024 * 1024)
        self.router.bind(self.endpoint)
        try:
            for _ in range(self.config.workers):
                self.start_worker()
            self.call_later(self.config.heartbeat_interval, self.check_liveness)
            self.loop()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self.fail_everything(PoolBroken(f"the pool's dispatcher failed: {exc!r}"))
            if not self.started.is_set():  # nor Pool() waiting out start_timeout
                self.start_error = PoolStartError(f"the pool's dispatcher failed: {exc!r}")
                self.started.set()
            raise
        finally:
            self.stop_accepting()
            self.shutdown_workers()
            self.router.close(linger=0)
            context.term()
            self.inbox.release()
            if self.on_exit is not None:
                self.on_exit()

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.inbox.fd, zmq.POLLIN)
        control_fd = self.supervisor.control_fd
        poller.register(control_fd, zmq.POLLIN)
        while not self.finished():
            events = dict(poller.poll(self.poll_timeout_ms()))
            if self.router in events:
                self.read_workers()
            if control_fd in events:
                event = self.supervisor.read_event()
                if event["op"] == "zygote_died":
                    poller.unregister(control_fd)  # EOF would stay readable forever
                    control_fd = -1
                self.handle_supervisor_event(event)
            if self.inbox.fd in events:
                self.read_inbox()
            self.run_due_timers()
            self.expire_deadlines()
            self.dispatch()

    def finished(self) -> bool:
        if self.start_error is not None:
            return True
        return self.closing and not self.pending and not self.retries and not any(
            w.inflight for w in self.workers.values())

    def poll_timeout_ms(self) -> int | None:
        due = [t for t in (self.timers and self.timers[0][0],
                           self.deadlines and self.deadlines[0][0], self.batch_wake_at) if t]
        if not due:
            return None
        return max(0, math.ceil((min(due) - time.monotonic()) * 1000))

    # -- inbox: requests and commands from callers ----------------------------------------
    def read_inbox(self) -> None:
        for item in self.inbox.drain():
            if isinstance(item, Request):
                if self.broken is not None:
                    settle(item.future, error=self.broken)
                elif self.closing:
                    settle(item.future, error=PoolClosed("the pool is closed"))
                else:
                    self.pending.append(item)
                    if item.deadline is not None:
                        heapq.heappush(self.deadlines, (item.deadline, item.id, item))
                    continue
                self.queue_gauge.remove()
            elif isinstance(item, _Close):
                self.closing = True
                if not item.drain:
                    self.abort_everything()
            else:
                fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                    future.set_exception(exc)

    # -- sending work --------------------------------------------------------------------
    def dispatch(self) -> None:
        while self.retries:
            worker = self.pick_worker(idle=True)
            if worker is None:
                break
            request = self.retries.popleft()
            if not request.future.done():
                worker.isolating = self.send(worker, [request])
        self.batch_wake_at = None
        while self.pending:
            worker = self.pick_worker(idle=False)
            if worker is None:
                return
            batch, wake_at = self.batcher.take(self.pending, time.monotonic(),
                                               chunk=chunk_size(self.workers.values(),
                                                                len(self.pending), worker))
            if not batch:
                self.batch_wake_at = wake_at  # the head waits for company until then
                return
            self.queue_gauge.remove(len(batch))
            each = not self.batcher.together(batch)
            batch = [request for request in batch if mark_running(request.future)]
            if batch:
                self.send(worker, batch, each)

    def send(self, worker: WorkerSlot, batch: list[Request], each: bool = False) -> bool:
        """Send one TASK; False (and the requests queued again) if the worker is gone."""
        now = time.monotonic()  # before sending: the send itself is not queueing
        ids = [r.id for r in batch]
        # Answers may come together only where no deadline needs to know which call runs;
        # a worker that hangs on such a chunk has all of it retried, each call alone, and
        # the one that hangs again is then known.
        coalesce = each and len(batch) > 1 and all(r.deadline is None for r in batch)
        try:
            wire.send(self.router, [worker.identity, *wire.task(
                ids, [(r.body, r.frames) for r in batch], each, coalesce)])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # Its connection is gone; the zygote will report the exit shortly.
            worker.credits = 0
            self.retries.extendleft(reversed(batch))
            return False
        worker.last_sent = now
        for request in batch:
            request.attempts += 1
            request.worker = worker
            worker.inflight[request.id] = request
            self.metrics.queued(now - request.enqueued_at)
        worker.tasks.append(Task(list(ids), each, coalesce))
        worker.credits -= 1
        worker.sent += len(batch)
        if worker.retire_after and worker.sent >= worker.retire_after:
            self.retire_worker(worker)  # it has its share: nothing more is sent to it
        if each:  # a chunk: a predict call each
            for request in batch:
                self.metrics.batch(request.rows)
        else:
            self.metrics.batch(sum(r.rows for r in batch))
        return True

    def pick_worker(self, idle: bool) -> WorkerSlot | None:
        return pick_worker(self.workers.values(), idle)

    # -- what workers say ----------------------------------------------------------------
    def read_workers(self) -> None:
        while True:
            try:
                # The head as a zmq Frame: admission asks it for the peer's credentials.
                frames = wire.recv(self.router, zmq.NOBLOCK, copied=1)
            except zmq.Again:
                return
            try:
                self.on_message(frames)
            except ProtocolError as exc:
                self.count_bad_message("malformed_messages", str(exc))

    def on_message(self, frames: list) -> None:
        """One message from a peer. Only a worker we started, admitted by the secret in
        its READY, is read any further: nothing from another peer is ever unpickled."""
        worker = self.by_identity.get(frames[0])
        if worker is None:
            self.counters["late_replies"] += 1  # from a worker we buried, or a stranger
            return
        if len(frames) < 2:
            raise ProtocolError(f"a message of {len(frames)} frames")
        try:
            kind, meta = wire.read_head(frames[1])
            ids = wire.reply_ids(meta) if kind in (wire.RESULT, wire.ERROR) else None
        except ProtocolError as exc:
            if worker.admitted and worker.state in (WorkerState.READY, WorkerState.RETIRING):
                # Which requests it answered cannot be known: rather than leave them in
                # flight until their deadline (or forever), replace the worker; its
                # requests are retried like a crash's.
                self.abort_worker(worker, f"it sent a message the pool cannot read ({exc})",
                                  state=WorkerState.GARBLED)
            raise
        if not worker.admitted:
            if kind != wire.READY or not self.admit(worker, meta, frames[1]):
                self.count_bad_message("rejected_peers", "a peer that did not present the "
                                       "pool's secret, or is not a child of its zygote")
                return
        worker.last_seen = time.monotonic()
        if kind == wire.RESULT:
            self.on_result(worker, ids, meta, frames[2:])
        elif kind == wire.ERROR:
            self.on_error(worker, ids, meta)
        elif kind == wire.READY:
            wire.check_ready(meta)
            if worker.state == WorkerState.STARTING:
                self.on_ready(worker, meta)
        elif kind == wire.BYE:
            worker.become(WorkerState.STOPPING)  # it leaves: send it nothing more
            log.debug("workerpool: worker %s (pid %s) is leaving", worker.worker_id, worker.pid)
        elif kind != wire.HEARTBEAT:
            raise ProtocolError(f"unknown message kind {kind[:16]!r}")

    def admit(self, worker: WorkerSlot, meta: dict, frame) -> bool:
        """READY from a process the pool started: the right secret (compared in constant
        time) and, where ZeroMQ tells the peer's credentials, our uid and a zygote child."""
        wire.check_ready(meta)
        if not hmac.compare_digest(meta["secret"], self.supervisor.secret):
            return False
        peer = peer_credentials(frame)
        if peer is not None:
            uid, pid = peer
            if uid != os.getuid() or pid != meta["pid"] or \
                    parent_pid(pid) != self.supervisor.zygote_pid:
                return False
        worker.admitted = True
        return True

    def count_bad_message(self, counter: str, what: str) -> None:
        self.counters[counter] += 1
        n = self.counters[counter]
        if n <= 10 or n % 1000 == 0:
            log.warning("workerpool: dropped a message (%s, %d so far): %s", counter, n, what)

    def on_ready(self, worker: WorkerSlot, meta: dict) -> None:
        worker.become(WorkerState.READY)
        worker.pid = meta["pid"]
        worker.credits = meta["credits"]
        worker.ready_at = time.monotonic()
        limit = self.config.max_requests_per_worker
        if limit:
            worker.retire_after = limit + random.randint(0, self.config.max_requests_jitter)
        self.boot_failures = self.start_deaths = 0
        log.info("workerpool: worker %s (pid %s) ready in %.3f s", worker.worker_id, worker.pid,
                 worker.ready_at - worker.started_at)
        if not self.started.is_set() and all(
                w.state == WorkerState.READY for w in self.workers.values()):
            self.started.set()

    def finish_reply(self, worker: WorkerSlot, ids: list[int], meta: dict,
                     check) -> list[Request | None]:
        """The requests a RESULT or ERROR answers, ``ids`` (None for those already given up
        on), once ``check(meta)`` passes. A reply that fails the check still answers them,
        with ProtocolError; the check's error is raised to be counted."""
        try:
            check(meta)
        except ProtocolError as exc:
            for request in self.finish_task(worker, ids, {}):  # nothing of meta is trusted
                if request is not None:
                    settle(request.future, error=ProtocolError(
                        f"worker {worker.pid} sent a malformed reply ({exc}); this is a bug "
                        "in workerpool, please report it"))
            raise
        return self.finish_task(worker, ids, meta)

    def finish_task(self, worker: WorkerSlot, ids: list[int],
                    meta: dict) -> list[Request | None]:
        """The requests ``ids`` name (None for those already given up on)."""
        self.answered(worker, ids)
        requests = []
        for request_id in ids:
            request = worker.inflight.pop(request_id, None)
            if request is None:
                self.counters["late_replies"] += 1
            else:
                request.worker = None
                worker.served += 1
            requests.append(request)
        if "compute_s" in meta:
            self.metrics.computed(meta["compute_s"], sum(r is not None for r in requests))
        if worker.state == WorkerState.RETIRING and not worker.inflight:
            self.stop_worker(worker)
        return requests

    @staticmethod
    def answered(worker: WorkerSlot, ids: list[int]) -> None:
        """Strike ``ids`` off the task they belong to; a task wholly answered gives its
        credit back (the worker answers its tasks in order: it is the first, but a stray
        reply naming other ids is looked for in all of them)."""
        for task in worker.tasks:
            if ids[0] in task.ids:
                for request_id in ids:
                    if request_id in task.ids:
                        task.ids.remove(request_id)
                if not task.ids:
                    worker.tasks.remove(task)
                    worker.credits += 1
                    worker.isolating = False
                return

    def on_result(self, worker: WorkerSlot, ids: list[int], meta: dict, frames: list) -> None:
        items = []

        def check(meta):
            wire.check_compute_s(meta)
            items.extend(wire.split_items(meta, frames))

        requests = self.finish_reply(worker, ids, meta, check)
        for request, (body, part_frames) in zip(requests, items):
            if request is None:
                continue  # a late answer to a request already failed: never re-deliver
            try:
                value = self.codec.decode(body, part_frames)
            except BaseException as exc:  # noqa: BLE001
                settle(request.future, error=exc)
            else:
                settle(request.future, value)

    def on_error(self, worker: WorkerSlot, ids: list[int], meta: dict) -> None:
        for request in self.finish_reply(worker, ids, meta, wire.check_error):
            if request is not None:
                settle(request.future, error=wire.rebuild_exception(meta))

    # -- what the zygote says ------------------------------------------------------------
    def handle_supervisor_event(self, event: dict) -> None:
        op = event["op"]
        worker = self.workers.get(event.get("worker_id"))
        if op == "started" and worker is not None:
            worker.pid = event["pid"]
        elif op == "exited" and worker is not None:
            self.on_worker_exit(worker, event["status"])
        elif op == "start_error" and worker is not None:
            self.forget(worker)
            self.on_boot_failure(f"the zygote could not start a worker:\n{event['traceback']}")
        elif op == "zygote_died":
            self.mark_broken(PoolBroken(
                "the worker zygote died; the pool cannot start workers any more. Close it "
                "and create a new Pool"))
            for worker in list(self.workers.values()):
                self.on_worker_exit(worker, None)

    def on_worker_exit(self, worker: WorkerSlot, status: int | None) -> None:
        self.forget(worker)
        report = self.supervisor.crash_report(worker.worker_id)
        if worker.state == WorkerState.STOPPING:
            # told to leave (or killed by close(drain=False)), with nothing in flight
            log.info("workerpool: worker %s (pid %s) left: %s", worker.worker_id, worker.pid,
                     describe_exit(worker.pid, status))
            return
        if worker.state == WorkerState.STARTING:
            self.on_boot_failure(f"{describe_exit(worker.pid, status)} while starting" +
                                 (f":\n{report}" if report else ""),
                                 self_inflicted=status not in _KILLED_FROM_OUTSIDE)
            return
        if worker.state != WorkerState.ABORTED:  # we killed it for a request's deadline
            self.counters["crashes"] += 1
        description = describe_exit(worker.pid, status)
        requests = list(worker.inflight.values())
        fates = {request.id: fate(worker, request.id, request.attempts) for request in requests}
        worker.inflight.clear()
        for request in reversed(requests):
            request.worker = None
            if fates[request.id] is Fate.FAILED_HUNG:
                settle(request.future, error=self.crash_error(
                    worker, status, report, f"{worker.hang_reason}, so it was aborted"))
            elif fates[request.id] is Fate.FAILED_CRASHES:
                settle(request.future, error=self.crash_error(
                    worker, status, report,
                    f"{description}. The request was in flight on {request.attempts} workers "
                    "that died, so it is not retried again"))
            else:
                self.counters["retried_requests"] += 1
                self.retries.appendleft(request)
        retried = sum(not r.future.done() for r in requests)
        log.warning("workerpool: worker %s %s%s; %d of its %d requests in flight retried%s",
                    worker.worker_id, description,
                    f" ({worker.hang_reason})" if worker.hang_reason else "", retried,
                    len(requests), f"\n{_trim_report(report)}" if report else "")
        # (retiring and stopping ones were replaced already)
        if worker.state not in (WorkerState.RETIRING, WorkerState.STOPPING):
            self.replace_worker()

    @staticmethod
    def crash_error(worker: WorkerSlot, status, report: str, message: str) -> WorkerCrashed:
        if report:
            message += f".\nPython stack at the crash:\n{_trim_report(report)}"
        return WorkerCrashed(message, pid=worker.pid, exitcode=status, crash_traceback=report)

    def on_boot_failure(self, message: str, self_inflicted: bool = True) -> None:
        """A worker died before READY: restart with backoff; after several that failed by
        themselves (an import error, a crash), stop trying and mark the pool broken. A
        worker killed from outside while starting backs off the restarts but does not
        count toward broken."""
        self.start_deaths += 1
        self.boot_failures += self_inflicted
        then, delay = after_boot_failure(self.started.is_set(), self.closing,
                                         self.boot_failures, self.start_deaths)
        if then is AfterBootFailure.START_ERROR:
            self.start_error = PoolStartError(f"a worker failed to start: {message}")
            self.started.set()
        elif then is AfterBootFailure.BROKEN:
            self.mark_broken(PoolBroken(
                f"{self.boot_failures} workers in a row failed to start, so the pool stopped "
                f"trying; the last one: {message}"))
        elif then is AfterBootFailure.RESTART:
            log.warning("workerpool: a worker failed to start (%d in a row); the next starts "
                        "in %.1f s: %s", self.start_deaths, delay, message)
            self.call_later(delay, self.replace_worker)

    def mark_broken(self, error: PoolBroken) -> None:
        if self.broken is None:
            log.error("workerpool: %s", error)
            self.broken = error
            self.fail_everything(error)

    def fail_everything(self, error: BaseException) -> None:
        while self.retries:
            settle(self.retries.popleft().future, error=error)
        self.queue_gauge.remove(len(self.pending))
        while self.pending:
            settle(self.pending.popleft().future, error=error)
        for worker in self.workers.values():
            for request in worker.inflight.values():
                settle(request.future, error=error)
            worker.inflight.clear()

    def abort_everything(self) -> None:
        """close(drain=False): every unanswered request fails; workers are killed, since
        any of them may be running a request that was just failed."""
        self.fail_everything(PoolClosed("the pool was closed before this request finished"))
        for worker in self.workers.values():
            worker.become(WorkerState.STOPPING)
            self.supervisor.signal_worker(worker.worker_id, signal.SIGKILL)

    # -- starting, retiring, stopping, aborting workers -----------------------------------
    def start_worker(self) -> None:
        if self.closing or self.broken is not None:
            return
        taken = {w.slot for w in self.workers.values()
                 if w.state not in (WorkerState.RETIRING, WorkerState.STOPPING)}
        free = [slot for slot in range(self.config.workers) if slot not in taken]
        worker = WorkerSlot(next(self.worker_ids), free[0] if free else 0)
        self.workers[worker.worker_id] = worker
        self.by_identity[worker.identity] = worker
        self.supervisor.start_worker(worker.worker_id, worker.identity,
                                     self.config.cpus_for(worker.slot))
        log.info("workerpool: starting worker %s", worker.worker_id)

    def replace_worker(self) -> None:
        if not self.closing and self.broken is None:
            self.counters["restarts"] += 1
            log.info("workerpool: replacing a worker")
            self.start_worker()

    def retire_worker(self, worker: WorkerSlot) -> None:
        """It was sent its share (max_requests_per_worker): no new work, a replacement now."""
        worker.become(WorkerState.RETIRING)
        self.counters["retired"] += 1
        log.info("workerpool: worker %s (pid %s) retires after %d requests", worker.worker_id,
                 worker.pid, worker.sent)
        self.replace_worker()

    def stop_worker(self, worker: WorkerSlot) -> None:
        worker.become(WorkerState.STOPPING)
        try:
            wire.send(self.router, [worker.identity, wire.head(wire.STOP, {})], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # gone already; the zygote reports its exit

    def check_liveness(self) -> None:
        """Abort workers silent past heartbeat_timeout, or not ready after start_timeout."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.pid is None or worker.state in (*ABORTED_STATES, WorkerState.STOPPING):
                continue
            if worker.state == WorkerState.STARTING:
                if now - worker.started_at > self.config.start_timeout:
                    self.abort_worker(worker, f"not ready after {self.config.start_timeout} s")
            elif self.config.heartbeat_timeout is not None and \
                    now - worker.last_seen > self.config.heartbeat_timeout:
                self.abort_worker(worker, f"worker {worker.pid} was silent for more than "
                                          f"heartbeat_timeout={self.config.heartbeat_timeout} s")
        self.call_later(self.config.heartbeat_interval, self.check_liveness)

    def expire_deadlines(self) -> None:
        """Fail requests past their deadline: unsent ones stay unsent; a running one takes
        its worker down with it (the other requests there are retried)."""
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, request = heapq.heappop(self.deadlines)
            if request.future.done():
                continue
            worker = request.worker
            cost = overdue(worker, request.id)
            if cost is Overdue.UNSENT:
                if request in self.pending:
                    self.pending.remove(request)
                    self.queue_gauge.remove()
                elif request in self.retries:
                    self.retries.remove(request)
                settle(request.future, error=TaskTimeout(
                    f"the request waited {now - request.enqueued_at:.3f} s in the queue, past "
                    f"its timeout of {request.timeout} s; it was never sent to a worker"))
                continue
            worker.inflight.pop(request.id, None)
            request.worker = None
            self.counters["timeouts"] += 1
            if cost is Overdue.WAITING:  # its late answer is dropped
                settle(request.future, error=TaskTimeout(
                    f"the request was not answered within its timeout of {request.timeout} s"))
                continue
            settle(request.future, error=TaskTimeout(
                f"predict ran past the request's timeout of {request.timeout} s (in worker "
                f"{worker.pid}); the worker was aborted and is being replaced"))
            if worker.state in (WorkerState.READY, WorkerState.RETIRING):
                self.abort_worker(worker, f"a request ran past its timeout of {request.timeout} s",
                                  state=WorkerState.ABORTED)

    def abort_worker(self, worker: WorkerSlot, reason: str,
                     state: WorkerState = WorkerState.HUNG) -> None:
        """SIGABRT (its faulthandler writes where it was stuck), SIGKILL after a grace."""
        self.counters[state.value] += 1
        if worker.state != WorkerState.STARTING:  # not ready: it stays a start failure
            worker.become(state)
        worker.hang_reason = reason
        log.warning("workerpool: aborting worker %s (pid %s): %s", worker.worker_id,
                    worker.pid, reason)
        self.supervisor.signal_worker(worker.worker_id, signal.SIGABRT)

        def kill_if_still_there():
            if self.workers.get(worker.worker_id) is worker:
                self.supervisor.signal_worker(worker.worker_id, signal.SIGKILL)
        self.call_later(ABORT_GRACE_S, kill_if_still_there)

    def forget(self, worker: WorkerSlot) -> None:
        self.workers.pop(worker.worker_id, None)
        self.by_identity.pop(worker.identity, None)

    def shutdown_workers(self) -> None:
        """STOP every worker, then let the zygote reap them and exit. A worker still
        starting may not be connected yet, so a STOP could never reach it: kill it."""
        for worker in self.workers.values():
            if worker.state == WorkerState.STARTING:
                self.supervisor.signal_worker(worker.worker_id, signal.SIGKILL)
            else:
                self.stop_worker(worker)
        self.supervisor.stop_zygote(grace=self.config.close_timeout)

    # -- timers --------------------------------------------------------------------------
    def call_later(self, delay: float, fn) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_seq), fn))

    def run_due_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn()


# Deaths before READY that say nothing about the worker's own code.
_KILLED_FROM_OUTSIDE = (-signal.SIGKILL, -signal.SIGTERM, None)


class _Close:
    __slots__ = ("drain",)

    def __init__(self, drain: bool):
        self.drain = drain


def mark_running(future: Future) -> bool:
    """Move a queued future to running; False if it was cancelled or has timed out."""
    if future.done():
        return False
    return future.running() or future.set_running_or_notify_cancel()


def settle(future: Future, value=None, error: BaseException | None = None) -> None:
    """Give a future its one answer; a future already answered (timed out, cancelled by
    its caller) keeps the answer it has."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


def peer_credentials(frame) -> tuple[int, int] | None:
    """(uid, pid) of the process at the other end of an ipc connection, where ZeroMQ
    reports them ("Peer-Address" is "host:uid:gid:pid" on Linux); else None."""
    try:
        fields = frame.get("Peer-Address").rsplit(":", 3)
        return int(fields[1]), int(fields[3])
    except (zmq.ZMQError, AttributeError, ValueError, IndexError):
        return None


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _trim_report(report: str) -> str:
    """faulthandler's dump without its list of loaded extension modules."""
    return report.split("\nExtension modules:", 1)[0].strip()
