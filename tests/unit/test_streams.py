"""The consumer's end of a stream (pool/streams.py): order, the window of credit it grants,
its end and its error, and cancellation, for Stream and AsyncStream, without a pool."""

from __future__ import annotations

import asyncio
import threading

import pytest

from workerpool.pool.streams import WINDOW, AsyncStream, Stream


class Controls:
    def __init__(self):
        self.credit, self.cancels = 0, 0

    def __call__(self, credit=0, cancel=False, post=False):
        self.credit += credit
        self.cancels += cancel


def attached(stream):
    """The stream, and what its sink told the pool; ``stream.sink`` is the pool's side."""
    controls = Controls()
    stream.sink.attach(controls)
    assert stream.sink.set_running_or_notify_cancel()
    return stream, controls


def test_items_in_order_then_the_end_and_credit_as_the_consumer_takes_them():
    stream, controls = attached(Stream())
    granted = []
    for i in range(3 * WINDOW):
        stream.sink.put(i)
        assert next(stream) == i
        granted.append(controls.credit)
    # half a window more each time half the window was taken: the worker is never more
    # than WINDOW items ahead of what was read
    assert granted[WINDOW // 2 - 2] == 0 and granted[WINDOW // 2 - 1] == WINDOW // 2
    assert all(WINDOW + g - (i + 1) > 0 for i, g in enumerate(granted))
    assert all(WINDOW + g - (i + 1) <= WINDOW for i, g in enumerate(granted))
    stream.sink.set_result(None)
    assert list(stream) == []
    assert controls.cancels == 0


def test_the_error_comes_after_the_items_and_once():
    stream, _ = attached(Stream())
    stream.sink.put("a")
    stream.sink.set_exception(KeyError("boom"))
    assert next(stream) == "a"
    with pytest.raises(KeyError):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


def test_close_cancels_once_wakes_a_waiting_reader_and_drops_what_comes_later():
    stream, controls = attached(Stream())
    got = []
    reader = threading.Thread(target=lambda: got.extend(stream))
    reader.start()
    stream.sink.put(1)
    while not got:
        pass
    stream.close()
    stream.close()
    reader.join(10)
    assert not reader.is_alive() and got == [1]
    assert controls.cancels == 1 and stream.sink.done()
    stream.sink.put(2)
    assert list(stream) == []
    assert not stream.sink.set_running_or_notify_cancel()  # (a queued one would never be sent)


def test_async_stream_order_end_and_a_cancelled_reader_cancels_the_stream():
    async def main():
        stream, controls = attached(AsyncStream(asyncio.get_running_loop()))
        for i in range(5):
            stream.sink.put(i)
        stream.sink.set_result(None)
        assert [x async for x in stream] == list(range(5))

        waiting, controls = attached(AsyncStream(asyncio.get_running_loop()))

        async def read():
            return [x async for x in waiting]
        task = asyncio.create_task(read())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert controls.cancels == 1 and waiting.sink.done()

        failing, _ = attached(AsyncStream(asyncio.get_running_loop()))
        failing.sink.put("a")
        failing.sink.set_exception(ValueError("bad"))
        assert await failing.__anext__() == "a"
        with pytest.raises(ValueError):
            await failing.__anext__()

    asyncio.run(main())
