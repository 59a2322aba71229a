"""An answer that goes straight to an asyncio future: what ``submit_async`` waits on.

    submit():        concurrent.futures.Future ─(its lock, its callbacks)─> the caller
    submit_async():  LoopAnswer ──(one call_soon_threadsafe)──> asyncio future on the loop
                     (set at once when dispatch runs on that loop: pool/loop_driver.py)

The dispatcher thread settles a request's ``future`` through the part of the
concurrent.futures.Future interface the scheduler uses (``done``, ``running``,
``set_running_or_notify_cancel``, ``set_result``, ``set_exception``). ``asyncio.wrap_future``
over a real Future took a lock and a condition per request, two chained callbacks and a
copy of the state; a light model's request spent ~15% of the server's CPU there.

Cancellation keeps the Future's rules: a caller that gives up (its task cancelled) before
the request is sent to a worker takes it out of the queue; once sent, the request runs to
its end (a deadline or a crash still counts against it) and its answer is dropped.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import InvalidStateError


class LoopAnswer:
    """Made on ``loop``'s thread, by a coroutine of that loop."""

    __slots__ = ("loop", "future", "_thread", "_running", "_settled")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self._thread = threading.get_ident()  # the loop's
        self._running = False
        self._settled = False

    def done(self) -> bool:
        """Answered, or cancelled by its caller before it was sent."""
        return self._settled or (not self._running and self.future.cancelled())

    def running(self) -> bool:
        return self._running and not self._settled

    def set_running_or_notify_cancel(self) -> bool:
        """False when the caller gave up while it was queued; else it is running now."""
        if self.future.cancelled():
            return False
        self._running = True
        return True

    def set_result(self, value) -> None:
        self._settle(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value, error: BaseException | None) -> None:
        if self._settled:
            raise InvalidStateError("this request already has its answer")
        self._settled = True
        # Dispatch runs on this loop: settled here, now. (Asked of the thread and the
        # loop, not asyncio._get_running_loop(): on Python 3.11 that calls getpid(), a
        # syscall per request.)
        if threading.get_ident() == self._thread and self.loop.is_running():
            _resolve(self.future, value, error)
            return
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future, value, error)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting for this answer


def _resolve(future: asyncio.Future, value, error: BaseException | None) -> None:
    if future.done():  # the caller gave up
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
