"""Pool(load_in="loader"): load() runs in a short-lived process that publishes the weights
and hands their descriptors over; the pool's process never imports the framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

import loader_models
import workerpool as wp
from testkit import is_running, wait_until

TESTS = os.path.dirname(os.path.dirname(__file__))

# Runs in a fresh interpreter: the test process has imported torch and TensorFlow already.
NO_FRAMEWORK_SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
import numpy as np
import workerpool as wp
import loader_models

framework, spare = sys.argv[1], sys.argv[2] == "spare"
load, predict, reference = loader_models.LOADS[framework]
x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
frameworks = ("torch", "tensorflow", "keras")
with wp.Pool(load, predict, workers=2, load_in="loader", numpy_results=True,
             threads_per_worker=1, spare_zygote=spare) as pool:
    first = pool.submit(x).result()
    if spare:  # a prestarted zygote takes the descriptors over its socket
        pool.reload()
    second = pool.submit(x).result()
    with open("/proc/self/maps") as maps:
        libraries = sorted({{line.split()[-1] for line in maps
                            if "libtorch" in line or "tensorflow" in line}})
    report = {{"imported": [name for name in frameworks if name in sys.modules],
               "libraries": libraries, "type": type(first).__name__,
               "source": pool.stats(memory_usage=False)["weights_source"]}}
expected = reference(x)
report["equal"] = [bool(np.array_equal(out, expected)) for out in (first, second)]
print("REPORT " + json.dumps(report))
"""


@pytest.mark.parametrize("framework, spare", [("torch", False), ("tensorflow", False),
                                              ("tensorflow", True)])
def test_the_pool_process_never_imports_the_framework(tmp_path, framework, spare):
    script = tmp_path / "parent.py"
    script.write_text(NO_FRAMEWORK_SCRIPT.format(paths=[*sys.path, TESTS]))
    done = subprocess.run([sys.executable, str(script), framework,
                           "spare" if spare else "fresh"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(next(line[7:] for line in done.stdout.splitlines()
                             if line.startswith("REPORT ")))
    assert report["imported"] == [], report
    assert report["libraries"] == [], report
    assert report["type"] == "ndarray"
    assert report["equal"] == [True, True]
    if framework == "tensorflow":  # the constants went through the loader as memfds
        assert "constants" in report["source"] and "ImmutableConst" in report["source"]


def test_outputs_and_sharing_equal_loading_in_the_parent():
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    answers, stats = {}, {}
    for where in ("parent", "loader"):
        with wp.Pool(loader_models.torch_mlp, loader_models.torch_predict, workers=2,
                     load_in=where, threads_per_worker=1) as pool:
            answers[where] = pool.submit(x).result()
            stats[where] = pool.stats()
    assert type(answers["loader"]) is type(answers["parent"])  # tensors by default
    assert np.array_equal(answers["loader"].numpy(), answers["parent"].numpy())
    for key in ("model_bytes", "model_buffers", "weights_source", "version"):
        assert stats["loader"][key] == stats["parent"][key], key


def test_an_exception_in_load_reaches_the_caller_with_the_loaders_traceback():
    with pytest.raises(loader_models.BadWeights, match="truncated at byte 12") as raised:
        wp.Pool(loader_models.raises, loader_models.echo, load_in="loader")
    cause = raised.value.__cause__
    assert isinstance(cause, wp.errors.RemoteTraceback)
    assert "in raises" in cause.tb and "loader_models.py" in cause.tb
    assert psutil.Process().children() == []  # the loader was reaped


def test_a_loader_that_dies_is_a_start_error_saying_how():
    with pytest.raises(wp.PoolStartError, match="loader process was killed by signal 9"):
        wp.Pool(loader_models.dies, loader_models.echo, load_in="loader")


def test_load_functions_that_do_not_pickle_are_refused_saying_what_to_do():
    import threading

    lock = threading.Lock()

    def load():
        return lock  # a closure over a lock: cloudpickle cannot send it

    with pytest.raises(wp.PoolStartError, match="load_in='parent'"):
        wp.Pool(load, loader_models.echo, load_in="loader")


KILLED_PARENT_SCRIPT = """
import sys
sys.path[:0] = {paths!r}
import workerpool as wp
import loader_models
wp.Pool(loader_models.hangs(sys.argv[1]), loader_models.echo, load_in="loader")
"""


def test_a_loader_dies_with_the_pool_process(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT_SCRIPT.format(paths=[*sys.path, TESTS]))
    pid_file = tmp_path / "loader.pid"
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)])
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout=60)
        loader = int(pid_file.read_text())
        assert is_running(loader)
    finally:
        parent.kill()
        parent.wait()
    assert wait_until(lambda: not is_running(loader), timeout=10), \
        "the loader outlived the pool's process"


def test_a_bad_load_in_is_refused():
    with pytest.raises(ValueError, match="load_in"):
        wp.Pool(loader_models.torch_mlp, loader_models.echo, load_in="elsewhere")


def test_tensorflow_model_paths_load_in_a_loader_by_default(tmp_path):
    from workerpool.pool.pool import default_load_in

    (tmp_path / "export" / "3").mkdir(parents=True)
    (tmp_path / "export" / "3" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "m.keras").write_bytes(b"")
    assert default_load_in(str(tmp_path / "export")) == "loader"  # base path of versions
    assert default_load_in(tmp_path / "export" / "3") == "loader"
    assert default_load_in(str(tmp_path / "m.keras")) == "loader"
    assert default_load_in(str(tmp_path / "mlp.safetensors")) == "parent"
    assert default_load_in(loader_models.keras_mlp) == "parent"  # a callable: not looked into
