"""workerpool.ray on a local Ray cluster started here: Ray Data's map_batches with one Pool
per actor: outputs equal the in-process model, one weight copy per actor, no row lost."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import torch

import modelzoo
from score_models import rowwise_predict
from testkit import wait_until

ray = pytest.importorskip("ray")

from workerpool.ray import PoolPredictor  # noqa: E402
from workerpool.sources.files import default_predict  # noqa: E402

pytestmark = pytest.mark.module_pool  # the cluster's processes live as long as the module

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = [f"f{j}" for j in range(32)]


@pytest.fixture(scope="module")
def cluster():
    # Ray's workers import the test models by reference: tests/ on their path.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([TESTS, *sys.path])}})
    try:
        yield
    finally:
        ray.shutdown()


def table(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 32)).astype(np.float32)
    return {"id": np.arange(rows), **{name: x[:, j] for j, name in enumerate(FEATURES)}}


def expected(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The model called here, a row at a time like the workers (rowwise_predict)."""
    x = np.column_stack([columns[name] for name in FEATURES])
    with modelzoo.torch_threads(1), torch.inference_mode():
        return rowwise_predict(modelzoo.mlp(), x)


def test_map_batches_with_a_pool_per_actor_equals_the_in_process_model(cluster):
    columns = table(600)
    dataset = ray.data.from_items([{"id": int(i), **{n: float(columns[n][i]) for n in FEATURES}}
                                   for i in range(600)])
    scored = dataset.map_batches(
        PoolPredictor, fn_constructor_kwargs=dict(
            load=modelzoo.mlp, predict=rowwise_predict, columns=FEATURES,
            passthrough=["id"], dtype="float32", threads_per_worker=1),
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=2, batch_size=100,
        batch_format="numpy")
    rows = sorted(scored.take_all(), key=lambda row: row["id"])
    assert [row["id"] for row in rows] == list(range(600))
    got = np.stack([[row[f"output_{k}"] for k in range(8)] for row in rows])
    assert np.array_equal(got, expected(columns))


@ray.remote(num_cpus=2)
class Scorer(PoolPredictor):
    pass


def test_an_actor_holds_one_weight_copy_for_all_its_cpus(cluster):
    scorer = Scorer.remote(modelzoo.mlp_64mib, default_predict, dtype="float32",
                           threads_per_worker=1)
    try:
        x = np.random.default_rng(1).standard_normal((8, 1024)).astype(np.float32)
        batch = {f"c{j}": x[:, j] for j in range(1024)}
        for _ in range(4):  # both workers serve
            ray.get(scorer.__call__.remote(batch))
        stats = ray.get(scorer.stats.remote())
        model = stats["model_bytes"]
        workers = stats["workers"]
        assert len(workers) == 2  # one per CPU Ray gave the actor
        assert all(w["requests_served"] > 0 for w in workers)
        # a copy per worker would make each one's private memory at least the model
        assert all(w["uss"] < model / 4 for w in workers), [w["uss"] for w in workers]
        # the weights' pages, summed over the actor's process tree: one copy in all
        weights = sum(p["weights_pss"] for p in (stats["parent"], stats["zygote"], *workers))
        assert 0.9 * model < weights < 1.05 * model, (weights, model)
    finally:
        ray.get(scorer.close.remote())
        ray.kill(scorer)


def test_a_pool_worker_killed_inside_the_actor_loses_no_row(cluster):
    scorer = Scorer.remote(modelzoo.mlp, rowwise_predict, passthrough=["id"],
                           columns=FEATURES, dtype="float32", threads_per_worker=1)
    try:
        columns = table(4000, seed=2)
        batches = [{name: values[start:start + 200] for name, values in columns.items()}
                   for start in range(0, 4000, 200)]
        pids = ray.get(scorer.pids.remote())
        pending = [scorer.__call__.remote(b) for b in batches]
        os.kill(pids[0], signal.SIGKILL)
        results = ray.get(pending)
        ids = np.concatenate([r["id"] for r in results])
        got = np.column_stack([np.concatenate([r[f"output_{k}"] for r in results])
                               for k in range(8)])
        assert np.array_equal(ids, columns["id"])
        assert np.array_equal(got, expected(columns))
        assert wait_until(lambda: pids[0] not in ray.get(scorer.pids.remote()), 30)
        assert ray.get(scorer.stats.remote())["restarts"] >= 1
    finally:
        ray.get(scorer.close.remote())
        ray.kill(scorer)


def test_score_with_the_ray_engine_writes_the_local_engines_bytes(cluster, tmp_path):
    import test_score  # its input files, command and reference

    test_score.make_input(tmp_path / "in.parquet", 30_000)
    common = ["--input", tmp_path / "in.parquet", "--id-column", "id", "--chunk-rows", 4000,
              "--workers", 2]
    code, stderr = test_score.run_score(*common, "--output", tmp_path / "local.parquet")
    assert code == 0, stderr
    address = ray.get_runtime_context().gcs_address  # the cluster this module started
    code, stderr = test_score.run_score(*common, "--output", tmp_path / "ray.parquet",
                                        "--engine", "ray", "--address", address)
    assert code == 0, stderr
    assert "30000 rows" in stderr
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()


def test_a_serve_deployment_answers_tritonclient_from_a_pool_per_replica(cluster):
    import socket

    import tritonclient.http as triton
    from ray import serve

    from workerpool.ray.serving import deployment

    with socket.socket() as probe:  # a free port for Serve's HTTP proxy
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        handle = serve.run(deployment(modelzoo.mlp, default_predict, name="mlp",
                                      cpus_per_replica=2, threads_per_worker=1),
                           name="mlp", route_prefix="/v2/models/mlp/infer")
        x = np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32)
        want = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict,
                                  torch.from_numpy(x)).numpy()
        assert np.array_equal(handle.predict.remote(x).result(), want)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        for binary in (True, False):
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            got = client.infer("mlp", [tensor]).as_numpy("output_0")
            assert np.array_equal(got, want)
        bad = triton.InferInput("x", [3, 5], "FP32")  # the wrong width: the model's error
        bad.set_data_from_numpy(np.ones((3, 5), np.float32))
        with pytest.raises(triton.InferenceServerException, match="mat1 and mat2"):
            client.infer("mlp", [bad])
        assert np.array_equal(client.infer("mlp", [tensor]).as_numpy("output_0"), want)
        client.close()
        workers = handle.stats.remote().result()["workers"]
        assert len(workers) == 2  # the replica's 2 CPUs: one Pool, two workers
    finally:
        serve.shutdown()
