"""Inline models without a server: InlinePool (serving/inline.py) under the data plane and
the registry, and the pieces front ends use (serve/inline_fronts.py): the table, the tally.

A server calling an inline model (and front ends holding copies) is tested against real
processes in tests/integration/test_inline.py.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

import workerpool as wp
from workerpool import request_ids
from workerpool.serve.config import ModelSpec
from workerpool.serve.inline_fronts import FrontInline, RelayInstead, Tally, inline_table
from workerpool.serve.registry import Registry
from workerpool.serving.dataplane import DataPlane
from workerpool.serving.errors import BadRequest
from workerpool.serving.inline import InlinePool

DECLARED = [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
X = np.ones((2, 3), np.float32)


def weights(scale: float = 2.0):
    return {"scale": np.float32(scale)}


def scaled(model, x):
    return x * model["scale"]


WARMED: list = []  # the inputs recorded_scaled was called on


def recorded_scaled(model, x):
    WARMED.append(np.array(x))
    return x * model["scale"]


def refuse(model, x):
    raise ValueError("no")


def counting():
    def gen(model, x):
        yield x

    return gen


def test_an_inline_pool_calls_predict_here_and_counts_each_call():
    pool = InlinePool(weights, scaled, inputs=DECLARED)
    assert np.array_equal(asyncio.run(pool.submit_async(X)), X * 2)
    assert np.array_equal(pool.submit(X).result(), X * 2)
    stats = pool.stats()
    assert stats["inline"] and stats["workers"] == [] and stats["parent"]["pid"] == os.getpid()
    assert stats["compute_seconds_histogram"]["count"] == 2
    assert stats["batch_size_histogram"] == {2: 2}  # rows per call
    assert stats["total_pss"] > 0
    assert pool.version.startswith("sha256:") and pool.generation == 1


def test_a_reload_swaps_the_model_and_a_failed_one_leaves_the_old_serving():
    pool = InlinePool(weights, scaled, warmup=[X])
    first = pool.version
    assert pool.reload(lambda: weights(3.0)) != first
    assert np.array_equal(pool.submit(X).result(), X * 3) and pool.generation == 2
    with pytest.raises(wp.ReloadFailed, match="warm-up call raised ValueError"):
        pool.reload(weights, predict=refuse)
    assert np.array_equal(pool.submit(X).result(), X * 3) and pool.generation == 2


def test_what_an_inline_model_cannot_do_is_said():
    with pytest.raises(wp.ConfigError, match="cannot batch"):
        InlinePool(weights, scaled, max_batch_size=8)
    with pytest.raises(wp.PoolStartError, match="warm-up call raised ValueError"):
        InlinePool(weights, refuse, warmup=[X])
    with pytest.raises(wp.OutputEncodeError, match="generate_stream"):
        InlinePool(weights, counting()).submit(X).result()
    pool = InlinePool(weights, scaled)
    pool.close()
    with pytest.raises(wp.PoolClosed):
        asyncio.run(pool.submit_async(X))


def test_a_registry_makes_an_inline_model_a_pool_in_this_process():
    spec = ModelSpec("m", weights, predict=scaled, inputs=DECLARED,
                     pool_options={"inline": True, "workers": 4})
    registry = Registry([spec])
    model = registry.get("m")
    model.load()
    try:
        assert isinstance(model.pool, InlinePool) and registry.runtime.pid is None
        plane = DataPlane(registry)

        async def infer(inputs):
            with plane.inference("m", None, "test") as call:
                return await call.run(inputs)

        assert np.array_equal(asyncio.run(infer({"x": X}))["output_0"], X * 2)
        with pytest.raises(BadRequest, match="must have shape"):
            asyncio.run(infer({"x": np.ones((2, 4), np.float32)}))
        # what the front ends hold: a callable source is not loadable there
        assert inline_table(registry) == {}
    finally:
        registry.close(5.0)


def test_the_inline_table_lists_loaded_inline_versions_loadable_by_spec():
    specs = [ModelSpec("light", "test_inline_pool:weights", predict="test_inline_pool:scaled",
                       version=label, inputs=DECLARED, pool_options={"inline": True})
             for label in ("1", "2")]
    registry = Registry(specs)
    try:
        for model in registry.models:
            model.load()
        table = inline_table(registry)
        assert set(table) == {"light"} and set(table["light"]["versions"]) == {"1", "2"}
        assert table["light"]["default"] == registry.get("light").version
        entry = table["light"]["versions"]["1"]
        assert entry["source"] == "test_inline_pool:weights" and entry["weights"].startswith(
            "sha256:")
        registry.unload("light", {"version": "1"})
        assert set(inline_table(registry)["light"]["versions"]) == {"2"}
    finally:
        registry.close(5.0)


def test_a_front_ends_copy_is_warmed_up_with_the_servers_warm_up_inputs():
    spec = ModelSpec("light", "test_inline_pool:weights",
                     predict="test_inline_pool:recorded_scaled", warmup=[X * 5],
                     inputs=DECLARED, pool_options={"inline": True})
    registry = Registry([spec])
    WARMED.clear()
    try:
        registry.models[0].load()
        served = len(WARMED)  # the server's copy: warmed, and called to describe its outputs
        assert served >= 1
        table = inline_table(registry)
        assert table == inline_table(registry)  # (entries compare whole: no array in them)
        front = FrontInline(None, 1 << 20)
        copy = front._loaded(("light", "1"), table["light"]["versions"]["1"])
        assert len(WARMED) == served + 1 and np.array_equal(WARMED[-1], X * 5)  # and its copy
        copy.pool.close()
    finally:
        registry.close(5.0)


def test_a_tally_records_outcomes_but_leaves_relayed_requests_to_the_server():
    tally = Tally()
    request_ids.served.set(("m", "7", "kserve_http"))  # (the plane sets it)
    tally.finished("m", "kserve_http", None, 0.001)
    request_ids.served.set(None)  # (each request is a task of its own: a fresh context)
    tally.finished("m", "kserve_http", BadRequest("no"), 0.001)
    tally.finished("m", "kserve_http", RelayInstead(), 0.001)
    tally.calls.append(("m", "7", 0.001, 1))
    message = tally.taken()
    assert [row[:4] for row in message["requests"]] == [
        ("m", "7", "kserve_http", "success"), ("m", None, "kserve_http", "bad_request")]
    assert message["calls"] == [("m", "7", 0.001, 1)]
    assert tally.taken() is None
