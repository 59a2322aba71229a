"""Streaming through the Pool: a predict that yields, read item by item (Pool.stream,
Pool.stream_async), stopped early from the consumer's side, cut by a crash or a deadline.

Every generator here leaves a trace in a directory of its own (tmp_path): a file per item
it produced and one when it got GeneratorExit, so cancellation is seen from inside the
worker, not inferred from timing.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

import workerpool as wp
from workerpool.errors import OutputEncodeError, TaskTimeout, WorkerCrashed
from workerpool.pool.streams import WINDOW
from workerpool.serve import demo_generator
from testkit import wait_until

pytestmark = pytest.mark.module_pool


def weights():
    return {"scale": np.arange(1.0, 5.0)}


def counting(model, n, trace=None, delay=0.0, fail_at=None, kill_at=None):
    """Yield ``model["scale"] * i`` for i < n; traces each item and GeneratorExit."""
    try:
        for i in range(n):
            if delay:
                time.sleep(delay)
            if i == fail_at:
                raise KeyError(f"item {i}")
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if trace:
                open(os.path.join(trace, f"item-{i}"), "w").close()
            yield model["scale"] * i
    except GeneratorExit:
        if trace:
            open(os.path.join(trace, "exit"), "w").close()
        raise


def plain(model, x):
    return model["scale"] * x


def either(model, x, n=0):
    """A plain call, or (``n``) a stream of ``n`` items: one model serving both."""
    return counting(model, n) if n else plain(model, x)


def produced(trace) -> int:
    return sum(name.startswith("item-") for name in os.listdir(trace))


@pytest.fixture(scope="module")
def pool():
    with wp.Pool(weights, counting, workers=2) as pool:
        yield pool


def expected(n):
    return [weights()["scale"] * i for i in range(n)]


def check_serving(pool):
    """The pool still answers, streams and plain calls alike."""
    assert [list(x) for x in pool.stream(3)] == [list(x) for x in expected(3)]


def test_stream_yields_what_the_generator_yields_in_order(pool):
    items = list(pool.stream(1000))
    assert len(items) == 1000
    np.testing.assert_array_equal(np.stack(items), np.stack(expected(1000)))


def test_a_model_that_returns_a_value_streams_one_item():
    with wp.Pool(weights, plain, workers=1) as pool:
        (item,) = list(pool.stream(3.0))
        np.testing.assert_array_equal(item, weights()["scale"] * 3.0)


def test_submit_on_a_generator_model_says_to_stream(pool):
    with pytest.raises(OutputEncodeError, match="Pool.stream"):
        pool.submit(3).result(timeout=30)
    check_serving(pool)


def test_closing_early_stops_the_generator_in_its_worker_and_frees_it(tmp_path):
    with wp.Pool(weights, counting, workers=1) as pool:
        stream = pool.stream(10**6, str(tmp_path), 0.001)
        for i, _ in enumerate(stream):
            if i == 4:
                break
        stream.close()
        assert wait_until(lambda: (tmp_path / "exit").exists(), 30)
        # a few items past the consumer at most: the window it was granted
        assert produced(tmp_path) <= 5 + WINDOW
        # the one worker is free: the next stream runs to its end
        assert len(list(pool.stream(5))) == 5


def test_a_stream_dropped_unclosed_stops_its_generator_too(tmp_path):
    with wp.Pool(weights, counting, workers=1) as pool:
        stream = pool.stream(10**6, str(tmp_path), 0.001)
        next(stream)
        del stream  # the consumer forgot it: its finalizer cancels it
        gc.collect()
        assert wait_until(lambda: (tmp_path / "exit").exists(), 30)
        assert len(list(pool.stream(3))) == 3


def test_a_slow_consumer_holds_the_generator_to_its_window(tmp_path):
    with wp.Pool(weights, counting, workers=1) as pool:
        with pool.stream(10**6, str(tmp_path)) as stream:
            next(stream)
            # the worker would make a million items if nothing held it back
            assert not wait_until(lambda: produced(tmp_path) > WINDOW + 1, 1.0)
            taken = 1 + sum(1 for _ in zip(range(100), stream))
            assert taken == 101
            assert not wait_until(lambda: produced(tmp_path) > taken + WINDOW, 1.0)
        assert wait_until(lambda: (tmp_path / "exit").exists(), 30)


def test_async_stream_aclose_and_task_cancel_stop_the_generator(tmp_path):
    with wp.Pool(weights, counting, workers=1) as pool:
        async def main():
            items = [x async for x in pool.stream_async(50)]
            assert len(items) == 50
            closed, cancelled = tmp_path / "closed", tmp_path / "cancelled"
            closed.mkdir()
            cancelled.mkdir()
            stream = pool.stream_async(10**6, str(closed), 0.001)
            async for i in stream:
                break
            await stream.aclose()

            async def consume():
                async for _ in pool.stream_async(10**6, str(cancelled), 0.001):
                    pass
            task = asyncio.create_task(consume())
            while produced(cancelled) < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return closed, cancelled

        closed, cancelled = asyncio.run(main())
        assert wait_until(lambda: (closed / "exit").exists(), 30)
        assert wait_until(lambda: (cancelled / "exit").exists(), 30)
        assert len(list(pool.stream(4))) == 4


def test_an_error_in_predict_comes_after_the_items_before_it(pool):
    items = []
    with pytest.raises(KeyError, match="item 7"):
        for item in pool.stream(100, fail_at=7):
            items.append(item)
    assert len(items) == 7
    check_serving(pool)


def test_a_worker_killed_mid_stream_raises_worker_crashed_after_its_items(tmp_path):
    with wp.Pool(weights, counting, workers=1) as pool:
        items = []
        with pytest.raises(WorkerCrashed, match="items of this stream") as crash:
            # 20 ms an item: the first ones reach the pool well before the kill (a
            # stream whose items had not arrived when its worker died would be retried)
            for item in pool.stream(100, str(tmp_path), 0.02, kill_at=5):
                items.append(item)
        # what reached the pool before the kill reached the consumer, and said so
        assert f"after {len(items)} items" in str(crash.value)
        assert 4 <= len(items) <= 5
        np.testing.assert_array_equal(np.stack(items), np.stack(expected(len(items))))
        # not retried: the generator ran once (its trace has items 0..4 only)
        assert produced(tmp_path) == 5
        assert pool.stats(memory_usage=False)["crashes"] == 1
        check_serving(pool)


def test_a_deadline_bounds_the_whole_stream(tmp_path):
    with wp.Pool(weights, counting, workers=1) as pool:
        items = []
        with pytest.raises(TaskTimeout, match="stream"):
            for item in pool.stream(10**6, str(tmp_path), 0.01, timeout=0.5):
                items.append(item)
        assert items  # it ran, then was cut
        assert wait_until(lambda: (tmp_path / "exit").exists(), 30)  # told to stop, and did
        assert pool.stats(memory_usage=False)["hung"] == 0
        check_serving(pool)


def test_streams_and_plain_calls_together_lose_nothing():
    with wp.Pool(weights, either, workers=2) as pool:
        errors, results = [], []

        def plain_calls():
            try:
                futures = [pool.submit(float(i)) for i in range(200)]
                results.extend(f.result(timeout=60) for f in futures)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def streams(k):
            try:
                for j in range(10):
                    stream = pool.stream(0.0, n=40)
                    if j % 3 == 0:
                        next(stream)
                        stream.close()  # cut short
                    else:
                        assert len(list(stream)) == 40
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=plain_calls)] + \
            [threading.Thread(target=streams, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert len(results) == 200  # every plain call answered, each with its own value
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result, weights()["scale"] * i)
        assert len(list(pool.stream(0.0, n=5))) == 5


def test_demo_generator_through_the_pool_equals_in_process():
    with wp.Pool(demo_generator.load, demo_generator.predict, workers=1) as pool:
        inputs = {"text_input": [b"Once upon"], "max_tokens": np.array([30], np.int32)}
        text = "".join(item["text_output"][0].decode() for item in pool.stream(inputs))
    assert text == demo_generator.complete("Once upon", 30)
    assert len(text) == 30
