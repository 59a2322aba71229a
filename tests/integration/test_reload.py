"""Pool.reload: a new version loaded once, switched in for every worker at once, no request lost."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import psutil
import pytest
import torch
from torch import nn

import modelzoo
import workerpool as wp
from testkit import Traffic, is_running, our_memfds, wait_until

X = torch.ones(1, 8)


def versioned(version: int):
    """A model whose every output element is 8 * version: the output names its version."""
    def load():
        model = nn.Linear(8, 8)
        with torch.no_grad():
            model.weight.fill_(float(version))
            model.bias.zero_()
        return model.eval()
    return load


def version_of(output: torch.Tensor) -> int:
    """Which version answered; fails unless the output is exactly that version's."""
    version = int(output[0, 0].item()) // 8
    assert torch.equal(output, modelzoo.reference(versioned(version), predict_slowly, X)), \
        f"{output} is not exactly the output of any version"
    return version


def predict_slowly(model, x):
    time.sleep(0.002)  # so requests are in flight at every swap
    return model(x)


def old_generation_gone(pool_pids: list[int]) -> bool:
    return not any(is_running(pid) for pid in pool_pids) and len(our_memfds()) == 1


def test_ten_hot_swaps_under_eight_callers_lose_nothing_and_never_go_back():
    with wp.Pool(versioned(1), predict_slowly, workers=2, warmup=[X]) as pool:
        # floor: the version every request sent from now on must get (or a newer one)
        with Traffic(lambda _: version_of(pool.submit(X).result(timeout=60)), 8,
                     floor=1) as traffic:
            retired_pids = []
            for version in range(2, 12):
                time.sleep(0.15)
                old_pids = pool.pids + [pool.zygote_pid]
                assert pool.reload(versioned(version), version=f"v{version}") == f"v{version}"
                traffic.floor = version
                retired_pids += old_pids
                assert not set(pool.pids) & set(old_pids)
            time.sleep(0.15)
        answers, failures = traffic.answers, traffic.failures
        assert not failures, failures[:3]
        assert len(answers) > 200
        for at_least, answered in answers:
            assert answered >= at_least, "a request submitted after a swap reached the old version"
        assert {answered for _, answered in answers} == set(range(1, 12))
        # Each retired version's processes leave and its segment is released.
        assert wait_until(lambda: old_generation_gone(retired_pids))
        stats = pool.stats(memory_usage=False)
        assert (stats["version"], stats["generation"]) == ("v11", 11)
        assert stats["retiring_versions"] == [] and stats["retiring_workers"] == []
        # Histograms count every version's requests, so they never go backwards.
        assert stats["compute_seconds_histogram"]["count"] >= len(answers)


def test_requests_accepted_before_the_swap_finish_on_the_old_version():
    with wp.Pool(versioned(1), slow_predict, workers=1) as pool:
        queued = [pool.submit(X, 0.2)] + [pool.submit(X, 0.0) for _ in range(5)]
        pool.reload(versioned(2))
        after = [pool.submit(X, 0.0) for _ in range(5)]
        assert [version_of(f.result(timeout=30)) for f in queued] == [1] * 6
        assert [version_of(f.result(timeout=30)) for f in after] == [2] * 5


def slow_predict(model, x, delay):
    time.sleep(delay)
    return model(x)


def raise_in_load():
    raise OSError("weights.pt: no such file")


class AttachBomb:
    """Publishes fine in the parent; cannot be rebuilt in the zygote."""

    def __reduce__(self):
        return explode_outside, (os.getpid(),)


def explode_outside(parent_pid: int):
    if os.getpid() != parent_pid:
        raise RuntimeError("this model cannot be attached")
    return AttachBomb()


def bomb_model():
    return {"net": versioned(2)(), "bomb": AttachBomb()}


class RefusesWarmup(nn.Linear):
    def forward(self, x):
        raise ValueError("version 2 is broken")


def refusing_model():
    return RefusesWarmup(8, 8)


@pytest.mark.parametrize("load, cause", [
    (raise_in_load, "OSError: weights.pt: no such file"),
    (bomb_model, "cannot be attached"),
    (refusing_model, "version 2 is broken"),
], ids=["load raises", "workers cannot start", "warm-up fails"])
def test_a_failed_reload_leaves_the_old_version_serving(load, cause):
    with wp.Pool(versioned(1), modelzoo.torch_predict, workers=2, warmup=[X],
                 start_timeout=60) as pool:
        version, pids = pool.version, sorted(pool.pids)
        with pytest.raises(wp.ReloadFailed, match=cause) as raised:
            pool.reload(load)
        assert f"{version} still serving" in str(raised.value)
        assert raised.value.__cause__ is not None
        assert version_of(pool.submit(X).result(timeout=30)) == 1
        assert (pool.version, sorted(pool.pids)) == (version, pids)
        assert len(our_memfds()) == 1  # the failed version's segment is gone already
        # and the pool still reloads afterwards
        pool.reload(versioned(3))
        assert version_of(pool.submit(X).result(timeout=30)) == 3


def test_the_version_is_a_hash_of_the_weights_unless_labelled():
    with wp.Pool(versioned(1), modelzoo.torch_predict, workers=1) as pool:
        first = pool.version
        assert first.startswith("sha256:")
        assert pool.reload() == first  # the same load again: the same weights
        assert pool.reload(versioned(2)) != first
        assert pool.reload(versioned(1), version=7) == "7" == pool.stats()["version"]
        with pytest.raises(wp.ReloadFailed, match="version must be"):
            pool.reload(version=["x"])


def test_reload_rereads_the_pools_model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(versioned(1)().state_dict(), path)

    def builder():
        return nn.Linear(8, 8)

    with wp.Pool(str(path), modelzoo.torch_predict, workers=1, builder=builder) as pool:
        assert version_of(pool.submit(X).result(timeout=30)) == 1
        staged = tmp_path / "model.pt.tmp"
        torch.save(versioned(2)().state_dict(), staged)
        os.replace(staged, path)  # the served file is never written in place
        pool.reload()
        assert version_of(pool.submit(X).result(timeout=30)) == 2


def test_reload_async_keeps_the_event_loop_serving():
    async def main(pool):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        version = await pool.reload_async(versioned(2), version="two")
        answered = version_of(await pool.submit_async(X))
        task.cancel()
        return version, answered, ticks

    with wp.Pool(versioned(1), modelzoo.torch_predict, workers=1) as pool:
        version, answered, ticks = asyncio.run(main(pool))
    assert (version, answered) == ("two", 2)
    assert ticks > 3  # the loop ran while the new version started


def test_close_while_the_old_version_drains_leaves_nothing():
    # the leak check after the test asserts no process, segment or ipc directory is left
    pool = wp.Pool(versioned(1), slow_predict, workers=1)
    futures = [pool.submit(X, 0.1) for _ in range(3)]
    pool.reload(versioned(2))
    pool.close()
    assert [version_of(f.result(timeout=0)) for f in futures] == [1, 1, 1]
    with pytest.raises(wp.PoolClosed):
        pool.reload(versioned(3))


@pytest.mark.parametrize("victim", ["worker", "zygote"])
def test_the_old_versions_requests_survive_its_worker_or_zygote_dying_while_it_drains(victim):
    # The old version drains after the swap; a death there is retried on a new worker (or
    # zygote) of the old version, as it would be before the swap: nothing fails.
    with wp.Pool(versioned(1), slow_predict, workers=1) as pool:
        old_zygote, (old_worker,) = pool.zygote_pid, pool.pids
        accepted = [pool.submit(X, 1.0) for _ in range(6)]
        pool.reload(versioned(2))
        assert not all(f.done() for f in accepted)  # (the swap takes well under 6 s)
        os.kill(old_zygote if victim == "zygote" else old_worker, 9)
        assert [version_of(f.result(timeout=60)) for f in accepted] == [1] * 6
        assert version_of(pool.submit(X, 0.0).result(timeout=30)) == 2
        assert pool.stats(memory_usage=False)["retried_requests"] >= 1  # it was in flight
        assert wait_until(lambda: not is_running(old_zygote) and not is_running(old_worker))


def test_a_broken_pool_is_repaired_by_reload():
    with wp.Pool(versioned(1), modelzoo.torch_predict, workers=1) as pool:
        # A dead zygote is replaced, unless no new one can start: here, as after a zygote
        # that left the usual way, the pool's private directory is gone.
        shutil.rmtree(pool.ipc_dir)
        os.kill(pool.zygote_pid, 9)
        assert wait_until(lambda: pool.broken is not None, 30)
        pool.reload(versioned(2))
        assert pool.broken is None
        assert version_of(pool.submit(X).result(timeout=30)) == 2


def zygotes() -> set[int]:
    """Pids of this process's zygotes, serving or spare."""
    return {p.pid for p in psutil.Process().children()
            if "workerpool.workers.zygote" in " ".join(p.cmdline())}


def maps_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


def test_a_spare_zygote_becomes_the_next_versions_zygote():
    with wp.Pool(versioned(1), modelzoo.torch_predict, workers=1, spare_zygote=True) as pool:
        assert wait_until(lambda: len(zygotes()) == 2, 30)  # the serving one and a spare
        first = pool.zygote_pid
        (spare,) = zygotes() - {first}
        assert wait_until(lambda: maps_torch(spare), 60)  # it imports torch while idle
        pool.reload(versioned(2))
        assert pool.zygote_pid == spare
        assert wait_until(lambda: zygotes() - {first, spare}, 30)  # and a new spare starts
        (next_spare,) = zygotes() - {first, spare}
        assert version_of(pool.submit(X).result(timeout=30)) == 2
    assert not is_running(next_spare)  # close() reaps the spare too
