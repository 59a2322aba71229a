"""Bad requests and crashing models get a clear, typed error; the pool keeps serving.

The crash table runs under both start methods against one pool each (module scope), and
every case ends by checking that the same pool still answers correctly.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import threading

import numpy as np
import pytest
import torch

import modelzoo
import workerpool as wp
from workerpool.errors import RemoteTraceback

pytestmark = pytest.mark.module_pool


class CustomError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)
        self.code = code


class UnpicklableError(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class CrashesWhenUnpickled:
    """An argument whose unpickling (in the worker, decoding the call) crashes it."""

    def __reduce__(self):
        return (faulthandler._sigsegv, ())


class FailsWhenUnpickled:
    def __reduce__(self):
        return (int, ("not a number",))


class CrashesWhenPickled:
    """A result whose pickling (in the worker, encoding the reply) crashes it."""

    def __reduce__(self):
        faulthandler._sigsegv()


class FailsWhenPickled:
    def __reduce__(self):
        raise TypeError("refuses to be pickled")


def misbehaving_predict(model, x, mode="ok", marker=None):
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "segfault":
        ctypes.string_at(0)
    elif mode == "exit":
        os._exit(3)
    elif mode == "write_weight":
        model[0].weight.add_(1.0)  # in-place write to a shared, read-only weight
    elif mode == "memory_error":
        raise MemoryError("cannot allocate the activations")
    elif mode == "unpicklable_error":
        raise UnpicklableError("holds a lock")
    elif mode == "unencodable_output":
        return np.array([object()], dtype=object)
    elif mode == "crash_once" and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "raise":
        raise CustomError(42, "bad input")
    elif mode == "break_work_loop":
        # From inside the worker: its next message can no longer be read, an exception in
        # the work loop itself rather than in predict.
        from workerpool.ipc import wire

        def broken(frame):
            raise RuntimeError("the work loop is broken")
        wire.read_head = broken
    elif mode == "crash_pickling_result":
        return CrashesWhenPickled()
    elif mode == "error_pickling_result":
        return FailsWhenPickled()
    elif mode == "huge_output":
        return np.zeros(2 * 1024 * 1024, dtype=np.uint8)
    return model(x)


@pytest.fixture(scope="module", params=["zygote", "spawn"])
def pool(request):
    with wp.Pool(modelzoo.mlp, misbehaving_predict, workers=2, start_method=request.param,
                 max_message_bytes=1024 * 1024) as pool:
        yield pool


@pytest.fixture(scope="module")
def x_and_expected():
    x = torch.randn(3, 32)
    return x, modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)


def assert_serves(pool, x_and_expected):
    x, expected = x_and_expected
    results = [f.result(timeout=60) for f in [pool.submit(x) for _ in range(8)]]
    assert all(torch.equal(r, expected) for r in results)


CRASH_TABLE = [
    # mode, error the caller gets, what its message must say
    ("sigkill", wp.WorkerCrashed, r"SIGKILL \(out of memory\?"),
    ("segfault", wp.WorkerCrashed, "SIGSEGV"),
    ("exit", wp.WorkerCrashed, "exited with code 3"),
    ("write_weight", wp.WorkerCrashed, "SIGSEGV.*read-only"),
    ("memory_error", MemoryError, "cannot allocate the activations"),
    ("unpicklable_error", wp.RemoteError, "UnpicklableError: holds a lock"),
    ("unencodable_output", wp.EncodeError, "dtype object"),
    # CPython's ProcessPoolExecutor table: failures around the pickles themselves
    ("crash_unpickling_args", wp.WorkerCrashed, "SIGSEGV"),
    ("error_unpickling_args", ValueError, "invalid literal for int"),
    ("crash_pickling_result", wp.WorkerCrashed, "SIGSEGV"),
    ("error_pickling_result", wp.EncodeError, "refuses to be pickled"),
]
ARGUMENTS = {"crash_unpickling_args": {"marker": CrashesWhenUnpickled()},
             "error_unpickling_args": {"marker": FailsWhenUnpickled()}}


@pytest.mark.parametrize("mode, error, match", CRASH_TABLE, ids=[c[0] for c in CRASH_TABLE])
def test_crash_table(pool, x_and_expected, mode, error, match):
    x, expected = x_and_expected
    innocent = [pool.submit(x) for _ in range(10)]
    culprit = pool.submit(x, mode=mode, **ARGUMENTS.get(mode, {}))
    innocent += [pool.submit(x) for _ in range(10)]
    with pytest.raises(error, match=match):
        culprit.result(timeout=60)
    # every request queued beside it, even on the same worker, got the right answer
    assert all(torch.equal(f.result(timeout=60), expected) for f in innocent)
    assert_serves(pool, x_and_expected)


def test_crashed_worker_errors_carry_the_python_stack(pool, x_and_expected):
    with pytest.raises(wp.WorkerCrashed) as caught:
        pool.submit(x_and_expected[0], mode="write_weight").result(timeout=60)
    assert caught.value.exitcode == -signal.SIGSEGV
    assert "misbehaving_predict" in caught.value.crash_traceback  # the line that wrote
    assert "clone" in str(caught.value)  # what to do about it


def test_a_worker_that_dies_once_is_retried_transparently(pool, x_and_expected, tmp_path):
    x, expected = x_and_expected
    crashes = pool.stats(memory_usage=False)["crashes"]
    got = pool.submit(x, mode="crash_once", marker=str(tmp_path / "crashed")).result(timeout=60)
    assert torch.equal(got, expected)
    assert (tmp_path / "crashed").exists()  # it really did crash the first time
    assert pool.stats(memory_usage=False)["crashes"] == crashes + 1


def test_exception_keeps_its_type_and_the_worker_traceback(pool, x_and_expected):
    with pytest.raises(CustomError) as caught:
        pool.submit(x_and_expected[0], mode="raise").result(timeout=60)
    assert caught.value.code == 42
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "misbehaving_predict" in caught.value.__cause__.tb
    assert_serves(pool, x_and_expected)


def test_oversize_messages_are_refused_both_ways(pool, x_and_expected):
    with pytest.raises(wp.MessageTooLarge, match="max_message_bytes"):
        pool.submit(np.zeros(2 * 1024 * 1024, dtype=np.uint8))  # raised at once, nothing sent
    with pytest.raises(wp.MessageTooLarge):
        pool.submit(x_and_expected[0], mode="huge_output").result(timeout=60)
    assert_serves(pool, x_and_expected)


def test_unsupported_input_is_refused_at_submit(pool):
    with pytest.raises(wp.EncodeError, match="dtype object"):
        pool.submit(np.array([None, 1], dtype=object))


def numpy_write_predict(model, x):
    model["w1"][0, 0] = 1.0
    return x


def test_numpy_weight_write_is_a_clean_error():
    with wp.Pool(modelzoo.numpy_model, numpy_write_predict, workers=1) as pool:
        with pytest.raises(ValueError, match="read-only"):
            pool.submit(np.zeros(2)).result(timeout=60)
        assert pool.stats()["crashes"] == 0


def failing_load():
    raise RuntimeError("the checkpoint is missing")


def test_load_error_reaches_the_caller_and_nothing_starts():
    with pytest.raises(RuntimeError, match="checkpoint is missing"):
        wp.Pool(failing_load, modelzoo.torch_predict, workers=2)


class NotImportableInWorker:
    """Its instances unpickle by calling a function that fails in the worker only."""

    def __reduce__(self):
        return (fail_if_worker, (os.getpid(),))


def fail_if_worker(parent_pid):
    if os.getpid() != parent_pid:
        raise ImportError("this module cannot be imported in a worker")
    return NotImportableInWorker()


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
def test_attach_failure_is_a_start_error_with_the_cause(start_method):
    with pytest.raises(wp.PoolStartError, match="cannot be imported in a worker"):
        wp.Pool(lambda: NotImportableInWorker(), modelzoo.torch_predict, workers=2,
                start_method=start_method)


def test_a_worker_whose_own_loop_fails_says_so_and_loses_nothing(pool, x_and_expected, caplog):
    """Past READY, a failure of the worker's loop is exit code 72 (not 70, "could not attach
    the model"), logged with its cause; its requests in flight are retried elsewhere."""
    x, expected = x_and_expected
    crashes = pool.stats(memory_usage=False)["crashes"]
    with caplog.at_level(logging.INFO, logger="workerpool"):
        assert torch.equal(pool.submit(x, mode="break_work_loop").result(timeout=60), expected)
        results = [f.result(timeout=60) for f in [pool.submit(x) for _ in range(20)]]
        assert all(torch.equal(r, expected) for r in results)
        assert_serves(pool, x_and_expected)
    assert pool.stats(memory_usage=False)["crashes"] == crashes + 1
    died = [r for r in caplog.records if "exited with code 72" in r.getMessage()]
    assert len(died) == 1 and died[0].levelno == logging.WARNING
    assert "work loop failed after it was ready" in died[0].getMessage()
    assert any("replacing a worker" in r.getMessage() for r in caplog.records)
