"""Which frameworks a shared runtime imports before it forks a model's zygote: those the
model's skeleton names, so the first model does not import torch on its own."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from workerpool.modules import PREIMPORTABLE
from workerpool.pool.runtime import frameworks_in, loads_on_attach, skeleton_strings


def test_a_skeleton_names_the_frameworks_its_zygote_would_import():
    assert frameworks_in(pickle.dumps(torch.nn.Linear(2, 2)), PREIMPORTABLE) == {"torch"}
    assert frameworks_in(pickle.dumps({"w": np.zeros(3), "labels": ["a", "b"]}),
                         PREIMPORTABLE) == set()
    # a SavedModel's skeleton names workerpool's adapter, which imports TensorFlow lazily
    from workerpool.frameworks.tensorflow import FrozenSignatures

    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # GLOBAL "module name" / STACK_GLOBAL
        assert frameworks_in(pickle.dumps(FrozenSignatures, protocol=protocol),
                             PREIMPORTABLE) == {"tensorflow"}


def test_a_model_loaded_as_it_is_attached_is_told_from_one_attached_zero_copy():
    """TorchScript travels as a path loaded where it is unpickled: it gets a zygote of its
    own (one load for its workers); a skeleton over published weights does not."""
    from workerpool.sources.files import ZygoteLoaded

    scripted = ZygoteLoaded("/models/net.pt", "torchscript")
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # GLOBAL "module name" / STACK_GLOBAL
        assert loads_on_attach(skeleton_strings(pickle.dumps(scripted, protocol=protocol)))
        assert not loads_on_attach(skeleton_strings(
            pickle.dumps(torch.nn.Linear(2, 2), protocol=protocol)))
    # a string that merely names the function is not a reference to it
    assert not loads_on_attach(skeleton_strings(pickle.dumps({"note": "_load_in_worker"})))


def test_what_a_worker_imports_is_imported_before_the_fork():
    """Every module ``serve`` imports is one ``import_worker_modules`` (run by the runtime
    and each zygote before they fork) already imported: a worker that imports after the
    fork pays for it in every wake from zero (~9 ms here without bytecode caches)."""
    import ast
    import importlib.util
    import inspect
    import subprocess
    import sys
    import textwrap

    from workerpool.workers import main as worker_main

    tree = ast.parse(textwrap.dedent(inspect.getsource(worker_main.serve)))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""),
                                               worker_main.__package__)
            package = importlib.util.find_spec(base).submodule_search_locations is not None
            for alias in node.names:  # a submodule where it is one, else its module
                name = f"{base}.{alias.name}"
                modules.add(name if package and importlib.util.find_spec(name) else base)
    assert "workerpool.workers.runner" in modules and "zmq" in modules  # the walk sees them
    probe = ("import sys, workerpool.workers.main as m; "
             "m.import_worker_modules(); print(' '.join(sorted(sys.modules)))")
    imported = subprocess.run([sys.executable, "-c", probe], check=True, text=True,
                              capture_output=True).stdout.split()
    assert modules <= set(imported), modules - set(imported)
