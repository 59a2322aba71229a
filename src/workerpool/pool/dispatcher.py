"""The dispatcher thread: it owns the ROUTER socket and carries out what the scheduler
(pool/scheduler.py) decides. Whoever holds its baton may do the same: the thread holds it
but while it waits, and a caller alone in flight takes it to send its own request and read
its own answer (pool/driven_future.py). ``drive_on(loop)`` lends the sockets to an event
loop's thread instead (pool/loop_driver.py), which runs the same methods; the thread keeps
what sleeps or ends (a zygote restart, the teardown).

    caller threads ── submit(Request) / call(fn) / close ──> Inbox (pool/inbox.py) ───────┐
                                                                                          ▼
    Dispatcher.run():  epoll [ROUTER's fd, inbox eventfd, zygote control socket] until the
                       scheduler's next_wake, then hand each event to the Scheduler and
                       carry out the actions it returns:
        ROUTER  <- READY{credits} | RESULT | ERROR | HEARTBEAT | BYE   (per worker identity)
        ROUTER  -> TASK (Send) / STOP (Stop)                           (ipc/wire.py)
        control <- started / exited{status} / start_error              (from the zygote)
        control -> start (StartWorker) / signal (Signal)
        futures <- Answer / Deliver (decoded here, off the scheduler's tables)

Every accepted request gets exactly one answer; the rules (retries, the poison pill,
deadlines, boot backoff, a worker's life and its states) are the scheduler's and
pool/scheduling.py's, described there. What stays here: sockets, the clock, the peer's
credentials (admission), and decoding answers.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import select
import threading
import time
from concurrent.futures import Future, InvalidStateError

import zmq

from ..config import PoolConfig, usable_cores
from ..errors import PoolBroken, PoolClosed, PoolStartError
from ..ipc import wire
from ..ipc.codec import Codec
from .inbox import Inbox
from .loop_driver import LoopDriver
from .scheduler import (Answer, Deliver, Item, QueueGauge, Request, Scheduler, Send, Signal,
                        StartWorker, Stop)
from .scheduling import BOOT_FAILURES_BEFORE_BROKEN, RESTART_BACKOFF_S
from .supervisor import Supervisor

log = logging.getLogger("workerpool")

# This process's pid, kept current in forked children: os.getpid() is a syscall, and a
# caller asks on every submit and every wait (Dispatcher._take_baton).
_process_pid = os.getpid()


def _forked() -> None:
    global _process_pid
    _process_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)

# While an event loop holds the sockets, how often the thread checks that it still runs.
HAND_BACK_CHECK_S = 0.5
# A caller on that loop, waiting for a call before the loop took the sockets: how often it
# looks whether it can take them itself.
CALL_ON_LOOP_SLICE_S = 0.005
# A caller driving the pool for its own answer (pool/driven_future.py) lets go of the baton
# at least this often, so the thread is never kept from its events for longer.
DRIVE_SLICE_S = 0.05

__all__ = ["Dispatcher", "QueueGauge", "Request"]


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
        self.scheduler = Scheduler(config, self.admits)
        self.router: zmq.Socket | None = None
        # Driven by an event loop (pool/loop_driver.py): the loop asked for, the driver
        # while the loop holds the sockets, and the event the loop sets to give them back.
        self.hand_over_to: asyncio.AbstractEventLoop | None = None
        self.driver: LoopDriver | None = None
        self.resume = threading.Event()
        # Whoever holds the baton may use the scheduler and the sockets: this thread, but
        # for its waits in poll(), or a caller (pool/driven_future.py). Held from here
        # until the thread is ready to poll; never given up again once it stops.
        self.baton = threading.Lock()
        self.baton.acquire()
        self.holder: int | None = None  # the baton holder's thread ident
        self.planned_wake: float | None = None  # when the thread's poll() times out
        self.failure: BaseException | None = None  # a bug met by a caller driving it
        self.pid = os.getpid()  # the pool's process: only its threads may drive it
        self._caller_poller: tuple[int, select.poll] | None = None  # (control fd, poll)
        self.epoll: select.epoll | None = None  # what the thread waits on, in loop()
        self.router_fd = -1  # its ZMQ_FD, what the thread's epoll and callers poll
        self.router_unwatched = False  # a caller took the ROUTER out of the thread's epoll
        # The ROUTER was last found empty (ZMQ_EVENTS) and nothing was sent or read on it
        # since: its fd will signal the next message, so there is nothing to drain.
        self.router_quiet = False
        self.deferred: list | None = None  # answers held back by a submit (Dispatcher.submit)
        # How long a lone caller looks for its answer before it sleeps (_spin_for_answer):
        # never on one core, where the spin would keep the worker from it.
        self.spin_s = config.spin_wait_ms / 1000 if usable_cores() > 1 else 0.0

    # What the pool reads of the scheduler's state (from any thread: plain reads).
    @property
    def workers(self):
        return self.scheduler.workers

    @property
    def counters(self):
        return self.scheduler.counters

    @property
    def metrics(self):
        return self.scheduler.metrics

    @property
    def queue_gauge(self) -> QueueGauge:
        return self.scheduler.queue_gauge

    @property
    def broken(self) -> PoolBroken | None:
        return self.scheduler.broken

    @property
    def start_error(self) -> BaseException | None:
        return self.scheduler.start_error

    # -- called from other threads -------------------------------------------------------
    def submit(self, request: Request, direct: bool = True) -> list:
        """Hand over a request; PoolClosed once the thread has stopped taking them. A
        caller that finds a worker idle and the baton free sends it itself (``direct``; no
        wake of the thread); under a backlog the thread sends requests in chunks. Returns
        the answers (future, value, error) to other requests it met meanwhile, for the
        caller to give with ``settle`` once it holds no lock: their futures' callbacks may
        call the pool."""
        driver = self._driver_here()
        if driver is not None:
            driver.submit(request)
            return []
        if not (direct and self._idle_look() and self.scheduler.has_idle_worker()
                and self._take_baton()):
            self.inbox.post(request)
            return []
        accepted, interrupted = None, None
        self.deferred = []  # answers met meanwhile: their callbacks run after the lock
        try:
            if self.inbox.waiting():
                self.read_inbox()  # what this thread posted before goes first
            sent = self.scheduler.lone_task(request)
            if sent is not None:
                accepted, request = request, None
                self.send_alone(sent)
            elif self.scheduler.has_idle_worker():
                accepted, request = request, None
                self.carry_out(self.scheduler.submit(accepted))
                self.carry_out(self.scheduler.tick(time.monotonic()))  # sends it
        except BaseException as exc:
            interrupted = self._failed_here(exc, accepted or request)
            request = None
        later, interrupted_giving = self._give_baton()
        interrupted = interrupted or interrupted_giving
        if interrupted is not None:  # (Ctrl-C) the caller's, once the others are answered
            for answer in later:
                settle(*answer)
            raise interrupted
        if request is not None:
            self.inbox.post(request)
        return later

    def send_alone(self, sent: Send) -> None:
        """A lone request's TASK (Scheduler.lone_task) out first, then its record: the
        worker starts on it while this caller writes it down. Recorded whatever the send
        met, so the pool holds it: a worker whose connection is gone gives it back, as a
        Send carried out does; anything else is raised to a caller that fails the pool,
        this request with it."""
        self.router_quiet = False
        try:
            wire.send(self.router, sent.frames)
        except BaseException as exc:
            now = time.monotonic()
            self.carry_out(self.scheduler.lone_sent(sent, now))
            if isinstance(exc, zmq.ZMQError) and exc.errno == zmq.EHOSTUNREACH:
                self.carry_out(self.scheduler.unreachable(sent, now))
                return
            raise
        self.carry_out(self.scheduler.lone_sent(sent, time.monotonic()))

    def _idle_look(self) -> bool:
        """Nothing waits to be sent, at a glance (no baton: a hint). Then a caller sends
        its own request and reads its own answer; under a backlog the thread does, in
        chunks, and callers wait on their futures."""
        scheduler = self.scheduler
        return not scheduler.pending and not scheduler.retries and not self.inbox.waiting()

    def drive_until(self, future, deadline: float | None) -> None:
        """On a caller's thread: dispatch until ``future`` is answered, ``deadline``
        (monotonic) passes, or the baton is not to be had; the thread (or the loop) answers
        it otherwise. Interrupted in poll() (Ctrl-C), nothing is lost; interrupted while
        it dispatches, the pool cannot know what was, and is failed (PoolBroken)."""
        if not (self._idle_look() and self.scheduler.alone_in_flight()):
            return  # others wait too: the thread answers them in turn, this one included
        slice_end = time.monotonic() + DRIVE_SLICE_S
        while not future.done():
            if not self._take_baton():
                return
            interrupted, stop = None, False
            try:
                events = self._poll_for_caller(slice_end, deadline)
            except BaseException:  # (Ctrl-C) in poll: nothing was being done
                self._give_baton()
                raise
            if events is None:
                stop = True
            else:
                try:
                    self.read_workers(signaled=self.router_fd in events)
                    if self.inbox.fd in events:
                        self.read_inbox()
                    self.carry_out(self.scheduler.tick(time.monotonic()))
                except BaseException as exc:
                    interrupted = self._failed_here(exc)
                    stop = True  # the thread fails what the pool holds, this future too
                # the zygote's events are the thread's
                stop = stop or self.supervisor.control_fd in events
            interrupted = interrupted or self._give_baton()[1]
            if interrupted is not None:
                raise interrupted
            now = time.monotonic()
            if stop or (deadline is not None and now >= deadline):
                return
            if now >= slice_end:
                slice_end = now + DRIVE_SLICE_S

    def _take_baton(self) -> bool:
        """The baton for this caller, if free and the pool may be driven from here now:
        not while an event loop drives, nor in a process forked from the pool's (its
        sockets are not this process's), nor again on a thread that holds it. Never waited
        for: a busy baton means another thread dispatches, and reads this answer too."""
        if self.hand_over_to is not None or self.driver is not None or \
                self.holder is not None or _process_pid != self.pid or \
                not self.baton.acquire(blocking=False):
            return False
        if self.hand_over_to is not None or self.driver is not None or \
                self.scheduler.finished() or self.failure is not None:
            self.baton.release()
            return False
        self.holder = threading.get_ident()
        return True

    def _give_baton(self) -> tuple[list, BaseException | None]:
        """Leave the sockets as the thread's poll() expects them (no reply waiting behind
        a consumed edge), wake it if it must look at something sooner than planned, and
        let go. Returns the answers deferred meanwhile (Dispatcher.submit's) and a Ctrl-C
        met doing it, for the caller to raise."""
        interrupted = None
        try:
            self.drain_router()
            if self.router_unwatched:  # its signal consumed now: no wake for what was read
                self.router_unwatched = False
                self.epoll.modify(self.router_fd, select.EPOLLIN)
            wake, planned = self.scheduler.next_wake(), self.planned_wake
            if self.scheduler.closing or self.hand_over_to is not None or \
                    self.failure is not None or \
                    (wake is not None and (planned is None or wake < planned)):
                self.inbox.nudge()
        except BaseException as exc:
            interrupted = self._failed_here(exc)
            self.inbox.nudge()
        finally:
            later, self.deferred = self.deferred or [], None
            self.holder = None
            self.baton.release()
        return later, interrupted

    def _poll_for_caller(self, slice_end: float, deadline: float | None) -> dict | None:
        """Wait in poll() for the ROUTER, the inbox and the zygote, until the scheduler's
        next wake, the slice's end or ``deadline``; None if nothing may be polled here.
        The thread's epoll leaves the ROUTER meanwhile: a reply wakes this caller only.
        The ROUTER is polled by its fd, as the thread does (a zmq.Poller's extra passes
        over the socket cost a lone round trip several system calls)."""
        control_fd = self.supervisor.control_fd
        epoll = self.epoll
        if control_fd is None or control_fd < 0 or epoll is None:
            return None
        if self._caller_poller is None or self._caller_poller[0] != control_fd:
            poller = select.poll()
            for fd in (self.router_fd, self.inbox.fd, control_fd):
                poller.register(fd, select.POLLIN)
            self._caller_poller = (control_fd, poller)
        if not self.router_unwatched:
            epoll.modify(self.router_fd, 0)
            self.router_unwatched = True  # until the baton is given back
        if self.router_waiting():  # in already: its fd's signal may be spent
            return {self.router_fd: select.POLLIN}
        until = slice_end if deadline is None else min(slice_end, deadline)
        wake = self.scheduler.next_wake()
        if wake is not None:
            until = min(until, wake)
        if self.spin_s and self._spin_for_answer(until):
            return {self.router_fd: select.POLLIN}
        return dict(self._caller_poller[1].poll(math.ceil(self.poll_timeout(until) * 1000)))

    def _spin_for_answer(self, until: float) -> bool:
        """Before a caller sleeps in poll() for an answer: look for it until ``spin_s``
        passes (or ``until``), while the typical call is fast; True once a message waits.
        A thread asleep in poll() is woken through the scheduler, on a VM through the
        host: that wake-up was a quarter of a lone round trip. Stops as soon as another
        thread posts (poll() then answers at once); a spin that ends with a look finding
        nothing leaves the ROUTER as router_waiting() does, so poll() misses nothing. The
        GIL stays held (a look does not release it; a time.sleep(0) after each, tried,
        made the round trip slower than no spin at all)."""
        call_s = self.scheduler.typical_call_s()
        if call_s is None or call_s > self.spin_s / 2:
            return False  # slow calls: the spin would mostly burn a core
        router, inbox = self.router, self.inbox
        spin_end = min(time.monotonic() + self.spin_s, until)
        # Not quiet until a look says so: a Ctrl-C between a look that consumed the fd's
        # signal and its answer must leave _give_baton asking ZeroMQ again.
        self.router_quiet = False
        while not inbox.waiting():
            if wire.has_message(router):
                return True
            if time.monotonic() >= spin_end:
                break
        else:
            return False  # another thread posted: poll() answers at once
        self.router_quiet = True  # the last look found nothing: the fd will signal
        return False

    def _failed_here(self, exc: BaseException,
                     request: Request | None = None) -> BaseException | None:
        """A bug (or a Ctrl-C) met while a caller's thread dispatched: what the pool holds
        may be half updated, so the thread fails all of it, as for a bug met there
        (PoolBroken); the caller's own request is answered so at once. Returns ``exc``
        when the caller must raise it (Ctrl-C and the like, not a bug)."""
        if self.failure is None:
            self.failure = exc
        if request is not None:
            settle(request.future, error=PoolBroken(f"the pool's dispatcher failed: {exc!r}"))
        return None if isinstance(exc, Exception) else exc

    def call(self, fn, timeout: float | None = None):
        """Run ``fn()`` where the scheduler runs (this thread, or the loop driving it) and
        return its result."""
        if self.on_owner_thread():
            return fn()
        future: Future = Future()
        self.inbox.post((fn, future))
        loop = self.hand_over_to
        if loop is None or asyncio._get_running_loop() is not loop:
            return future.result(timeout)
        # On the loop the thread is handing the sockets to, before the driver exists: the
        # loop may be the one to answer, and this caller blocks it. Wait in slices; once
        # the driver appears, take the sockets here and read the inbox (this call is in it).
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return future.result(CALL_ON_LOOP_SLICE_S)
            except TimeoutError:
                driver = self._driver_here()
                if driver is not None:
                    driver.read_inbox_now()
                    if future.done():
                        return future.result()
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def stream_control(self, request: Request, credit: int = 0, cancel: bool = False,
                       post: bool = False) -> None:
        """From a stream's consumer: ``credit`` more items may be sent, or (``cancel``) it
        is given up. Done at once where the scheduler runs, else (or with ``post``: from a
        finalizer, which may run inside the scheduler's own code) posted; nothing once the
        pool has stopped (the stream has its answer then)."""
        control = _StreamControl(request, credit, cancel)
        driver = None if post else self._driver_here()
        if driver is not None:
            self.carry_out(self.stream_action(control))
            driver.queue_turn()
        elif not post and self.holder == threading.get_ident():
            self.carry_out(self.stream_action(control))
        else:
            try:
                self.inbox.post(control)
            except PoolClosed:
                pass

    def stream_action(self, control: "_StreamControl") -> list:
        if control.cancel:
            return self.scheduler.cancel_stream(control.request)
        return self.scheduler.stream_credit(control.request, control.credit)

    def on_owner_thread(self) -> bool:
        """True on the thread that runs the scheduler now (it holds the baton, or it is
        the loop driving the pool)."""
        return self.holder == threading.get_ident() or self._driver_here() is not None

    def loop_here(self) -> asyncio.AbstractEventLoop | None:
        """The loop driving dispatch, when called in one of its callbacks (else None)."""
        driver = self._driver_here()
        return driver.loop if driver is not None else None

    def _driver_here(self) -> LoopDriver | None:
        """The loop driver when called on its loop's thread, else None. A driver handed
        the sockets that its loop has not taken yet takes them now: a caller on the loop
        (blocking it) must not wait for the loop."""
        driver = self.driver
        if driver is None:
            return None
        if not driver.taken and asyncio._get_running_loop() is driver.loop:
            driver.take()
        return driver if driver.on_its_thread() else None

    def drive_on(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run dispatch on ``loop``'s thread from now on (None: back on this thread)."""
        self.hand_over_to = loop
        try:
            self.inbox.post(_Wake())  # the thread (or the loop) looks at hand_over_to
        except PoolClosed:
            pass

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
        self.router_fd = self.router.getsockopt(zmq.FD)
        self.holder = threading.get_ident()  # the baton: taken in __init__ for this thread
        try:
            self.carry_out(self.scheduler.start(time.monotonic()))
            self.loop()
            while self.hand_over():
                self.loop()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self.carry_out(self.scheduler.fail_everything(
                PoolBroken(f"the pool's dispatcher failed: {exc!r}")), strict=False)
            if not self.started.is_set():  # nor Pool() waiting out start_timeout
                self.scheduler.start_error = PoolStartError(
                    f"the pool's dispatcher failed: {exc!r}")
                self.started.set()
            raise
        finally:
            self.stop_accepting()
            self.carry_out(self.scheduler.shutdown(), strict=False)
            self.supervisor.stop_zygote(grace=self.config.close_timeout)
            self.router.close(linger=0)
            context.term()
            self.inbox.release()
            if self.on_exit is not None:
                self.on_exit()

    def loop(self) -> None:
        """Dispatch on this thread (holding the baton) until the pool finishes or an event
        loop is to drive it. The wait is an epoll on the ROUTER's fd, not zmq_poll on the
        socket: callers may use the socket while this thread waits without the baton, and
        a caller reading its own answer takes the ROUTER out of the set meanwhile
        (epoll's set may change while it is waited on), so a reply wakes one thread."""
        scheduler = self.scheduler
        self.epoll = epoll = select.epoll()
        try:
            epoll.register(self.router_fd, select.EPOLLIN)
            epoll.register(self.inbox.fd, select.EPOLLIN)
            control_fd = self.supervisor.control_fd
            epoll.register(control_fd, select.EPOLLIN)
            while not scheduler.finished():
                self.drain_router()  # the fd is edge-triggered: no reply may wait unseen
                self.planned_wake = scheduler.next_wake()
                self.holder = None
                self.baton.release()
                try:
                    events = {fd for fd, _ in epoll.poll(self.poll_timeout(self.planned_wake))}
                finally:
                    self.baton.acquire()
                    self.holder = threading.get_ident()
                if self.failure is not None:
                    raise self.failure
                self.read_workers(signaled=self.router_fd in events)
                if control_fd in events:
                    event = self.supervisor.read_event()
                    if event["op"] == "zygote_died":
                        epoll.unregister(control_fd)  # EOF would stay readable forever
                        control_fd = -1
                        self.carry_out(scheduler.on_zygote_died(time.monotonic()))
                        if self.restart_zygote():
                            control_fd = self.supervisor.control_fd
                            epoll.register(control_fd, select.EPOLLIN)
                    else:
                        self.on_supervisor_event(event)
                if self.inbox.fd in events:
                    self.read_inbox()
                self.carry_out(scheduler.tick(time.monotonic()))
                if self.hand_over_to is not None and self.started.is_set() and \
                        not scheduler.closing and not scheduler.finished():
                    return  # run() hands the sockets to the loop
        finally:
            self.epoll = None
            epoll.close()

    def drain_router(self) -> None:
        """Read the ROUTER until ZeroMQ says nothing waits (a send may consume the edge of
        its fd's signal, so poll() alone could miss a reply), dispatching after each read
        (a reply's credit may let queued work go). Nothing to do while the ROUTER is
        quiet (``router_quiet``)."""
        while self.router_waiting():
            self.read_workers()
            self.carry_out(self.scheduler.tick(time.monotonic()))

    def router_waiting(self) -> bool:
        """A message waits on the ROUTER that its fd may not signal (a send or receive
        consumed the signal). Not asked of ZeroMQ while the ROUTER is quiet; found empty,
        it is quiet from then on. What wakes a poll of the fd is read by read_workers,
        which always asks."""
        if self.router_quiet:
            return False
        if wire.has_message(self.router):
            return True
        self.router_quiet = True
        return False

    def hand_over(self) -> bool:
        """Give the sockets to the loop asked for and wait until it gives them back; then
        carry on with what it left (an error, a zygote's death). False when there is
        nothing to hand over (the pool finished) or the loop cannot take them."""
        loop = self.hand_over_to
        if loop is None or self.scheduler.finished():
            return False
        driver = LoopDriver(self, loop)
        self.resume.clear()
        self.driver = driver
        try:
            loop.call_soon_threadsafe(driver.take)
        except RuntimeError:  # the loop is closed
            self.driver, self.hand_over_to = None, None
            return True
        while not self.resume.wait(HAND_BACK_CHECK_S):
            if driver.revoke_if_stopped():  # the loop stopped: nothing runs there now
                self.hand_over_to = None
                break
        self.driver = None
        if driver.error is not None:
            raise driver.error
        if driver.control_event is not None:
            self.carry_out(self.scheduler.on_zygote_died(time.monotonic()))
            self.restart_zygote()
        return True

    def poll_timeout(self, wake: float | None) -> float:
        """Seconds until ``wake`` for epoll (-1: no timeout)."""
        if wake is None:
            return -1
        return max(0.0, wake - time.monotonic())

    # -- carrying out the scheduler's actions ---------------------------------------------
    def carry_out(self, actions: list, strict: bool = True) -> None:
        """Perform ``actions`` in order. ``strict=False`` (tearing down): a socket that
        fails is passed over, so every future still gets its answer."""
        answer = settle if self.deferred is None else self._defer
        for action in actions:
            kind = type(action)
            if kind is Deliver:
                try:
                    value = self.codec.decode(action.body, action.frames)
                except BaseException as exc:  # noqa: BLE001 - the caller's to see
                    answer(action.request.future, error=exc)
                else:
                    answer(action.request.future, value)
            elif kind is Answer:
                answer(action.request.future, action.value, action.error)
            elif kind is Item:
                try:
                    value = self.codec.decode(action.body, action.frames)
                except BaseException as exc:  # noqa: BLE001 - the consumer's to see
                    settle(action.request.future, error=exc)
                    self.carry_out(self.scheduler.cancel_stream(action.request), strict)
                else:
                    action.request.future.put(value)
            elif kind is Send:
                self.router_quiet = False
                try:
                    wire.send(self.router, action.frames)
                except zmq.ZMQError as exc:
                    if strict and exc.errno != zmq.EHOSTUNREACH:
                        raise
                    # Its connection is gone; the zygote will report the exit shortly.
                    self.carry_out(self.scheduler.unreachable(action, time.monotonic()),
                                   strict)
            elif kind is Stop:
                self.router_quiet = False
                try:
                    wire.send(self.router, [action.worker.identity,
                                            wire.head(wire.STOP, {})], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # gone already; the zygote reports its exit
            elif kind is StartWorker:
                self.supervisor.start_worker(action.worker_id, action.identity, action.cpus)
            elif kind is Signal:
                self.supervisor.signal_worker(action.worker_id, action.signum)
            else:
                raise TypeError(f"unknown action {action!r}")
        if not self.started.is_set() and (self.scheduler.started or
                                          self.scheduler.start_error is not None):
            self.started.set()

    # -- inbox: requests and commands from callers ----------------------------------------
    def _defer(self, future, value=None, error: BaseException | None = None) -> None:
        self.deferred.append((future, value, error))

    def read_inbox(self) -> None:
        scheduler = self.scheduler
        for item in self.inbox.drain():
            if isinstance(item, Request):
                self.carry_out(scheduler.submit(item))
            elif isinstance(item, _Close):
                self.carry_out(scheduler.close(item.drain))
            elif isinstance(item, _StreamControl):
                self.carry_out(self.stream_action(item))
            elif isinstance(item, _Wake):
                pass  # the loop's turn (or the thread's) reads hand_over_to
            else:
                fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                    future.set_exception(exc)

    # -- what workers say ----------------------------------------------------------------
    def read_workers(self, signaled: bool = True) -> None:
        """Every message waiting on the ROUTER (wire.has_message: a recv that ends in
        zmq.Again costs an exception each time). Nothing to read, and ZeroMQ not asked,
        when its fd did not signal (``signaled``: a poll said so) and it is quiet."""
        if not signaled and self.router_quiet:
            return
        router, scheduler = self.router, self.scheduler
        while wire.has_message(router):
            self.router_quiet = False
            try:
                # The head as a zmq Frame: admission asks it for the peer's credentials.
                frames = wire.recv(router, zmq.NOBLOCK, copied=1)
            except zmq.Again:
                return
            self.carry_out(scheduler.on_message(frames, time.monotonic()))
        self.router_quiet = True

    def admits(self, meta: dict, frame) -> bool:
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
        return True

    # -- what the zygote says ------------------------------------------------------------
    def restart_zygote(self) -> bool:
        """A new zygote after the last one died, with the workers' start backoff between
        tries; after BOOT_FAILURES_BEFORE_BROKEN failed tries the pool is broken. This
        thread waits meanwhile: no worker is left to send work to anyway (callers' requests
        wait in the inbox)."""
        if not self.scheduler.may_start_workers():
            return False
        for attempt in range(BOOT_FAILURES_BEFORE_BROKEN):
            time.sleep(RESTART_BACKOFF_S[attempt])
            try:
                self.supervisor.restart_zygote()
            except PoolStartError as exc:
                error = exc
                log.warning("workerpool: could not restart the worker zygote (try %d of %d): "
                            "%s", attempt + 1, BOOT_FAILURES_BEFORE_BROKEN, exc)
                continue
            log.warning("workerpool: the worker zygote was restarted (pid %s)",
                        self.supervisor.zygote_pid)
            self.carry_out(self.scheduler.on_zygote_restarted(time.monotonic()))
            return True
        self.carry_out(self.scheduler.on_zygote_lost(
            f"{BOOT_FAILURES_BEFORE_BROKEN} new ones failed to start; the last: {error}"))
        return False

    def on_supervisor_event(self, event: dict) -> None:
        scheduler, op, now = self.scheduler, event["op"], time.monotonic()
        if op == "started":
            self.carry_out(scheduler.on_started(event.get("worker_id"), event["pid"]))
        elif op == "exited":
            # What the worker sent before it died is read first: its answers and a
            # stream's items count as delivered, not as lost with it.
            self.read_workers()
            worker_id = event.get("worker_id")
            report = self.supervisor.crash_report(worker_id) \
                if worker_id in scheduler.workers else ""
            self.carry_out(scheduler.on_exit(worker_id, event["status"], report, now))
        elif op == "start_error":
            self.carry_out(scheduler.on_start_error(event.get("worker_id"),
                                                    event["traceback"], now))


class _Wake:
    """Posted by drive_on: look at hand_over_to."""


class _StreamControl:
    __slots__ = ("request", "credit", "cancel")

    def __init__(self, request: Request, credit: int, cancel: bool):
        self.request, self.credit, self.cancel = request, credit, cancel


class _Close:
    __slots__ = ("drain",)

    def __init__(self, drain: bool):
        self.drain = drain


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
