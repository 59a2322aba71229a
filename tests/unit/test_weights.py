"""Publishing and attaching in one process: zero-copy, sealed, read-only, structure kept."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from torch import nn

from testkit import segment_ranges
from workerpool import memfd
from workerpool.publishing import publish
from workerpool.workers.attach import attach


def predict(model, x):
    return x


@pytest.fixture
def published():
    made = []

    def make(model):
        made.append(publish(model, predict))
        return made[-1]

    yield make
    for p in made:
        p.close()


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor(2.0))
        self.vocab = {"hello": 1}


def test_module_structure_and_values_survive(published):
    torch.manual_seed(0)
    original = TiedModel()
    expected = {k: v.clone() for k, v in original.state_dict().items()}
    p = published(original)
    model, fn = attach(p.skeleton, p.fd)
    assert fn is predict or fn.__name__ == "predict"
    assert model.vocab == {"hello": 1}
    assert model.head.weight is model.embed.weight  # still tied: published once
    assert isinstance(model.embed.weight, nn.Parameter)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key])
    assert p.n_buffers == 2  # the tied weight and the scale buffer


def test_attached_tensors_view_the_segment_without_copies(published):
    p = published({"w": torch.randn(256, 256), "a": np.ones((10, 10))})
    model, _ = attach(p.skeleton, p.fd)
    # the pages come from the memfd: each array's address lies in a mapping of it
    for pointer in (model["w"].data_ptr(), model["a"].ctypes.data):
        assert any(lo <= pointer < hi for lo, hi in segment_ranges())


def test_workers_see_read_only_numpy_and_segment_is_sealed(published):
    p = published({"a": np.arange(1000.0)})
    model, _ = attach(p.skeleton, p.fd)
    with pytest.raises(ValueError, match="read-only"):
        model["a"][0] = 5
    assert memfd.is_sealed(p.fd)
    with pytest.raises(OSError) as caught:
        os.pwrite(p.fd, b"x", 0)
    assert caught.value.errno == errno.EPERM


def test_parent_tensors_are_repointed_and_stay_writable(published):
    net = nn.Linear(64, 64)
    before = net.weight.detach().clone()
    p = published(net)
    assert any(lo <= net.weight.data_ptr() < hi for lo, hi in segment_ranges())
    assert torch.equal(net.weight.detach(), before)
    with torch.no_grad():
        net.weight.add_(1)  # copy-on-write in the parent: the published bytes do not change
    model, _ = attach(p.skeleton, p.fd)
    assert torch.equal(model.weight.detach(), before)


def test_views_and_odd_tensors(published):
    base = torch.arange(100, dtype=torch.float32)
    value = {"view": base[10:20], "strided": base[::3], "empty": torch.empty(0, 3),
             "bf16": torch.ones(4, dtype=torch.bfloat16), "scalar": torch.tensor(7),
             "sparse": torch.eye(3).to_sparse()}
    p = published(value)
    model, _ = attach(p.skeleton, p.fd)
    for key in ("view", "strided", "empty", "bf16", "scalar"):
        assert torch.equal(model[key], value[key]), key
    assert torch.equal(model["sparse"].to_dense(), torch.eye(3))


def test_gpu_tensors_are_refused_with_advice():
    if not torch.cuda.is_available():
        pytest.skip("no GPU here; the CPU path is what the rest of this file covers")
    with pytest.raises(Exception, match="move the model to the CPU"):
        publish(nn.Linear(2, 2).cuda(), predict)
