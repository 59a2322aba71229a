"""Outputs of pooled workers equal the model called in this process, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import modelzoo
import workerpool as wp

START_METHODS = ["zygote", "spawn"]


def torch_inputs(shape, n=6):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("load, shape", [
    (modelzoo.mlp, (5, 32)),
    (modelzoo.transformer, (3, 7, 64)),
], ids=["mlp", "transformer"])
def test_torch_outputs_equal_in_process_model(start_method, load, shape):
    inputs = torch_inputs(shape)
    expected = [modelzoo.reference(load, modelzoo.torch_predict, x) for x in inputs]
    with wp.Pool(load, modelzoo.torch_predict, workers=2, start_method=start_method) as pool:
        futures = [pool.submit(x) for x in inputs]
        results = [f.result(timeout=60) for f in futures]
        mapped = list(pool.map(inputs))
    for got, want in zip(results + mapped, expected + expected):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got, want)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_numpy_dict_model_outputs_equal(start_method):
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(5)]
    model = modelzoo.numpy_model()
    with wp.Pool(modelzoo.numpy_model, modelzoo.numpy_predict, workers=2,
                 start_method=start_method) as pool:
        results = list(pool.map(inputs))
        stats = pool.stats()
    for x, got in zip(inputs, results):
        want = modelzoo.numpy_predict(model, x)
        assert np.array_equal(got["scores"], want["scores"])
        assert got["scores"].dtype == np.float64
        assert got["label"] == want["label"]
    # the three arrays went to the segment; the label list rode in the skeleton
    assert stats["model_buffers"] == 3
    assert stats["model_bytes"] >= sum(a.nbytes for a in (model["w1"], model["b1"], model["w2"]))


def test_map_is_ordered_and_streams_a_generator():
    produced = []

    def numbers():
        for i in range(200):
            produced.append(i)
            yield np.full((1, 32), i, dtype=np.float32)

    with wp.Pool(modelzoo.numpy_model, sum_predict, workers=2) as pool:
        window = 4
        stream = pool.map(numbers(), window=window)
        first = next(stream)
        # only the window was pulled from the generator before the first result
        assert len(produced) == window
        rest = list(stream)
    assert [first, *rest] == [float(i * 32) for i in range(200)]


def sum_predict(model, x):
    return float(x.sum())


def test_pool_accepts_keyword_arguments_and_nested_values():
    with wp.Pool(modelzoo.numpy_model, echo_predict, workers=1) as pool:
        value = {"a": (1, 2.5, "x"), "b": [np.arange(3), torch.ones(2, dtype=torch.bfloat16)]}
        got = pool.submit(value, scale=3).result(timeout=30)
    assert got["scale"] == 3
    assert got["value"]["a"] == (1, 2.5, "x")
    assert np.array_equal(got["value"]["b"][0], np.arange(3))
    assert torch.equal(got["value"]["b"][1], torch.ones(2, dtype=torch.bfloat16))


def echo_predict(model, value, scale=1):
    return {"value": value, "scale": scale}
