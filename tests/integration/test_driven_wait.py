"""A caller waiting on ``submit(...).result()`` reads its own answer (pool/driven_future.py):
the answer is settled on the waiting thread, not the pool's; many waiting threads share
the sockets without losing a request, a worker killed meanwhile included; Ctrl-C while
waiting leaves the pool whole and the request answered."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

import modelzoo
import workerpool as wp
from workerpool.config import usable_cores
from workerpool.pool.dispatcher import DRIVE_SLICE_S
from testkit import ctrl_c_once, wait_until

pytestmark = pytest.mark.module_pool


def sleepy_echo(model, x, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    return x


@pytest.fixture(scope="module")
def pool():
    with wp.Pool(modelzoo.numpy_model, sleepy_echo, workers=2) as pool:
        yield pool


def settled_on(future) -> list[int]:
    threads = []
    future.add_done_callback(lambda f: threads.append(threading.get_ident()))
    return threads


@pytest.mark.parametrize("where", ["main thread", "other thread"])
def test_the_waiting_thread_reads_its_own_answer(pool, where):
    def calls():
        seen = []
        for i in range(5):
            # Answered after the callback is on, and well within one of the caller's
            # slices: at a slice's end it lets go of the sockets, and an answer arriving
            # just then may be read by the pool's thread (by design).
            future = pool.submit(float(i), sleep=DRIVE_SLICE_S / 5)
            threads = settled_on(future)
            assert future.result(timeout=30) == float(i)
            seen += threads
        return seen

    if where == "main thread":
        seen, caller = calls(), threading.get_ident()
    else:
        out = []
        thread = threading.Thread(target=lambda: out.append(calls()))
        thread.start()
        thread.join(60)
        seen, caller = out[0], thread.ident
    assert seen == [caller] * 5  # not the pool's thread: no wake of it per request


def test_a_future_waited_on_elsewhere_is_still_answered_by_the_pool(pool):
    future = pool.submit(7.0, sleep=0.05)
    threads = settled_on(future)
    assert wait_until(future.done, 30)  # nobody calls result(): the pool's thread answers
    assert future.result() == 7.0
    assert threads and threads[0] != threading.get_ident()


def test_threads_waiting_together_lose_nothing_while_a_worker_is_killed(pool):
    results, errors = {}, []

    def caller(n):
        try:
            for i in range(150):
                value = n * 1000.0 + i
                results[(n, i)] = pool.submit(value).result(timeout=60) == value
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(results) >= 200, 60)
    os.kill(pool.pids[0], signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(results) == 900 and all(results.values())
    assert pool.broken is None


def test_ctrl_c_while_waiting_loses_nothing(pool):
    future = pool.submit(2.0, sleep=2.0)
    with ctrl_c_once(future.running):
        with pytest.raises(KeyboardInterrupt):
            future.result(timeout=30)
    assert future.result(timeout=30) == 2.0  # still answered
    assert pool.broken is None
    x = np.arange(4.0)
    assert np.array_equal(pool.submit(x).result(timeout=30), x)


def test_callbacks_that_call_the_pool_run_outside_its_locks(pool):
    # A submit that sends its request itself also reads the replies waiting then (other
    # threads' answers); their futures' callbacks must not run under the pool's locks (a
    # callback that submits would wait on a lock its own thread holds: a hang).
    chained, errors = [], []

    def resubmit(future):
        chained.append(pool.submit(future.result() + 1.0))

    def caller(n):
        try:
            for i in range(100):
                future = pool.submit(n * 1000.0 + i)
                future.add_done_callback(resubmit)
                future.result(timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    assert wait_until(lambda: len(chained) == 400, 60)
    assert sorted(f.result(timeout=60) for f in chained) == sorted(
        n * 1000.0 + i + 1.0 for n in range(4) for i in range(100))


def voluntary_switches() -> int:
    """This thread's voluntary context switches so far: each time it slept (in poll(), on
    a lock)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


def switches_per_call(pool, calls: int = 50) -> float:
    for i in range(20):  # the typical call is timed first
        assert pool.submit(float(i), sleep=0.001).result(timeout=30) == float(i)
    before = voluntary_switches()
    for i in range(calls):
        assert pool.submit(float(i), sleep=0.001).result(timeout=30) == float(i)
    return (voluntary_switches() - before) / calls


@pytest.mark.skipif(usable_cores() < 2, reason="a caller never spins on one core")
def test_a_lone_caller_of_a_fast_model_looks_for_its_answer_before_it_sleeps():
    # A 1 ms call, and a spin far longer: the answer is in before the spin ends, so the
    # caller never sleeps for it (waking a sleeping thread was a quarter of a round trip).
    with wp.Pool(modelzoo.numpy_model, sleepy_echo, workers=1, spin_wait_ms=50) as spinning, \
            wp.Pool(modelzoo.numpy_model, sleepy_echo, workers=1, spin_wait_ms=0) as sleeping:
        per_call = {"spinning": switches_per_call(spinning),
                    "sleeping": switches_per_call(sleeping)}
    assert per_call["spinning"] < 0.2 and per_call["sleeping"] > 0.8, per_call


@pytest.mark.skipif(usable_cores() < 2, reason="needs a second core to take away")
def test_a_pool_started_on_one_core_never_spins():
    # The spin would keep the only core from the worker it waits for.
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        pool = wp.Pool(modelzoo.numpy_model, sleepy_echo, workers=1, spin_wait_ms=50)
    finally:
        os.sched_setaffinity(0, cores)
    with pool:
        assert switches_per_call(pool) > 0.8
