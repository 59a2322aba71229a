"""Bad requests and crashing models get a clear error; the pool keeps serving."""

from __future__ import annotations

import os
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


def misbehaving_predict(model, x, mode="ok"):
    if mode == "write_weight":
        model[0].weight.add_(1.0)  # in-place write to a shared, read-only weight
    elif mode == "raise":
        raise CustomError(42, "bad input")
    elif mode == "unpicklable_error":
        raise UnpicklableError("holds a lock")
    elif mode == "unencodable_output":
        return np.array([object()], dtype=object)
    elif mode == "huge_output":
        return np.zeros(2 * 1024 * 1024, dtype=np.uint8)
    elif mode == "exit":
        os._exit(3)
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


def test_exception_keeps_its_type_and_the_worker_traceback(pool, x_and_expected):
    with pytest.raises(CustomError) as caught:
        pool.submit(x_and_expected[0], mode="raise").result(timeout=60)
    assert caught.value.code == 42
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "misbehaving_predict" in caught.value.__cause__.tb
    assert_serves(pool, x_and_expected)


def test_unpicklable_exception_arrives_as_remote_error(pool, x_and_expected):
    with pytest.raises(wp.RemoteError, match="UnpicklableError: holds a lock") as caught:
        pool.submit(x_and_expected[0], mode="unpicklable_error").result(timeout=60)
    assert "test_failures.UnpicklableError" in caught.value.remote_type
    assert_serves(pool, x_and_expected)


def test_unencodable_output_is_an_encode_error(pool, x_and_expected):
    with pytest.raises(wp.EncodeError, match="dtype object"):
        pool.submit(x_and_expected[0], mode="unencodable_output").result(timeout=60)
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


def test_weight_write_crashes_only_that_worker_and_says_why(pool, x_and_expected):
    x, expected = x_and_expected
    good = [pool.submit(x) for _ in range(20)]
    bad = pool.submit(x, mode="write_weight")
    good += [pool.submit(x) for _ in range(20)]
    with pytest.raises(wp.WorkerCrashed) as caught:
        bad.result(timeout=60)
    message = str(caught.value)
    assert "SIGSEGV" in message and "read-only" in message
    assert "misbehaving_predict" in caught.value.crash_traceback  # the Python line that wrote
    assert caught.value.exitcode == -11
    # every other request, queued before and after, got the right answer
    assert all(torch.equal(f.result(timeout=60), expected) for f in good)
    assert_serves(pool, x_and_expected)
    assert pool.stats()["restarts"] >= 1


def test_exit_in_predict_is_reported_with_its_code(pool, x_and_expected):
    with pytest.raises(wp.WorkerCrashed, match="exited with code 3"):
        pool.submit(x_and_expected[0], mode="exit").result(timeout=60)
    assert_serves(pool, x_and_expected)


def numpy_write_predict(model, x):
    model["w1"][0, 0] = 1.0
    return x


def test_numpy_weight_write_is_a_clean_error():
    with wp.Pool(modelzoo.numpy_model, numpy_write_predict, workers=1) as pool:
        with pytest.raises(ValueError, match="read-only"):
            pool.submit(np.zeros(2)).result(timeout=60)
        assert pool.stats()["restarts"] == 0


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
