"""How caller threads hand things to the dispatcher thread: a queue, a wake-up, a close.

    callers: post(item) ──> SimpleQueue ──(first item after a drain: eventfd write)──┐
    dispatcher: poll(fd) ──> drain() yields every item, in order, until empty ◄──────┘
    dispatcher, last: close() refuses later posts (PoolClosed) and returns what is left

Only the first item after a drain writes the eventfd (a system call, and a GIL hand-over,
less per request under load). ``drain`` clears the flag before it empties the queue, so an
item put while the flag was still set is drained after it; the lock makes "posted" and
"closed" exclusive, so nothing posted is ever left unread.
"""

from __future__ import annotations

import os
import queue
import threading

from ..errors import PoolClosed


class Inbox:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = True
        self._wake_pending = False  # a wake-up is written and the queue not yet drained
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # readable: items wait

    def post(self, item) -> None:
        """Queue ``item`` for the dispatcher thread; PoolClosed once it stopped taking them."""
        with self._lock:
            if not self._open:
                raise PoolClosed("the pool is closed")
            self._queue.put(item)
            if not self._wake_pending:
                self._wake_pending = True
                os.eventfd_write(self.fd, 1)

    def waiting(self) -> bool:
        """Items are queued (read without draining: no system call)."""
        return not self._queue.empty()

    def nudge(self) -> None:
        """Wake the dispatcher thread's poll() with nothing posted: a caller that drove
        the pool changed what it must look at (pool/driven_future.py)."""
        os.eventfd_write(self.fd, 1)

    def drain(self):
        """Every item posted until the queue is empty (the dispatcher thread's side)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self._wake_pending = False
        return self._take_all()

    def close(self) -> list:
        """Refuse every later post; return the items still queued, to be answered."""
        with self._lock:
            self._open = False
        return list(self._take_all())

    def release(self) -> None:
        os.close(self.fd)

    def _take_all(self):
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return
