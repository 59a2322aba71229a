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
            # the runtime plays every pool's zygote: it forked each worker itself, and no
            # zygote process of a model's own stands between them
            assert {pool.zygote_pid for pool in shared} == {runtime.pid}
            workers = [p for pool in shared for p in pool.pids]
            assert sorted(c.pid for c in psutil.Process(runtime.pid).children()) == \
                sorted(workers)
            assert all(psutil.Process(pool.zygote_pid).ppid() == os.getpid() for pool in alone)
            # torch imported once for three models, not three times (measured: 187 MiB for
            # the runtime and three workers against 500 MiB without it)
            with_runtime = pss([runtime.pid, *workers])
            without = pss([p for pool in alone for p in (pool.zygote_pid, *pool.pids)])
            assert with_runtime * 1.5 < without, (with_runtime / MIB, without / MIB)
        finally:
            for pool in [*shared, *alone]:
                pool.close()
    assert runtime.pid is None and runtime.forks == 3


def test_a_worker_that_dies_is_forked_again_by_the_runtime_and_the_other_models_never_notice():
    x = torch.randn(2, 32)
    with wp.Runtime() as runtime:
        with wp.Pool(model(1), modelzoo.torch_predict, workers=1, runtime=runtime) as first, \
                wp.Pool(model(2), modelzoo.torch_predict, workers=1, runtime=runtime) as second:
            untouched = second.pids
            kill_a_worker_and_wait_for_its_replacement(first)
            assert psutil.Process(first.pids[0]).ppid() == runtime.pid
            assert torch.equal(first.submit(x).result(timeout=30), expected(1, x))
            assert second.pids == untouched
            assert torch.equal(second.submit(x).result(timeout=30), expected(2, x))
            assert first.stats()["zygote_restarts"] == second.stats()["zygote_restarts"] == 0


def test_a_model_loaded_as_it_attaches_keeps_a_zygote_of_its_own(tmp_path):
    """TorchScript loads where it is unpickled: once in its zygote, forked from the runtime,
    whose workers share that load."""
    path = str(tmp_path / "net.pt")
    torch.jit.script(modelzoo.mlp()).save(path)
    x = torch.randn(2, 32)
    with wp.Runtime() as runtime:
        with wp.Pool(path, modelzoo.torch_predict, workers=2, runtime=runtime) as scripted, \
                wp.Pool(model(1), modelzoo.torch_predict, workers=1, runtime=runtime) as plain:
            assert scripted.zygote_pid != runtime.pid
            assert psutil.Process(scripted.zygote_pid).ppid() == runtime.pid
            assert all(psutil.Process(p).ppid() == scripted.zygote_pid for p in scripted.pids)
            assert plain.zygote_pid == runtime.pid
            reference = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
            assert all(torch.equal(y, reference) for y in scripted.map([x] * 4))
            assert torch.equal(plain.submit(x).result(timeout=30), expected(1, x))


def mlp_with_a_row_type():
    """A model whose skeleton names a class of an installed module nothing imports yet."""
    import sqlite3

    return {"net": modelzoo.mlp(seed=1), "row_type": sqlite3.Row}


def predict_with_net(model, x):
    return modelzoo.torch_predict(model["net"], x)


def test_installed_modules_an_attach_imports_are_imported_once_in_the_runtime():
    """Attached in each worker, after the fork: what the model's attach imported from the
    installed packages (here the standard library's sqlite3 and its C extension) is
    imported in the runtime when the pool boots, so its workers share it."""
    x = torch.randn(2, 32)

    def maps(pid):
        with open(f"/proc/{pid}/maps") as text:
            return text.read()

    with wp.Runtime() as runtime:
        with wp.Pool(model(1), modelzoo.torch_predict, workers=1, runtime=runtime):
            assert "_sqlite3" not in maps(runtime.pid)
            with wp.Pool(mlp_with_a_row_type, predict_with_net, workers=2,
                         runtime=runtime) as pool:
                assert "_sqlite3" in maps(runtime.pid)
                assert all(torch.equal(y, expected(1, x)) for y in pool.map([x] * 4))
                assert all("_sqlite3" in maps(pid) for pid in pool.pids)


def test_a_runtime_that_dies_is_started_again_and_its_pools_serve_on_new_workers():
    x = torch.randn(2, 32)
    with wp.Runtime() as runtime:
        with wp.Pool(model(1), modelzoo.torch_predict, workers=1, runtime=runtime) as first:
            dead, dead_workers = runtime.pid, first.pids
            os.kill(dead, signal.SIGKILL)  # its workers watch it and leave with it
            assert torch.equal(first.submit(x).result(timeout=30), expected(1, x))
            assert wait_until(lambda: runtime.pid not in (None, dead) and len(first.pids) == 1
                              and first.pids != dead_workers, 30)
            assert runtime.restarts == 1 and first.zygote_pid == runtime.pid
            assert not any(is_running(pid) for pid in dead_workers)
            with wp.Pool(model(2), modelzoo.torch_predict, workers=1,
                         runtime=runtime) as second:
                assert runtime.restarts == 1
                assert torch.equal(second.submit(x).result(timeout=30), expected(2, x))
            first.reload(model(3))  # a new version's workers fork from the runtime too
            assert psutil.Process(first.pids[0]).ppid() == runtime.pid
            assert torch.equal(first.submit(x).result(timeout=30), expected(3, x))


def test_a_runtime_killed_just_before_a_fork_counts_as_one_restart():
    """Forking at once after the SIGKILL, the dead runtime may still poll as running: the
    fork's send fails, and the runtime started on the retry is still a restart."""
    def fork_a_loader():
        loader, channel = runtime.loader_channel()
        channel.close()  # the loader leaves with its channel
        loader.wait(30)

    with wp.Runtime() as runtime:
        fork_a_loader()  # the runtime starts with its first fork
        assert runtime.restarts == 0
        for restarts in range(1, 4):
            dead = runtime.pid
            os.kill(dead, signal.SIGKILL)
            fork_a_loader()
            assert runtime.pid not in (None, dead) and runtime.restarts == restarts


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


def test_sigkill_of_the_parent_takes_the_runtime_and_workers_with_it(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(paths=[*sys.path, os.path.dirname(__file__)]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(next(line for line in parent.stdout if line.startswith('{"pids"')))
        assert set(info["zygotes"]) == {info["runtime"]}  # it plays both pools' zygotes
        processes = [*info["pids"], info["runtime"]]
        assert len(set(processes)) == 5 and all(is_running(pid) for pid in processes)
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
        assert runtime.forks == 4  # a loader and a zygote (played by the runtime) each
        with pytest.raises(ValueError,
                           match="no such checkpoint"):
            wp.Pool(failing_load, modelzoo.torch_predict, workers=1, runtime=runtime,
                    load_in="loader")
        assert runtime.forks == 5  # the loader; no zygote was started
