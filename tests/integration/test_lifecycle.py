"""Start, replace, close, and the parent's death: nothing outlives the pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import modelzoo
import workerpool as wp
from testkit import is_running, kill_a_worker_and_wait_for_its_replacement, wait_until


def slow_predict(model, x, delay=0.05):
    time.sleep(delay)
    return model(x)


def thread_count(model, x):
    return torch.get_num_threads()


def test_close_drains_accepted_work_then_leaves_nothing():
    x = torch.randn(2, 32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
    pool = wp.Pool(modelzoo.mlp, slow_predict, workers=2)
    pids = pool.pids + [pool.zygote_pid]
    private_dir = pool.ipc_dir
    futures = [pool.submit(x) for _ in range(12)]
    pool.close()
    assert all(torch.equal(f.result(timeout=0), expected) for f in futures)
    assert not any(is_running(pid) for pid in pids)
    assert not os.path.exists(private_dir)
    with pytest.raises(wp.PoolClosed):
        pool.submit(x)
    with pytest.raises(wp.PoolClosed):
        pool.stats()
    pool.close()  # idempotent


def test_killed_worker_is_replaced_from_the_zygote_without_reloading():
    x = torch.randn(2, 32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
    with wp.Pool(modelzoo.mlp, modelzoo.torch_predict, workers=2) as pool:
        zygote = pool.zygote_pid
        kill_a_worker_and_wait_for_its_replacement(pool)
        stats = pool.stats()
        assert stats["restarts"] == 1
        assert pool.zygote_pid == zygote
        assert all(w["weights_copied"] == 0 for w in stats["workers"])
        answers = list(pool.map([x] * 10))
        assert len(answers) == 10 and all(torch.equal(y, expected) for y in answers)


CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("workers, threads, expected", [
    (1, None, CORES), (2, None, max(1, CORES // 2)), (1, 3, 3)])
def test_threads_per_worker_default_to_a_share_of_the_cores(workers, threads, expected):
    kwargs = {} if threads is None else {"threads_per_worker": threads}
    with wp.Pool(modelzoo.mlp, thread_count, workers=workers, **kwargs) as pool:
        assert pool.submit(torch.zeros(1)).result(timeout=60) == expected


def affinity(model, x):
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(CORES < 2, reason="pinning needs two CPUs to tell workers apart")
def test_pin_cpus_gives_each_worker_its_own_cpus():
    with wp.Pool(modelzoo.mlp, affinity, workers=2, pin_cpus=True) as pool:
        seen = {tuple(cpus) for cpus in pool.map([0] * 20)}  # concurrent: both workers serve
    assert len(seen) == 2 and not set(seen.pop()) & set(seen.pop())


PARENT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path[:0] = {paths!r}
    import modelzoo, workerpool as wp
    if __name__ == "__main__":
        if sys.argv[2] == "torch":
            load, predict, options = modelzoo.mlp, modelzoo.torch_predict, {{}}
        else:  # a Keras model through TensorFlow's engines: memfds, an XNNPACK cache file
            import test_tensorflow
            load, predict = test_tensorflow.dense_mlp, test_tensorflow.call
            options = {{"tf_engine": sys.argv[2]}}
        pool = wp.Pool(load, predict, workers=2, start_method=sys.argv[1], **options)
        print(json.dumps({{"pids": pool.pids, "zygote": pool.zygote_pid,
                          "dir": pool.ipc_dir}}), flush=True)
        time.sleep(600)
""")


def tensorflow_engines() -> list[str]:
    try:
        import ai_edge_litert  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError:
        return []
    return ["tensorflow", "litert"]


@pytest.mark.parametrize("start_method, framework", [
    ("zygote", "torch"), ("spawn", "torch"),
    *[("zygote", engine) for engine in tensorflow_engines()]])
def test_sigkill_of_the_parent_takes_every_worker_and_file_with_it(tmp_path, start_method,
                                                                   framework):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(paths=[*sys.path, os.path.dirname(__file__)]))
    parent = subprocess.Popen([sys.executable, str(script), start_method, framework],
                              stdout=subprocess.PIPE, text=True)
    try:
        # LiteRT logs to stdout too: the report is the line that starts our JSON
        line = next(line for line in parent.stdout if line.startswith('{"pids"'))
        info = json.loads(line)
        processes = info["pids"] + [info["zygote"]]
        assert len(processes) == 3 and all(is_running(pid) for pid in processes)
        assert os.path.exists(info["dir"])
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    killed_at = time.monotonic()
    assert wait_until(lambda: not any(is_running(pid) for pid in processes), timeout=2.0), \
        "workers outlived their parent by more than 2 s"
    assert wait_until(lambda: not os.path.exists(info["dir"]), timeout=2.0)
    assert time.monotonic() - killed_at < 2.0


def test_close_while_a_replacement_is_starting_does_not_wait_for_it():
    # A worker that has not connected yet can never receive STOP; close must not sit out
    # close_timeout waiting for it (it did, once). Spawned workers take a second or more to
    # start, so the replacement is reliably caught starting.
    pool = wp.Pool(modelzoo.mlp, modelzoo.torch_predict, workers=2, close_timeout=600,
                   start_method="spawn")
    os.kill(pool.pids[0], signal.SIGKILL)
    assert wait_until(lambda: any(w["state"] == "starting"
                                  for w in pool.stats(memory_usage=False)["workers"]), 10)
    closer = threading.Thread(target=pool.close)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() waited for a worker that could not hear STOP"


def test_submits_racing_close_all_get_an_answer():
    pool = wp.Pool(modelzoo.numpy_model, lambda model, x: x, workers=2)
    futures, stop = [], threading.Event()

    def submitter():
        while not stop.is_set():
            try:
                futures.append(pool.submit(1))
            except wp.PoolClosed:
                return

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    pool.close()
    stop.set()
    for t in threads:
        t.join()
    assert futures
    for future in futures:  # each one answered: its result, or PoolClosed; none left hanging
        assert future.exception(timeout=10) is None or isinstance(future.exception(),
                                                                    wp.PoolClosed)
