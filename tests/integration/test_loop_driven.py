"""A pool whose dispatch runs on an asyncio event loop (Pool.drive_on, pool/loop_driver.py),
as ``workerpool serve`` runs every pool: the same guarantees as on the pool's own thread
(every request answered right under worker kills, a hot swap and the zygote's death,
callers on other threads served, nothing left after close), and the pool back on its thread when the loop stops."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np

import modelzoo
import workerpool as wp
from testkit import is_running, wait_until


def double_slowly(model, x):
    time.sleep(0.002)
    return x * 2


def rows(i: int) -> np.ndarray:
    return np.full((1, 4), i, dtype=np.float32)


def test_a_loop_driven_pool_answers_everything_through_kills_a_swap_and_other_threads():
    """Dispatch on the loop through worker kills, a reload and the death of a zygote."""
    pool = wp.Pool(modelzoo.numpy_model, double_slowly, workers=2)
    pids_seen: set[int] = set()

    async def main():
        pool.drive_on(asyncio.get_running_loop())
        assert wait_until(lambda: pool.stats(memory_usage=False)["dispatch"] == "event loop",
                          timeout=10)

        swapped = asyncio.Event()

        async def caller(i):
            return i, await pool.submit_async(rows(i))

        async def killer():
            for _ in range(2):
                await asyncio.sleep(0.15)
                victim = pool.pids[0]
                pids_seen.add(victim)
                os.kill(victim, signal.SIGKILL)
            await asyncio.sleep(0.6)
            # after the swap: the new version's zygote (the retiring version's, killed while
            # it drains, is test_reload's subject)
            await swapped.wait()
            zygote = pool.zygote_pid
            pids_seen.add(zygote)
            os.kill(zygote, signal.SIGKILL)  # restarting it is the thread's (it sleeps)

        async def swap():
            await asyncio.sleep(0.1)
            try:
                return await pool.reload_async(version="second")
            finally:
                swapped.set()

        def from_a_thread():  # posted to the inbox; the loop wakes for it
            return [pool.submit(rows(1000 + i)).result(timeout=60) for i in range(40)]

        answers, _, version, threaded = await asyncio.gather(
            asyncio.gather(*(caller(i) for i in range(800))), killer(), swap(),
            asyncio.to_thread(from_a_thread))
        await asyncio.to_thread(wait_until, lambda: pool.stats(memory_usage=False)[
            "dispatch"] == "event loop", 10)  # handed back for the restart, then over again
        after = await pool.submit_async(rows(7))
        assert np.array_equal(after, rows(7) * 2)
        stats = pool.stats(memory_usage=False)
        await asyncio.to_thread(pool.close)
        return answers, version, threaded, stats

    answers, version, threaded, stats = asyncio.run(main())
    assert all(np.array_equal(y, rows(i) * 2) for i, y in answers)
    assert all(np.array_equal(y, rows(1000 + i) * 2) for i, y in enumerate(threaded))
    assert version == "second" and stats["generation"] == 2
    assert stats["dispatch"] == "event loop"  # the new version is driven by the loop too
    assert stats["crashes"] >= 1  # the kills landed while requests were in flight
    assert not any(is_running(pid) for pid in pids_seen | set(pool_pids(stats)))


def pool_pids(stats: dict) -> list[int]:
    return [w["pid"] for w in stats["workers"]] + [stats["zygote"]["pid"]]


def test_a_caller_on_the_loop_is_answered_while_the_thread_hands_it_the_sockets(monkeypatch):
    """stats() from a coroutine, posted after the thread saw drive_on but before its
    driver exists: the loop must not wait for itself (it waited 30 s, then TimeoutError)."""
    from workerpool.pool import dispatcher as dispatcher_module

    handing_over = threading.Event()

    class SlowToHandOver(dispatcher_module.LoopDriver):
        def __init__(self, *args):
            handing_over.set()
            time.sleep(0.3)  # the window, widened: the thread is between its loop and take()
            super().__init__(*args)

    monkeypatch.setattr(dispatcher_module, "LoopDriver", SlowToHandOver)
    pool = wp.Pool(modelzoo.numpy_model, double_slowly, workers=1)

    async def main():
        pool.drive_on(asyncio.get_running_loop())
        assert handing_over.wait(10)  # blocks the loop: take() cannot run before stats()
        dispatch = pool.stats(memory_usage=False)["dispatch"]  # TimeoutError if it waits
        return dispatch, await pool.submit_async(rows(5))

    try:
        dispatch, answer = asyncio.run(main())
    finally:
        pool.close()
    assert dispatch == "event loop" and np.array_equal(answer, rows(5) * 2)


def test_close_on_the_thread_of_a_loop_that_stopped_waits_for_the_pool_to_close():
    """Right after the loop that drove the pool stopped (before the thread noticed), close()
    on that loop's thread must not take itself for the dispatcher and return at once: when
    it returns, no process of the pool is left."""
    pool = wp.Pool(modelzoo.numpy_model, double_slowly, workers=1)

    async def main():
        pool.drive_on(asyncio.get_running_loop())
        return await pool.submit_async(rows(2))  # dispatched by this loop

    assert np.array_equal(asyncio.run(main()), rows(2) * 2)
    pids = pool.pids + [pool.zygote_pid]
    pool.close()
    assert not any(is_running(pid) for pid in pids)


def test_a_stopped_loop_gives_the_pool_back_to_its_thread():
    pool = wp.Pool(modelzoo.numpy_model, double_slowly, workers=1)
    loop = asyncio.new_event_loop()
    try:
        async def main():
            pool.drive_on(asyncio.get_running_loop())
            assert wait_until(
                lambda: pool.stats(memory_usage=False)["dispatch"] == "event loop", timeout=10)
            return await pool.submit_async(rows(3))

        assert np.array_equal(loop.run_until_complete(main()), rows(3) * 2)
        # The loop no longer runs: within half a second the thread takes dispatch back.
        assert np.array_equal(pool.submit(rows(4)).result(timeout=30), rows(4) * 2)
        assert pool.stats(memory_usage=False)["dispatch"] == "thread"
        pids = pool.pids + [pool.zygote_pid]
        pool.close()
        assert not any(is_running(pid) for pid in pids)
    finally:
        loop.close()
