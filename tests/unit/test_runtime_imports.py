"""Which frameworks a shared runtime imports before it forks a model's zygote: those the
model's skeleton names, so the first model does not import torch on its own."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from workerpool.modules import PREIMPORTABLE
from workerpool.pool.runtime import frameworks_in


def test_a_skeleton_names_the_frameworks_its_zygote_would_import():
    assert frameworks_in(pickle.dumps(torch.nn.Linear(2, 2)), PREIMPORTABLE) == {"torch"}
    assert frameworks_in(pickle.dumps({"w": np.zeros(3), "labels": ["a", "b"]}),
                         PREIMPORTABLE) == set()
    # a SavedModel's skeleton names workerpool's adapter, which imports TensorFlow lazily
    from workerpool.frameworks.tensorflow import FrozenSignatures

    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # GLOBAL "module name" / STACK_GLOBAL
        assert frameworks_in(pickle.dumps(FrozenSignatures, protocol=protocol),
                             PREIMPORTABLE) == {"tensorflow"}
