"""Pools that share a Runtime: one framework import for every model's zygote, one model per
worker still, a crash still touching one model, and nothing left behind."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

import modelzoo
import workerpool as wp
from testkit import is_running, kill_a_worker_and_wait_for_its_replacement, wait_until

MIB = 1024 * 1024


def model(seed: int):
    return functools.partial(modelzoo.mlp, seed=seed)


def expected(seed: int, x):
    return modelzoo.reference(model(seed), modelzoo.torch_predict, x)


def pss(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_full_info().pss for pid in pids)


def test_pools_on_one_runtime_answer_each_from_its_own_model_and_share_one_torch_import():
    x = torch.randn(3, 32)
    with wp.Runtime() as runtime:
        shared = [wp.Pool(model(seed), modelzoo.torch_predict, workers=1, runtime=runtime)
                  for seed in range(3)]
        alone = [wp.Pool(model(seed), modelzoo.torch_predict, workers=1)  # zygotes of their own
                 for seed in range(3)]
        try:
            for seed, pool in [*enumerate(shared), *enumerate(alone)]:
                answers = list(pool.map([x] * 4))
                assert len(answers) == 4 and all(torch.equal(a, expected(seed, x))
                                                 for a in answers)
            # every zygote forked from the one runtime; each worker from its pool's zygote
            zygotes = [pool.zygote_pid for pool in shared]
            assert len(set(zygotes)) == 3
            assert {psutil.Process(z).ppid() for z in zygotes} == {runtime.pid}
            assert all(psutil.Process(pool.pids[0]).ppid() == pool.zygote_pid
                       for pool in shared)
            assert all(psutil.Process(pool.zygote_pid).ppid() == os.getpid() for pool in alone)
            # torch imported once for three models, not three times (measured: 248 MiB for
            # the runtime, three zygotes and three workers against 556 MiB without it)
            with_runtime = pss([runtime.pid, *zygotes, *(p for pool in shared for p in pool.pids)])
            without = pss([p for pool in alone for p in (pool.zygote_pid, *pool.pids)])
            assert with_runtime * 1.5 < without, (with_runtime / MIB, without / MIB)
        finally:
            for pool in [*shared, *alone]:
                pool.close()
    assert runtime.pid is None and runtime.forks == 3


def test_a_zygote_that_dies_is_forked_again_and_the_other_models_never_notice():
    x = torch.randn(2, 32)
    with wp.Runtime() as runtime:
        with wp.Pool(model(1), modelzoo.torch_predict, workers=1, runtime=runtime) as first, \
                wp.Pool(model(2), modelzoo.torch_predict, workers=1, runtime=runtime) as second:
            untouched = (second.zygote_pid, second.pids)
            dead = first.zygote_pid
            os.kill(dead, signal.SIGKILL)
            assert wait_until(lambda: first.zygote_pid not in (dead, None)
                              and len(first.pids) == 1, 30)
            assert psutil.Process(first.zygote_pid).ppid() == runtime.pid
            assert torch.equal(first.submit(x).result(timeout=30), expected(1, x))
            assert (second.zygote_pid, second.pids) == untouched
            assert torch.equal(second.submit(x).result(timeout=30), expected(2, x))
            kill_a_worker_and_wait_for_its_replacement(second)  # replaced by its own zygote
            assert torch.equal(second.submit(x).result(timeout=30), expected(2, x))
            assert first.stats()["zygote_restarts"] == 1
            assert second.stats()["zygote_restarts"] == 0


def test_a_runtime_that_dies_leaves_its_pools_serving_and_is_started_again_for_the_next():
    x = torch.randn(2, 32)
    with wp.Runtime() as runtime:
        with wp.Pool(model(1), modelzoo.torch_predict, workers=1, runtime=runtime) as first:
            dead = runtime.pid
            os.kill(dead, signal.SIGKILL)
            assert wait_until(lambda: runtime.pid is None, 10)
            assert torch.equal(first.submit(x).result(timeout=30), expected(1, x))
            with wp.Pool(model(2), modelzoo.torch_predict, workers=1,
                         runtime=runtime) as second:
                assert runtime.pid not in (None, dead) and runtime.restarts == 1
                assert torch.equal(second.submit(x).result(timeout=30), expected(2, x))
            first.reload(model(3))  # a new version forks from the new runtime too
            assert psutil.Process(first.zygote_pid).ppid() == runtime.pid
            assert torch.equal(first.submit(x).result(timeout=30), expected(3, x))


def test_a_closed_runtime_starts_no_pool():
    runtime = wp.Runtime()
    runtime.close()
    with pytest.raises(wp.PoolStartError, match="runtime is closed"):
        wp.Pool(model(1), modelzoo.torch_predict, workers=1, runtime=runtime)


PARENT_SCRIPT = textwrap.dedent("""
    import functools, json, sys, time
    sys.path[:0] = {paths!r}
    import modelzoo, workerpool as wp
    if __name__ == "__main__":
        runtime = wp.Runtime()
        pools = [wp.Pool(functools.partial(modelzoo.mlp, seed=seed), modelzoo.torch_predict,
                         workers=2, runtime=runtime) for seed in range(2)]
        print(json.dumps({{"pids": [p for pool in pools for p in pool.pids],
                          "zygotes": [pool.zygote_pid for pool in pools],
                          "runtime": runtime.pid,
                          "dirs": [pool.ipc_dir for pool in pools]}}), flush=True)
        time.sleep(600)
""")


def test_sigkill_of_the_parent_takes_the_runtime_zygotes_and_workers_with_it(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(paths=[*sys.path, os.path.dirname(__file__)]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(next(line for line in parent.stdout if line.startswith('{"pids"')))
        processes = [*info["pids"], *info["zygotes"], info["runtime"]]
        assert len(set(processes)) == 7 and all(is_running(pid) for pid in processes)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert wait_until(lambda: not any(is_running(pid) for pid in processes), timeout=5.0), \
        "processes outlived their parent by more than 5 s"
    assert wait_until(lambda: not any(os.path.exists(d) for d in info["dirs"]), timeout=2.0)


def failing_load():
    raise ValueError("no such checkpoint")


def test_loaders_fork_from_the_runtime_too_and_a_failing_load_keeps_its_type():
    x = torch.randn(2, 32)
    with wp.Runtime() as runtime:
        for seed in (1, 2):
            with wp.Pool(model(seed), modelzoo.torch_predict, workers=1, runtime=runtime,
                         load_in="loader") as pool:
                assert torch.equal(pool.submit(x).result(timeout=30), expected(seed, x))
                assert pool.stats(memory_usage=False)["weights_source"]
        assert runtime.forks == 4  # a loader and a zygote each
        with pytest.raises(ValueError,
                           match="no such checkpoint"):
            wp.Pool(failing_load, modelzoo.torch_predict, workers=1, runtime=runtime,
                    load_in="loader")
        assert runtime.forks == 5  # the loader; no zygote was started
