"""The dispatcher thread: the only owner of the ROUTER socket and of all request state.

    caller threads ── submit(Request) / call(fn) / close ──> SimpleQueue + eventfd wake-up ─┐
                                                                                          ▼
    Dispatcher.run():  poll [ROUTER, wake eventfd, zygote control socket] + timers
        ROUTER  <- READY{credits} | RESULT | ERROR | HEARTBEAT | BYE   (per worker identity)
        ROUTER  -> TASK to a ready worker with credit; STOP to one leaving
        control <- started / exited{status} / start_error              (from the zygote)
        futures <- result, the remote exception, or WorkerCrashed / PoolClosed / PoolBroken

Every accepted request gets exactly one answer. A worker that dies has its in-flight
requests retried once; each retry runs alone on an idle worker (nothing else is sent there
meanwhile), so a request that kills workers (a poison pill) fails with WorkerCrashed on its
second crash without taking innocent requests down with it. A reply from a worker that was
given up on is dropped, never delivered to another request. Replacements are forked from
the zygote, which still holds the attached model: nothing is reloaded.

A worker's life: starting -> ready -> (retiring: served max_requests | hung: silent past
heartbeat_timeout, SIGABRT then SIGKILL) -> stopping -> gone.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import pickle
import queue
import random
import signal
import threading
import time
from concurrent.futures import Future

import zmq

from ..config import PoolConfig
from ..errors import (PoolBroken, PoolClosed, PoolStartError, ProtocolError, RemoteError,
                      RemoteTraceback, WorkerCrashed)
from ..ipc import protocol
from ..ipc.codec import Codec
from .supervisor import Supervisor, describe_exit

MAX_ATTEMPTS = 2  # a request that was in flight on this many dying workers fails
BOOT_FAILURES_BEFORE_BROKEN = 3
RESTART_BACKOFF_S = (0.0, 0.1, 0.5, 2.0)
ABORT_GRACE_S = 1.0  # SIGABRT (the worker's faulthandler dumps its stack), then SIGKILL


class Request:
    __slots__ = ("id", "future", "body", "frames", "attempts")

    def __init__(self, request_id: int, future: Future, body: bytes, frames: list):
        self.id = request_id
        self.future = future
        self.body = body
        self.frames = frames
        self.attempts = 0


class WorkerSlot:
    """The dispatcher's view of one worker process."""

    __slots__ = ("worker_id", "identity", "pid", "credits", "inflight", "served", "state",
                 "started_at", "ready_at", "last_seen", "isolating", "retire_after",
                 "hang_reason")

    def __init__(self, worker_id: int):
        self.worker_id = worker_id
        self.identity = b"%d" % worker_id
        self.pid: int | None = None
        self.credits = 0
        self.inflight: dict[int, Request] = {}  # in send order: the first one is running
        self.served = 0
        self.state = "starting"
        self.started_at = self.last_seen = time.monotonic()
        self.ready_at: float | None = None
        self.isolating = False  # running a retried request alone
        self.retire_after: int | None = None
        self.hang_reason = ""


class Dispatcher(threading.Thread):
    def __init__(self, config: PoolConfig, supervisor: Supervisor, endpoint: str,
                 codec: Codec):
        super().__init__(name="workerpool-dispatcher", daemon=True)
        self.config = config
        self.supervisor = supervisor
        self.endpoint = endpoint
        self.codec = codec
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self.broken: BaseException | None = None
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

    # -- called from other threads -------------------------------------------------------
    def submit(self, request: Request) -> None:
        self._post(request)

    def call(self, fn, timeout: float | None = None):
        """Run ``fn()`` on the dispatcher thread and return its result."""
        future: Future = Future()
        self._post((fn, future))
        return future.result(timeout)

    def request_close(self, drain: bool) -> None:
        """Accept nothing more; ``drain``: finish accepted work, else fail it (PoolClosed)."""
        self._post(_Close(drain))

    def _post(self, item) -> None:
        self.inbox.put(item)
        os.eventfd_write(self.wake_fd, 1)

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
            raise
        finally:
            self.shutdown_workers()
            self.router.close(linger=0)
            context.term()
            os.close(self.wake_fd)

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_fd, zmq.POLLIN)
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
            if self.wake_fd in events:
                self.read_inbox()
            self.run_due_timers()
            self.dispatch()

    def finished(self) -> bool:
        if self.start_error is not None:
            return True
        return self.closing and not self.pending and not self.retries and not any(
            w.inflight for w in self.workers.values())

    def poll_timeout_ms(self) -> int | None:
        if not self.timers:
            return None
        return max(0, int((self.timers[0][0] - time.monotonic()) * 1000) + 1)

    # -- inbox: requests and commands from callers ----------------------------------------
    def read_inbox(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Request):
                if self.broken is not None:
                    item.future.set_exception(self.broken)
                elif self.closing:
                    item.future.set_exception(PoolClosed("the pool is closed"))
                else:
                    self.pending.append(item)
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
            worker.isolating = self.send(worker, self.retries.popleft())
        while self.pending:
            worker = self.pick_worker(idle=False)
            if worker is None:
                return
            request = self.pending.popleft()
            if mark_running(request.future):
                self.send(worker, request)

    def send(self, worker: WorkerSlot, request: Request) -> bool:
        """Send one TASK; False (and the request queued again) if the worker is gone."""
        try:
            self.router.send_multipart(
                [worker.identity, protocol.TASK, protocol.pack_meta({"id": request.id}),
                 request.body, *request.frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # Its connection is gone; the zygote will report the exit shortly.
            worker.credits = 0
            (self.retries if request.attempts else self.pending).appendleft(request)
            return False
        request.attempts += 1
        worker.credits -= 1
        worker.inflight[request.id] = request
        return True

    def pick_worker(self, idle: bool) -> WorkerSlot | None:
        """The ready worker with the most credit; with ``idle``, one running nothing."""
        best = None
        for worker in self.workers.values():
            if worker.state != "ready" or worker.isolating or worker.credits <= 0:
                continue
            if idle and worker.inflight:
                continue
            if best is None or worker.credits > best.credits:
                best = worker
        return best

    # -- what workers say ----------------------------------------------------------------
    def read_workers(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            worker = self.by_identity.get(frames[0].bytes)
            if worker is None or len(frames) < 3:
                self.counters["late_replies"] += 1  # from a worker we already buried
                continue
            worker.last_seen = time.monotonic()
            kind = frames[1].bytes
            try:
                meta = protocol.unpack_meta(frames[2])
            except ProtocolError:
                continue
            if kind == protocol.RESULT:
                self.on_result(worker, meta, frames[3], frames[4:])
            elif kind == protocol.ERROR:
                self.on_error(worker, meta)
            elif kind == protocol.READY:
                self.on_ready(worker, meta)

    def on_ready(self, worker: WorkerSlot, meta: dict) -> None:
        worker.state = "ready"
        worker.pid = meta.get("pid", worker.pid)
        worker.credits = int(meta.get("credits", 1))
        worker.ready_at = time.monotonic()
        limit = self.config.max_requests_per_worker
        if limit:
            worker.retire_after = limit + random.randint(0, self.config.max_requests_jitter)
        self.boot_failures = self.start_deaths = 0
        if not self.started.is_set() and all(
                w.state == "ready" for w in self.workers.values()):
            self.started.set()

    def take_inflight(self, worker: WorkerSlot, meta: dict) -> Request | None:
        request = worker.inflight.pop(meta.get("id"), None)
        if request is None:
            self.counters["late_replies"] += 1
            return None
        worker.credits += 1
        worker.served += 1
        worker.isolating = False
        if worker.retire_after and worker.served >= worker.retire_after \
                and worker.state == "ready":
            self.retire_worker(worker)
        if worker.state == "retiring" and not worker.inflight:
            self.stop_worker(worker)
        return request

    def on_result(self, worker: WorkerSlot, meta: dict, body, frames: list) -> None:
        request = self.take_inflight(worker, meta)
        if request is None:
            return  # a late answer to a request already failed elsewhere: never re-deliver
        try:
            value = self.codec.decode(body.bytes, frames)
        except BaseException as exc:  # noqa: BLE001
            request.future.set_exception(exc)
        else:
            request.future.set_result(value)

    def on_error(self, worker: WorkerSlot, meta: dict) -> None:
        request = self.take_inflight(worker, meta)
        if request is not None:
            request.future.set_exception(rebuild_exception(meta))

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
        if worker.state == "stopping":
            return  # told to leave (or killed by close(drain=False)), with nothing in flight
        if worker.state == "starting":
            self.on_boot_failure(f"{describe_exit(worker.pid, status)} while starting" +
                                 (f":\n{report}" if report else ""),
                                 self_inflicted=status not in _KILLED_FROM_OUTSIDE)
            return
        self.counters["crashes"] += 1
        description = describe_exit(worker.pid, status)
        requests = list(worker.inflight.values())
        worker.inflight.clear()
        if worker.state == "hung" and requests:
            # The running request is the one that hung: running it again would hang again.
            running = requests.pop(0)
            running.future.set_exception(self.crash_error(
                worker, status, report, f"{worker.hang_reason}, so it was aborted"))
        for request in reversed(requests):
            if request.attempts >= MAX_ATTEMPTS:
                request.future.set_exception(self.crash_error(
                    worker, status, report,
                    f"{description}. The request was in flight on {request.attempts} workers "
                    "that died, so it is not retried again"))
            else:
                self.counters["retried_requests"] += 1
                self.retries.appendleft(request)
        if worker.state not in ("retiring", "stopping"):  # those were replaced already
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
        if not self.started.is_set():
            self.start_error = PoolStartError(f"a worker failed to start: {message}")
            self.started.set()
        elif self.boot_failures >= BOOT_FAILURES_BEFORE_BROKEN:
            self.mark_broken(PoolBroken(
                f"{self.boot_failures} workers in a row failed to start, so the pool stopped "
                f"trying; the last one: {message}"))
        elif not self.closing:
            delay = RESTART_BACKOFF_S[min(self.start_deaths, len(RESTART_BACKOFF_S)) - 1]
            self.call_later(delay, self.replace_worker)

    def mark_broken(self, error: BaseException) -> None:
        if self.broken is None:
            self.broken = error
            self.fail_everything(error)

    def fail_everything(self, error: BaseException) -> None:
        while self.retries:
            self.retries.popleft().future.set_exception(error)
        while self.pending:
            request = self.pending.popleft()
            if mark_running(request.future):
                request.future.set_exception(error)
        for worker in self.workers.values():
            for request in worker.inflight.values():
                request.future.set_exception(error)
            worker.inflight.clear()

    def abort_everything(self) -> None:
        """close(drain=False): every unanswered request fails; workers are killed, since
        any of them may be running a request that was just failed."""
        self.fail_everything(PoolClosed("the pool was closed before this request finished"))
        for worker in self.workers.values():
            worker.state = "stopping"
            self.supervisor.signal_worker(worker.worker_id, signal.SIGKILL)

    # -- starting, retiring, stopping, aborting workers -----------------------------------
    def start_worker(self) -> None:
        if self.closing or self.broken is not None:
            return
        worker = WorkerSlot(next(self.worker_ids))
        self.workers[worker.worker_id] = worker
        self.by_identity[worker.identity] = worker
        self.supervisor.start_worker(worker.worker_id)

    def replace_worker(self) -> None:
        if not self.closing and self.broken is None:
            self.counters["restarts"] += 1
            self.start_worker()

    def retire_worker(self, worker: WorkerSlot) -> None:
        """It served its share (max_requests_per_worker): no new work, a replacement now."""
        worker.state = "retiring"
        self.counters["retired"] += 1
        self.replace_worker()

    def stop_worker(self, worker: WorkerSlot) -> None:
        worker.state = "stopping"
        try:
            self.router.send_multipart([worker.identity, protocol.STOP, b""], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # gone already; the zygote reports its exit

    def check_liveness(self) -> None:
        """Abort workers silent past heartbeat_timeout, or not ready after start_timeout."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.pid is None or worker.state in ("hung", "stopping"):
                continue
            if worker.state == "starting":
                if now - worker.started_at > self.config.start_timeout:
                    self.abort_worker(worker, f"not ready after {self.config.start_timeout} s")
            elif self.config.heartbeat_timeout is not None and \
                    now - worker.last_seen > self.config.heartbeat_timeout:
                self.abort_worker(worker, f"worker {worker.pid} was silent for more than "
                                          f"heartbeat_timeout={self.config.heartbeat_timeout} s")
        self.call_later(self.config.heartbeat_interval, self.check_liveness)

    def abort_worker(self, worker: WorkerSlot, reason: str) -> None:
        """SIGABRT (its faulthandler writes where it was stuck), SIGKILL after a grace."""
        self.counters["hung"] += 1
        worker.state = "hung" if worker.state != "starting" else worker.state
        worker.hang_reason = reason
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
            if worker.state == "starting":
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
    """Move a queued future to running; False if the caller cancelled it meanwhile."""
    return future.running() or future.set_running_or_notify_cancel()


def _trim_report(report: str) -> str:
    """faulthandler's dump without its list of loaded extension modules."""
    return report.split("\nExtension modules:", 1)[0].strip()


def rebuild_exception(meta: dict) -> BaseException:
    """The worker's exception, by value where possible, with its traceback as __cause__."""
    error = None
    if meta.get("pickled"):
        try:
            error = pickle.loads(meta["pickled"])
        except Exception:
            error = None
    if not isinstance(error, BaseException):
        error = RemoteError(meta.get("type", "Exception"), meta.get("message", ""))
    error.__cause__ = RemoteTraceback(meta.get("traceback", ""))
    return error
