"""A pool's dispatch run on an asyncio event loop's thread instead of the pool's own thread.

    Pool.drive_on(loop):  the dispatcher thread, once started and not closing, hands its
                          sockets to the loop (ZeroMQ allows a socket to change threads
                          behind a full memory barrier: the hand-over's lock and event)
    on the loop thread:   submit_async -> scheduler.submit -> (one turn per loop pass:
                          replies read, scheduler.tick, tasks sent) ; readers on the
                          ROUTER's fd, the inbox's eventfd, the zygote's control socket ;
                          a timer for the scheduler's next wake
    handed back:          the pool finished (the thread tears it down), the zygote died
                          (the thread restarts it, with its back-off sleeps), undrive(),
                          a bug here (the thread fails every request), or the loop stopped
                          for good (the thread takes the sockets back: nothing runs there)

Why: a server's requests come from the loop. Through the thread each cost an eventfd
write, a wake of the thread, a GIL hand-over each way and a call_soon_threadsafe back; on
the loop the scheduler runs where the request already is, and a pass's requests are
dispatched together. Callers on other threads still post to the inbox (its eventfd wakes
the loop). The scheduler, its rules and its answers are the same object either way.

ZeroMQ's fd is edge-triggered: it signals that the socket's state may have changed, and
every send or receive may consume that signal, so after each turn ZMQ_EVENTS is asked
whether replies wait, and another turn is queued if they do.
"""

from __future__ import annotations

import asyncio
import threading
import time


class LoopDriver:
    def __init__(self, dispatcher, loop: asyncio.AbstractEventLoop):
        self.dispatcher = dispatcher
        self.loop = loop
        self.thread_id: int | None = None  # the loop's thread, once it took the sockets
        self.lock = threading.Lock()  # taken / revoked: decided once, under it
        self.taken = False
        self.revoked = False  # the thread took the sockets back (or never gave them)
        self.error: BaseException | None = None  # a bug met on the loop: the thread's now
        self.control_event: dict | None = None  # an event the thread must handle
        self._turn_queued = False
        self._router_signaled = True  # its fd was readable since the last turn read it
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._fds: list[int] = []

    # -- on the loop's thread -------------------------------------------------------------
    def take(self) -> None:
        """Called on the loop (call_soon_threadsafe, or at once by a caller on the loop
        that needs the pool): start serving the pool here."""
        with self.lock:
            if self.revoked or self.taken:  # (taken early by a caller on the loop)
                return
            self.taken = True
            self.thread_id = threading.get_ident()
        d = self.dispatcher
        router_fd = d.router_fd
        self._fds = [router_fd, d.inbox.fd, d.supervisor.control_fd]
        self.loop.add_reader(router_fd, self._on_router)
        self.loop.add_reader(d.inbox.fd, self._on_inbox)
        self.loop.add_reader(d.supervisor.control_fd, self._on_control)
        self.queue_turn()

    def on_its_thread(self) -> bool:
        """True in a callback of this loop while it serves the pool. Not on the loop's
        thread once the loop stopped: nothing of the pool's runs there then (the thread
        takes the sockets back), so a caller there, Pool.close() included, must wait."""
        # (the loop runs, and this is its thread: so this is one of its callbacks. Not
        # asyncio._get_running_loop(): on Python 3.11 that calls getpid(), a syscall per
        # request, ~1 us under load.)
        return self.thread_id == threading.get_ident() and not self.revoked and \
            self.loop.is_running()

    def submit(self, request) -> None:
        """A request from a coroutine on this loop: queued now, sent on this pass's turn
        (sending it at once, when the pool is idle, measured slower on a light model: the
        send is best the loop's last act before it waits)."""
        d = self.dispatcher
        d.carry_out(d.scheduler.submit(request))
        self.queue_turn()

    def queue_turn(self) -> None:
        if not self._turn_queued and self._live():
            self._turn_queued = True
            self.loop.call_soon(self._turn)

    def read_inbox_now(self) -> None:
        """Read what other threads posted, at once (a caller on the loop blocking it)."""
        self._on_inbox()

    def _on_router(self) -> None:
        self._router_signaled = True
        self.queue_turn()

    def _on_inbox(self) -> None:
        if self._live():
            self._guarded(self.dispatcher.read_inbox)
            self.queue_turn()  # what other threads posted is dispatched on the turn

    def _on_control(self) -> None:
        if not self._live():
            return
        event = self.dispatcher.supervisor.read_event()
        if event["op"] == "zygote_died":  # restarting it sleeps: the thread's job
            self.control_event = event
            self.hand_back()
            return
        self._guarded(lambda: self.dispatcher.on_supervisor_event(event))
        self.queue_turn()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._turn()

    def _turn(self) -> None:
        self._turn_queued = False
        if self._live():
            self._guarded(self._step)

    def _step(self) -> None:
        d = self.dispatcher
        signaled, self._router_signaled = self._router_signaled, False
        d.read_workers(signaled)
        scheduler = d.scheduler
        d.carry_out(scheduler.tick(time.monotonic()))
        if scheduler.finished() or d.hand_over_to is None:
            self.hand_back()
            return
        if d.router_waiting():  # sends may have eaten the edge
            self.queue_turn()
        self._arm_timer(scheduler.next_wake())

    def _arm_timer(self, wake: float | None) -> None:
        if wake is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer_at is not None and self._timer_at <= wake:
            return  # an earlier (or the same) wake is armed; its turn re-arms
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake
        self._timer = self.loop.call_later(max(0.0, wake - time.monotonic()), self._on_timer)

    def _guarded(self, step) -> None:
        try:
            step()
            if self.dispatcher.scheduler.finished():
                self.hand_back()
        except BaseException as exc:  # noqa: BLE001 - the thread fails what the pool holds
            self.error = exc
            self.hand_back()

    def _live(self) -> bool:
        return self.taken and not self.revoked

    def hand_back(self) -> None:
        """Stop serving the pool here; its thread goes on (on this loop's thread)."""
        with self.lock:
            if self.revoked:
                return
            self.revoked = True
        for fd in self._fds:
            self.loop.remove_reader(fd)
        if self._timer is not None:
            self._timer.cancel()
        self.dispatcher.resume.set()

    # -- on the pool's thread -------------------------------------------------------------
    def revoke_if_stopped(self) -> bool:
        """Take the sockets back when the loop no longer runs (nothing of ours runs there
        then); True if they are the thread's now."""
        with self.lock:
            if self.revoked:
                return True
            if self.taken and self.loop.is_running():
                return False
            if not self.taken and not self.loop.is_closed() and self.loop.is_running():
                return False  # take() is queued on a running loop
            self.revoked = True
            return True
