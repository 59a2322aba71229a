"""The Future ``Pool.submit`` returns: a caller that waits on it reads its own answer.

    through the thread:  caller ─inbox─> dispatcher thread ─TASK─> worker ─RESULT─>
                         dispatcher thread ─(the Future's condition)─> caller
    driven:              caller ─TASK─> worker ─RESULT─> caller (it holds the baton)

Why: a sequential ``submit(x).result()`` paid two wakes of another thread and two GIL
hand-overs on top of ZeroMQ's round trip (2.7x a raw pyzmq echo). The dispatcher's
scheduler and sockets may be used by whichever thread holds its baton
(Dispatcher.baton): the dispatcher thread holds it except while it waits in poll(), so a
caller that finds it free sends its request itself (Dispatcher.submit: the TASK first,
Scheduler.lone_task, and the pool's record of it after, so the worker starts meanwhile)
and, waiting here, polls the ROUTER for its answer (Dispatcher.drive_until). When the
baton is busy, or the pool is driven by an event loop, or anything the thread must handle
arrives (the zygote's events), the caller waits on the Future as before: the thread
answers it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, RUNNING

_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))


class DrivenFuture(Future):
    """A concurrent.futures.Future whose ``result`` and ``exception`` first try to read
    the answer on the waiting thread (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.dispatcher = None  # set by Pool when the request is handed over

    # Read without the future's condition: the state is one attribute, replaced whole, so
    # a reader sees the state before or after a change, as it would under the lock (a
    # round trip asks done() four times; each took and gave back the condition's lock).
    def done(self) -> bool:
        return self._state in _DONE

    def running(self) -> bool:
        return self._state == RUNNING

    def result(self, timeout: float | None = None):
        return super().result(self._drive(timeout))

    def exception(self, timeout: float | None = None):
        return super().exception(self._drive(timeout))

    def _drive(self, timeout: float | None) -> float | None:
        """Drive the dispatcher until answered or it cannot be driven here; the time
        left of ``timeout``."""
        dispatcher = self.dispatcher
        if dispatcher is None or self.done():
            return timeout
        if timeout is None:
            dispatcher.drive_until(self, None)
            return None
        deadline = time.monotonic() + timeout
        dispatcher.drive_until(self, deadline)
        return max(0.0, deadline - time.monotonic())
