"""Elastic workers: a pool that grows while requests wait, shrinks when idle, scales to zero
and wakes by a fork from its zygote (never a reload), losing nothing on the way; and the
same through `workerpool serve`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

import modelzoo
import workerpool as wp
from testkit import wait_until

LOADS: list[int] = []  # load() runs here (load_in="parent"): one entry per call


def counted_mlp():
    LOADS.append(os.getpid())
    return modelzoo.mlp()


def slow_predict(model, x, delay=0.05):
    time.sleep(delay)
    return model(x)


@pytest.fixture
def x_and_expected():
    x = torch.randn(2, 32)
    return x, modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)


def live(pool) -> int:
    return sum(w["state"] in ("ready", "starting") for w in pool.stats(memory_usage=False)
               ["workers"])


def test_a_pool_scaled_to_zero_stays_ready_and_wakes_by_fork_without_reloading(
        x_and_expected):
    x, expected = x_and_expected
    LOADS.clear()
    with wp.Pool(counted_mlp, modelzoo.torch_predict, workers=2, min_workers=0,
                 idle_timeout=0.3) as pool:
        assert torch.equal(pool.submit(x).result(timeout=30), expected)
        zygote = pool.zygote_pid
        assert wait_until(lambda: pool.pids == [], 10)  # scaled to zero
        assert pool.is_ready()  # its zygote can wake a worker
        for _ in range(3):  # wake, answer, fall asleep again
            assert torch.equal(pool.submit(x).result(timeout=30), expected)
            assert wait_until(lambda: pool.pids == [], 10)
        stats = pool.stats(memory_usage=False)
        assert stats["scaled_up"] >= 3 and stats["scaled_down"] >= 4
        assert (stats["min_workers"], stats["max_workers"], stats["idle_timeout"]) == \
            (0, 2, 0.3)
        assert stats["crashes"] == 0 and stats["restarts"] == 0
        assert pool.zygote_pid == zygote
    assert LOADS == [os.getpid()]  # load() ran once, in this process: no wake reloaded


def test_it_grows_toward_workers_under_load_then_shrinks_to_min_workers(x_and_expected,
                                                                         caplog):
    x, expected = x_and_expected
    caplog.set_level(logging.INFO, logger="workerpool")
    with wp.Pool(modelzoo.mlp, slow_predict, workers=3, min_workers=1,
                 idle_timeout=0.5) as pool:
        assert live(pool) == 1
        seen = []
        futures = []
        for _ in range(60):
            futures.append(pool.submit(x))
            seen.append(live(pool))
            time.sleep(0.005)
        assert all(torch.equal(f.result(timeout=60), expected) for f in futures)
        assert max(seen) == 3  # grew to workers, never past it
        assert wait_until(lambda: live(pool) == 1, 10)  # back down to min_workers
        assert pool.stats(memory_usage=False)["scaled_down"] == 2
        # a worker stopped for being idle is said to have stopped, not to have crashed
        def exits() -> list[str]:  # (said when the zygote has reaped it)
            return [r.getMessage() for r in caplog.records if " left: " in r.getMessage()
                    or r.getMessage().endswith(") stopped")]

        assert wait_until(lambda: len(exits()) == 2, 10), exits()
        assert all(m.endswith(") stopped") for m in exits()), exits()


@pytest.mark.parametrize("on_runtime", [False, True], ids=["own-zygote", "runtime"])
def test_no_request_is_lost_while_workers_come_and_go_and_one_is_killed(x_and_expected,
                                                                        on_runtime):
    """With a Runtime the runtime forks each worker, which attaches after the fork."""
    x, expected = x_and_expected
    runtime = wp.Runtime() if on_runtime else None
    with runtime or contextlib.nullcontext(), \
            wp.Pool(modelzoo.mlp, slow_predict, workers=3, min_workers=0, idle_timeout=0.1,
                    runtime=runtime) as pool:
        answers, errors = [], []
        stop = threading.Event()

        def client(seed):
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                burst = [pool.submit(x, delay=float(rng.uniform(0, 0.03)))
                         for _ in range(int(rng.integers(1, 8)))]
                for future in burst:
                    try:
                        answers.append(torch.equal(future.result(timeout=60), expected))
                    except Exception as exc:  # noqa: BLE001 - counted: must not happen
                        errors.append(exc)
                time.sleep(float(rng.uniform(0, 0.25)))  # sometimes past idle_timeout

        clients = [threading.Thread(target=client, args=(seed,)) for seed in range(3)]
        for thread in clients:
            thread.start()
        killed = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            rows = pool.stats(memory_usage=False)["workers"]
            busy = [w["pid"] for w in rows if w["state"] == "ready" and w["in_flight"]]
            if len(rows) >= 2 and busy and killed < 2:  # grown, and one dies at work
                os.kill(busy[-1], signal.SIGKILL)
                killed += 1
                time.sleep(0.3)
            time.sleep(0.02)
        stop.set()
        for thread in clients:
            thread.join()
        stats = pool.stats(memory_usage=False)
    assert not errors, errors[:3]
    assert len(answers) > 50 and all(answers)
    assert killed >= 1 and 1 <= stats["crashes"] <= killed  # (one may have finished first)
    assert stats["scaled_up"] > 0 and stats["scaled_down"] > 0


def test_resize_grows_and_shrinks_a_fixed_pool_and_work_in_flight_finishes(x_and_expected):
    x, expected = x_and_expected
    with wp.Pool(modelzoo.mlp, slow_predict, workers=1) as pool:
        pool.resize(3)
        assert wait_until(lambda: len(pool.pids) == 3 and live(pool) == 3, 30)
        futures = [pool.submit(x, delay=0.2) for _ in range(6)]
        time.sleep(0.05)  # (in flight on every worker)
        pool.resize(1)
        assert all(torch.equal(f.result(timeout=60), expected) for f in futures)
        assert wait_until(lambda: len(pool.pids) == 1, 30)
        assert pool.config.workers == 1 and not pool.config.elastic
        stats = pool.stats(memory_usage=False)
        assert stats["crashes"] == 0 and stats["restarts"] == 0
        pool.reload()  # the next version keeps the size
        assert len(pool.pids) == 1
        with pytest.raises(ValueError, match="min_workers must be <= workers"):
            pool.resize(1, min_workers=2)
        with pytest.raises(ValueError, match="workers must be >= 1"):
            pool.resize(0)


def test_workerpool_serve_scales_a_model_to_zero_and_wakes_it():
    from test_serve import Server, metric_samples

    server = Server(["modelzoo:mlp", "--name", "mlp", "--workers", "2", "--min-workers", "0",
                     "--idle-timeout", "0.5"])
    x = np.ones((1, 32), np.float32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict,
                                  torch.from_numpy(x)).numpy()
    body = json.dumps({"inputs": [{"name": "input_0", "datatype": "FP32", "shape": [1, 32],
                                   "data": x.reshape(-1).tolist()}]}).encode()

    def status():
        return json.loads(server.get("/status")[2])["models"][0]

    def live_gauge():
        return metric_samples(server)[("workerpool_live_workers",
                                       (("model", "mlp"), ("version", "1")))]

    try:
        server.wait_ready()
        assert wait_until(lambda: status()["workers_state"].startswith("scaled to zero"), 30)
        assert live_gauge() == 0
        assert server.get("/v2/models/mlp/ready")[0] == 200  # asleep is ready
        for _ in range(2):
            code, _, raw = server.post("/v2/models/mlp/infer", body)
            assert code == 200, raw
            (output,) = json.loads(raw)["outputs"]
            np.testing.assert_array_equal(
                np.asarray(output["data"], np.float32).reshape(output["shape"]), expected)
            assert status()["workers_state"].startswith("1 (0-2, idle timeout 0.5 s)")
            assert live_gauge() == 1
            assert wait_until(lambda: live_gauge() == 0, 30)
        assert status()["min_workers"] == 0 and status()["max_workers"] == 2
    finally:
        assert server.stop() == 0


def test_release_idle_workers_puts_a_fixed_pool_to_sleep_and_it_still_answers(
        x_and_expected):
    x, expected = x_and_expected
    with wp.Pool(modelzoo.mlp, modelzoo.torch_predict, workers=2) as pool:
        assert len(pool.release_idle_workers()) == 2
        assert wait_until(lambda: pool.pids == [], 10)
        assert pool.is_ready()  # asleep, not broken
        assert torch.equal(pool.submit(x).result(timeout=30), expected)
        assert pool.config.min_workers == 0 and pool.config.elastic
        stats = pool.stats(memory_usage=False)
        assert stats["released"] == 2 and stats["crashes"] == 0


def test_workerpool_serve_past_its_memory_budget_puts_idle_models_to_sleep(tmp_path):
    from test_serve import Server

    config = tmp_path / "serve.toml"
    config.write_text("".join(f'[models.m{i}]\nsource = "serve_models:numbers"\n'
                              f'predict = "serve_models:sleep_then_echo"\nworkers = 1\n'
                              for i in range(3)))
    server = Server(["--config", str(config), "--max-memory", "1MiB"])  # below anything
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                   "data": [0.0, 2.5]}]}).encode()

    def status():
        return json.loads(server.get("/status")[2])

    try:
        server.wait_ready()
        assert wait_until(lambda: all(m["workers_state"].startswith("scaled to zero")
                                      for m in status()["models"]), 30)
        budget = status()["server"]["memory_budget"]
        assert budget["max_bytes"] == 1024 * 1024 and budget["used_bytes"] > 1024 * 1024
        assert budget["workers_released"] >= 3
        assert server.get("/v2/health/ready")[0] == 200  # asleep, every one ready
        code, _, raw = server.post("/v2/models/m1/infer", body)  # wakes m1
        assert code == 200, raw
        assert json.loads(raw)["outputs"][0]["data"] == [0.0, 2.5]
        assert "released 1 idle worker(s)" in server.stderr()
    finally:
        assert server.stop() == 0
