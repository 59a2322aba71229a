"""The supervisor heals the pool: hung, retiring, failing-to-boot and randomly killed
workers; bounded and aborting close. Every accepted request gets exactly one answer."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch

import modelzoo
import workerpool as wp
from serve_models import AttachGuard
from testkit import is_running, wait_until


def sleepy_predict(model, x, seconds=0.0):
    time.sleep(seconds)
    return model(x)


def test_hung_worker_is_aborted_with_its_stack_and_replaced():
    x = torch.randn(2, 32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
    with wp.Pool(modelzoo.mlp, sleepy_predict, workers=1, threads_per_worker=1,
                 heartbeat_interval=0.1,
                 heartbeat_timeout=1.0) as pool:
        hung = pool.submit(x, seconds=3600)
        behind = pool.submit(x)  # sent to the same worker (second credit)
        with pytest.raises(wp.WorkerCrashed, match="silent for more than") as caught:
            hung.result(timeout=60)
        assert caught.value.exitcode == -signal.SIGABRT
        assert "sleepy_predict" in caught.value.crash_traceback  # where it was stuck
        assert torch.equal(behind.result(timeout=60), expected)  # retried elsewhere
        assert torch.equal(pool.submit(x).result(timeout=60), expected)
        assert pool.stats(memory_usage=False)["hung"] == 1


def test_a_hang_inside_a_chunk_is_pinned_on_the_request_that_hangs():
    """Under a backlog calls travel in chunks whose answers come together, so which call
    hung is not known when the worker is aborted: the whole chunk is retried, each call
    alone, and only the one that hangs again fails."""
    x = torch.randn(2, 32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
    with wp.Pool(modelzoo.mlp, sleepy_predict, workers=1, threads_per_worker=1,
                 heartbeat_interval=0.1, heartbeat_timeout=1.0) as pool:
        # fast calls first: the pool chunks only calls it has seen to be fast
        for _ in range(16):
            pool.submit(x, seconds=0.0).result(timeout=60)
        # the first call keeps the worker busy while the rest queue up: they leave as a chunk
        seconds = {0: 0.5, 5: 3600}
        futures = [pool.submit(x, seconds=seconds.get(i, 0.0)) for i in range(12)]
        with pytest.raises(wp.WorkerCrashed, match="silent for more than"):
            futures[5].result(timeout=120)
        for i, future in enumerate(futures):
            if i != 5:
                assert torch.equal(future.result(timeout=120), expected)
        stats = pool.stats(memory_usage=False)
        assert stats["hung"] == 2  # the chunk's worker, then the one running it alone
        assert stats["mean_batch_size"] == 1.0  # a chunk is separate calls, not a batch


def test_idle_workers_heartbeat_and_are_left_alone():
    with wp.Pool(modelzoo.mlp, sleepy_predict, workers=2, heartbeat_interval=0.2,
                 heartbeat_timeout=1.0) as pool:
        pids = sorted(pool.pids)
        time.sleep(3.0)  # three heartbeat timeouts of idleness
        assert sorted(pool.pids) == pids
        assert pool.stats(memory_usage=False)["hung"] == 0


def test_workers_are_recycled_after_max_requests_without_losing_work():
    x = torch.randn(2, 32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
    with wp.Pool(modelzoo.mlp, modelzoo.torch_predict, workers=2, max_requests_per_worker=5,
                 max_requests_jitter=3) as pool:
        first = set(pool.pids)
        results = [f.result(timeout=60) for f in [pool.submit(x) for _ in range(60)]]
        assert all(torch.equal(r, expected) for r in results)
        stats = pool.stats(memory_usage=False)
        assert stats["retired"] >= 60 // (5 + 3) - 2
        assert stats["crashes"] == 0 and stats["retried_requests"] == 0
        assert all(w["requests_served"] <= 8 for w in stats["workers"])
        assert not first & set(pool.pids)


def identity_predict(model, x):
    return x


def test_boot_failures_back_off_then_mark_the_pool_broken(tmp_path):
    marker = str(tmp_path / "armed")
    with wp.Pool(lambda: AttachGuard(marker), identity_predict, workers=1,
                 start_method="spawn") as pool:
        assert pool.submit(1).result(timeout=60) == 1
        open(marker, "w").close()
        os.kill(pool.pids[0], signal.SIGKILL)
        waiting = pool.submit(2)  # accepted while no worker can start
        with pytest.raises(wp.PoolBroken, match="in a row failed to start") as caught:
            waiting.result(timeout=120)
        assert "cannot attach" in str(caught.value)  # the worker's own traceback
        with pytest.raises(wp.PoolBroken):
            pool.submit(3)  # at once
        assert pool.stats(memory_usage=False)["restarts"] == 3  # backed off, not a storm


def slow_echo(model, x, seconds=0.0):
    time.sleep(seconds)
    return x


def test_a_killed_zygote_is_replaced_and_its_workers_requests_retried():
    """The zygote's workers die with it (they watch it); a new zygote attaches the weights
    the pool still holds and starts a full set: every request answered, none failed."""
    with wp.Pool(modelzoo.numpy_model, slow_echo, workers=2) as pool:
        zygote, workers = pool.zygote_pid, pool.pids
        running = [pool.submit(i, seconds=0.5) for i in range(4)]
        time.sleep(0.2)  # two of them running, two queued behind
        os.kill(zygote, signal.SIGKILL)
        assert [f.result(timeout=60) for f in running] == [0, 1, 2, 3]
        stats = pool.stats(memory_usage=False)
        assert pool.zygote_pid not in (zygote, None) and is_running(pool.zygote_pid)
        assert stats["zygote_restarts"] == 1 and stats["crashes"] == 0
        assert stats["retried_requests"] >= 2
        assert not set(pool.pids) & set(workers)
        assert pool.submit(7).result(timeout=30) == 7
    assert not is_running(zygote) and not any(is_running(p) for p in workers)


def test_a_zygote_that_cannot_be_replaced_breaks_the_pool_with_its_reason(tmp_path):
    marker = str(tmp_path / "armed")
    with wp.Pool(lambda: AttachGuard(marker), identity_predict,
                 workers=1) as pool:
        assert pool.submit(1).result(timeout=60) == 1
        open(marker, "w").close()  # no new zygote can attach the model now
        os.kill(pool.zygote_pid, signal.SIGKILL)
        assert wait_until(lambda: pool.broken is not None, 60)
        assert "3 new ones failed to start" in str(pool.broken)
        assert "cannot attach" in str(pool.broken)  # the new zygotes' own traceback
        with pytest.raises(wp.PoolBroken):
            pool.submit(2)
        assert pool.stats(memory_usage=False)["zygote_restarts"] == 0


def test_close_without_drain_fails_pending_work_at_once():
    x = torch.randn(2, 32)
    pool = wp.Pool(modelzoo.mlp, sleepy_predict, workers=2)
    pids = pool.pids
    futures = [pool.submit(x, seconds=30) for _ in range(10)]
    started = time.monotonic()
    pool.close(drain=False)
    assert time.monotonic() - started < 30  # it did not wait for the sleeping workers
    for future in futures:
        with pytest.raises(wp.PoolClosed):
            future.result(timeout=0)
    assert not any(is_running(pid) for pid in pids)


def test_close_with_drain_is_bounded_by_its_timeout():
    x = torch.randn(2, 32)
    pool = wp.Pool(modelzoo.mlp, sleepy_predict, workers=1)
    quick = pool.submit(x)
    assert quick.result(timeout=60) is not None
    slow = [pool.submit(x, seconds=0.4) for _ in range(20)]  # ~8 s of work for one worker
    pool.close(drain=True, timeout=1.0)
    done = [f for f in slow if f.exception(timeout=0) is None]
    failed = [f for f in slow if f.exception(timeout=0) is not None]
    assert done, "the drain did not finish the requests it had time for"
    assert failed and all(isinstance(f.exception(), wp.PoolClosed) for f in failed)


def double_predict(model, x):
    time.sleep(0.002)  # long enough for the run to see dozens of kills
    return x * 2


@pytest.mark.slow
def test_chaos_random_kills_lose_nothing():
    """Kill a random worker every ~50 ms, and the zygote every second, while 2,000
    requests with known answers run.

    Zygote workers only: a spawned worker needs ~1.5 s to start, longer than the interval
    between kills (the crash table covers spawn's retries)."""
    n_requests = 2000
    kills, zygote_kills = [], []
    with wp.Pool(modelzoo.numpy_model, double_predict, workers=2) as pool:
        stop = threading.Event()

        def killer():
            rng = random.Random(0)
            rounds = 0
            while not stop.wait(0.05):
                rounds += 1
                # the zygote too, every second (a new one starts in well under that)
                pids = [pool.zygote_pid] if rounds % 20 == 0 else pool.pids
                if pids and pids[0]:
                    victim = rng.choice(pids)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills.append(victim)
                        if rounds % 20 == 0:
                            zygote_kills.append(victim)
                    except ProcessLookupError:
                        pass

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            futures = [pool.submit(np.full(4, i, dtype=np.int64)) for i in range(n_requests)]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result(timeout=300))
                except wp.WorkerCrashed as crash:
                    outcomes.append(crash)
        finally:
            stop.set()
            thread.join()
        stats = pool.stats(memory_usage=False)
    correct = sum(1 for i, o in enumerate(outcomes)
                  if isinstance(o, np.ndarray) and np.array_equal(o, np.full(4, 2 * i)))
    crashed = sum(1 for o in outcomes if isinstance(o, wp.WorkerCrashed))
    wrong = len(outcomes) - correct - crashed
    print(f"\nchaos: {n_requests} requests, {len(kills)} kills "
          f"({len(zygote_kills)} zygotes, {stats['zygote_restarts']} restarted), "
          f"{correct} correct, {crashed} WorkerCrashed, {wrong} wrong, 0 lost; "
          f"{stats['retried_requests']} retried, {stats['late_replies']} late replies dropped")
    assert len(outcomes) == n_requests  # none lost: every future answered
    assert wrong == 0
    assert len(kills) >= 5, "the chaos did not happen"
    assert stats["crashes"] >= 5
    assert zygote_kills and stats["zygote_restarts"] >= 1
