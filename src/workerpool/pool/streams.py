"""The consumer's end of a stream: what ``Pool.stream`` and ``Pool.stream_async`` return.

    worker: ITEM ──> dispatcher: decoded ──> sink.put(value) ──> the consumer's next()
    consumer took half the window ──> dispatcher.stream_control(credit) ──> MORE to worker
    consumer closes (close(), aclose(), a cancelled task, the stream dropped) ──> CANCEL
    END ──> set_result: the iteration stops;  ERROR, a crash, a deadline ──> set_exception:
    raised after the items already delivered

A sink (a Stream's or AsyncStream's ``sink``: the pool holds it, not the consumer's
object, whose finalizer can then cancel) stands where a request's Future stands for the
scheduler (``done``, ``running``,
``set_running_or_notify_cancel``, ``set_result``, ``set_exception``), so retries, deadlines,
crashes and closing treat a stream like any request; ``put`` is what it adds. At most
WINDOW items wait here unread: the worker is granted a window of credits and half a window
more each time the consumer has taken half, so a slow consumer slows the generator instead
of filling memory.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import InvalidStateError

# Items a worker may send ahead of its consumer.
WINDOW = 64


class _Sink:
    """What the scheduler and the dispatcher see; subclasses add the consumer's side."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._running = False
        self._settled = False  # END, or an error: nothing more comes
        self._cancelled = False  # the consumer gave up
        self._error: BaseException | None = None
        self._control = None  # (credit, cancel) -> None, set by attach()
        self._taken = 0
        self._granted = WINDOW

    def attach(self, control) -> None:
        """``control(credit=n)`` / ``control(cancel=True)``: the dispatcher's stream_control
        for this stream's request."""
        self._control = control

    # -- the scheduler's side (a Future's interface) ----------------------------------------
    def done(self) -> bool:
        return self._settled or self._cancelled

    def running(self) -> bool:
        return self._running and not self.done()

    def set_running_or_notify_cancel(self) -> bool:
        if self._cancelled:
            return False
        self._running = True
        return True

    def set_result(self, value=None) -> None:
        self._settle(None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(error)

    def put(self, value) -> None:
        """An item, in order (the dispatcher's side)."""
        raise NotImplementedError

    def _settle(self, error: BaseException | None) -> None:
        raise NotImplementedError

    # -- the consumer's side ------------------------------------------------------------------
    def _took_one(self) -> None:
        self._taken += 1
        if not self._settled and not self._cancelled and \
                self._granted - self._taken <= WINDOW // 2:
            self._granted += WINDOW // 2
            self._control(credit=WINDOW // 2)

    def cancel(self, post: bool = False) -> None:
        """The consumer gave up: nothing more is kept, the worker is told to stop (``post``:
        from a finalizer, which may run inside the scheduler's own code)."""
        if not self._settled and not self._cancelled:
            self._cancelled = True
            self._items.clear()
            if self._control is not None:
                self._control(cancel=True, post=post)

    def _pop(self, end: type[Exception]):
        """The next item (there is one, or the stream has ended): else raise the stream's
        error (once; then it is over) or ``end``."""
        if self._items:
            return self._items.popleft()
        if self._error is not None and not self._cancelled:
            error, self._error = self._error, None
            self._cancelled = True
            raise error
        raise end


class _SyncSink(_Sink):
    """A Stream's state, read by a thread."""

    def __init__(self):
        super().__init__()
        self._ready = threading.Condition(threading.Lock())

    def put(self, value) -> None:
        with self._ready:
            if not self._cancelled:
                self._items.append(value)
                self._ready.notify()

    def _settle(self, error: BaseException | None) -> None:
        with self._ready:
            if self._settled:
                raise InvalidStateError("this stream already has its end")
            self._settled = True
            self._error = error
            self._ready.notify()

    def next(self):
        with self._ready:
            while not self._items and not self._settled and not self._cancelled:
                self._ready.wait()
            value = self._pop(StopIteration)
        self._took_one()
        return value

    def close(self) -> None:
        self.cancel()
        with self._ready:
            self._ready.notify_all()


class Stream:
    """``for item in pool.stream(x)``: the items ``predict`` yields, as they come.

    ``close()`` (or leaving a ``with`` block, or dropping the stream) stops the generator
    in its worker and frees the worker. An error in ``predict``, a worker that died
    mid-stream (WorkerCrashed), or the deadline (TaskTimeout) is raised after the items
    that came before it; a stream is never cut short silently. (The pool holds the
    stream's state, ``sink``, not this object: dropping it is the consumer's word.)"""

    __slots__ = ("sink",)

    def __init__(self):
        self.sink = _SyncSink()

    def __iter__(self) -> "Stream":
        return self

    def __next__(self):
        return self.sink.next()

    def close(self) -> None:
        """Stop the stream: its generator gets GeneratorExit in the worker. Idempotent."""
        self.sink.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        self.sink.cancel(post=True)


class _AsyncSink(_Sink):
    """An AsyncStream's state, read on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._loop = loop
        self._waiter: asyncio.Future | None = None

    def put(self, value) -> None:
        self._on_loop(self._append, value)

    def _settle(self, error: BaseException | None) -> None:
        if self._settled:
            raise InvalidStateError("this stream already has its end")
        self._settled = True
        self._on_loop(self._end, error)

    def _on_loop(self, fn, value) -> None:
        if asyncio._get_running_loop() is self._loop:  # dispatch runs on this loop
            fn(value)
            return
        try:
            self._loop.call_soon_threadsafe(fn, value)
        except RuntimeError:
            pass  # the loop is closed: nobody reads this stream any more

    def _append(self, value) -> None:
        if not self._cancelled:
            self._items.append(value)
            self._wake()

    def _end(self, error: BaseException | None) -> None:
        self._error = error
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    _ended = False  # the end reached the loop (``_settled`` is set where it was decided)

    async def anext(self):
        while not self._items and not self._ended and not self._cancelled:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.cancel()  # the consumer's task was cancelled: so is the stream
                raise
            finally:
                self._waiter = None
        value = self._pop(StopAsyncIteration)
        self._took_one()
        return value


class AsyncStream:
    """``async for item in pool.stream_async(x)``: :class:`Stream` for asyncio. ``aclose()``,
    a task cancelled while it waits for an item, or dropping the stream stops the generator
    in its worker."""

    __slots__ = ("sink",)

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.sink = _AsyncSink(loop)

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self):
        return await self.sink.anext()

    async def aclose(self) -> None:
        """Stop the stream: its generator gets GeneratorExit in the worker. Idempotent."""
        self.sink.cancel()

    def __del__(self):
        self.sink.cancel(post=True)
