"""Odd inputs, misuse and hostile peers: each case once broke a pool or answered wrongly.

The tables run under both start methods against one pool each (module scope); every table
case ends by checking that the same pool still answers correctly. Cases that need a pool of
their own (closing, forking, signals, strangers on the socket) follow the tables.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import msgpack
import numpy as np
import pytest
import torch
import zmq

import modelzoo
import workerpool as wp
from testkit import ctrl_c_once, is_running, our_memfds, wait_until

pytestmark = pytest.mark.module_pool

MAX_MESSAGE = 1024 * 1024


class TwoPartError(Exception):
    """Cannot be rebuilt from a message alone."""

    def __init__(self, first, second):
        super().__init__(first, second)


def probe_predict(model, x, mode="echo"):
    if mode == "echo":
        return x
    if mode == "argmax":  # a 0-d tensor out of the model
        return model(x).argmax()
    if mode == "huge_message":
        raise ValueError("x" * (4 * MAX_MESSAGE))
    if mode == "huge_unrebuildable":
        raise TwoPartError("k" * (4 * MAX_MESSAGE), "a second part")
    if mode == "sys_exit":
        sys.exit(3)
    if mode == "keyboard_interrupt":
        raise KeyboardInterrupt
    if mode == "generator_exit":
        raise GeneratorExit("closed")
    if mode == "sleep":
        time.sleep(x)
        return x
    return model(x)


@pytest.fixture(scope="module", params=["zygote", "spawn"])
def pool(request):
    with wp.Pool(modelzoo.mlp, probe_predict, workers=2, start_method=request.param,
                 max_message_bytes=MAX_MESSAGE, max_queue=4) as pool:
        yield pool


def assert_serves(pool):
    x = torch.randn(3, 32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
    results = [f.result(timeout=60) for f in [pool.submit(x, mode="model") for _ in range(4)]]
    assert all(torch.equal(r, expected) for r in results)


def same(got, sent) -> bool:
    """Equal in type, dtype, shape and every value."""
    if type(got) is not type(sent):
        return False
    if isinstance(sent, torch.Tensor):
        return got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)
    return got.dtype == sent.dtype and np.shape(got) == np.shape(sent) and \
        np.array_equal(got, sent)


# -- what goes in comes back: exactly, or converted as documented (docs/python-api.md,
# "Inputs and outputs") ---------------------------------------------------------------------
ROUND_TRIPS = [
    # id, value sent, what must come back
    ("0-d array", np.array(2.5, dtype=np.float32), np.array(2.5, dtype=np.float32)),
    ("numpy scalar float32", np.float32(2.5), np.float32(2.5)),
    ("numpy scalar from a reduction", np.sum(np.arange(4)), np.int64(6)),
    ("numpy bool scalar", np.bool_(True), np.bool_(True)),
    ("0-d tensor", torch.tensor(3.0), torch.tensor(3.0)),
    ("0-d int tensor", torch.tensor([4, 9, 1]).argmax(), torch.tensor(1)),
    ("big-endian float32", np.arange(5, dtype=">f4"), np.arange(5, dtype=np.float32)),
    ("big-endian int64 matrix", np.arange(6, dtype=">i8").reshape(2, 3),
     np.arange(6, dtype=np.int64).reshape(2, 3)),
    ("big-endian 0-d", np.array(7, dtype=">i4"), np.array(7, dtype=np.int32)),
    ("non-contiguous slice", np.arange(12.0).reshape(3, 4)[:, ::2],
     np.array([[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]])),
    ("np.matrix becomes ndarray", np.asmatrix(np.array([[1, 2], [3, 4]])),
     np.array([[1, 2], [3, 4]])),
    ("tensor with requires_grad is detached", torch.ones(3, requires_grad=True), torch.ones(3)),
]


@pytest.mark.parametrize("sent, expected", [c[1:] for c in ROUND_TRIPS],
                         ids=[c[0] for c in ROUND_TRIPS])
def test_round_trip_table(pool, sent, expected):
    got = pool.submit(sent).result(timeout=60)
    assert same(got, expected), f"sent {sent!r}, got back {got!r}"
    if isinstance(got, torch.Tensor):
        assert not got.requires_grad
    assert_serves(pool)


def test_a_0d_output_of_the_model_stays_0d(pool):
    x = torch.randn(1, 32)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x).argmax()
    got = pool.submit(x, mode="argmax").result(timeout=60)
    assert isinstance(got, torch.Tensor) and got.shape == () and torch.equal(got, expected)


def test_bytes_like_values_arrive_as_bytes(pool):
    got = pool.submit([bytearray(b"ab"), memoryview(b"cd"), np.str_("s")]).result(timeout=60)
    assert got == [b"ab", b"cd", "s"] and type(got[2]) is str


# -- refused in the caller, at once, with nothing held -------------------------------------
REFUSED = [
    # id, submit's args and kwargs, error, what its message must say
    ("masked array", (np.ma.masked_array([1.0, 2.0], mask=[0, 1]),), {}, wp.EncodeError,
     "masked arrays"),
    ("timeout not a number", (1,), {"timeout": "soon"}, TypeError, "timeout must be a number"),
    ("timeout NaN", (1,), {"timeout": math.nan}, ValueError, "must be > 0"),
    ("timeout zero", (1,), {"timeout": 0}, ValueError, "must be > 0"),
    ("timeout negative", (1,), {"timeout": -1.0}, ValueError, "must be > 0"),
    ("timeout bool", (1,), {"timeout": True}, TypeError, "timeout must be a number"),
]


@pytest.mark.parametrize("args, kwargs, error, match", [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_refused_at_submit_table(pool, args, kwargs, error, match):
    # More refusals than max_queue: a refused submit must not keep a queue slot.
    for _ in range(2 * pool.config.max_queue):
        with pytest.raises(error, match=match):
            pool.submit(*args, **kwargs)
    assert pool.stats(memory_usage=False)["queued"] == 0
    assert_serves(pool)


def test_an_infinite_timeout_means_none(pool):
    assert pool.submit(0.05, mode="sleep", timeout=math.inf).result(timeout=60) == 0.05


# -- what predict raises reaches the caller, and only the caller ---------------------------
REMOTE_ERRORS = [
    # mode, error the caller gets, what its message must say
    ("huge_message", ValueError, r"^x{100}.*more characters cut"),
    ("huge_unrebuildable", wp.RemoteError, r"TwoPartError: \('k{100}.*more characters cut"),
    ("sys_exit", wp.RemoteError, r"SystemExit: 3 \(predict raised SystemExit"),
    ("keyboard_interrupt", wp.RemoteError, "KeyboardInterrupt"),
    ("generator_exit", wp.RemoteError, "GeneratorExit: closed"),
]


@pytest.mark.parametrize("mode, error, match", REMOTE_ERRORS, ids=[c[0] for c in REMOTE_ERRORS])
def test_remote_error_table(pool, mode, error, match):
    crashes = pool.stats(memory_usage=False)["crashes"]
    with pytest.raises(error, match=match) as caught:
        pool.submit(1, mode=mode).result(timeout=60)
    assert len(str(caught.value)) < MAX_MESSAGE
    assert pool.stats(memory_usage=False)["crashes"] == crashes  # no worker died for it
    assert_serves(pool)


# -- options are checked where they are given -----------------------------------------------
BAD_OPTIONS = [
    # id, Pool keyword arguments, error, what its message must say
    ("workers float", {"workers": 2.5}, TypeError, "workers must be an int"),
    ("workers zero", {"workers": 0}, ValueError, "workers must be >= 1"),
    ("workers bool", {"workers": True}, TypeError, "workers must be an int"),
    ("heartbeat_interval zero", {"heartbeat_interval": 0}, ValueError, "heartbeat_interval"),
    ("heartbeat_interval negative", {"heartbeat_interval": -1}, ValueError,
     "heartbeat_interval"),
    ("heartbeat_timeout NaN", {"heartbeat_timeout": math.nan}, ValueError, "heartbeat_timeout"),
    ("timeout NaN", {"timeout": math.nan}, ValueError, "timeout must be > 0"),
    ("timeout text", {"timeout": "1"}, TypeError, "timeout must be a number"),
    ("max_batch_size float", {"max_batch_size": 8.0}, TypeError, "max_batch_size must be an int"),
    ("max_queue zero", {"max_queue": 0}, ValueError, "max_queue must be >= 1"),
    ("max_wait_ms inf", {"max_wait_ms": math.inf}, ValueError, "max_wait_ms"),
    ("spin_wait_ms negative", {"spin_wait_ms": -1}, ValueError,
     "spin_wait_ms must be a finite number >= 0"),
    ("spin_wait_ms NaN", {"spin_wait_ms": math.nan}, ValueError, "spin_wait_ms"),
    ("start_timeout zero", {"start_timeout": 0}, ValueError, "start_timeout"),
    ("pin_cpus text", {"pin_cpus": "yes"}, TypeError, "pin_cpus must be True or False"),
    ("max_message_bytes small", {"max_message_bytes": 10}, ValueError, "max_message_bytes"),
    ("credits float", {"credits_per_worker": 1.5}, TypeError, "credits_per_worker"),
    ("unknown option", {"wokers": 2}, TypeError, "wokers"),
    ("predict not callable", {"predict": "model.predict"}, TypeError, "predict must be a callable"),
]


def never_loaded():
    raise AssertionError("load() must not run when the options are bad")


@pytest.mark.parametrize("options, error, match", [c[1:] for c in BAD_OPTIONS],
                         ids=[c[0] for c in BAD_OPTIONS])
def test_bad_options_table(options, error, match):
    options = dict(options)
    predict = options.pop("predict", probe_predict)
    started = time.monotonic()
    with pytest.raises(error, match=match):
        wp.Pool(never_loaded, predict, **options)
    assert time.monotonic() - started < 5  # at once, not after start_timeout


# -- closing, from anywhere ----------------------------------------------------------------
def released(pool, memfds_before: list[str]) -> bool:
    """Its zygote gone, its directory removed, its weights' fds closed (the module's other
    pools still hold theirs)."""
    return not is_running(pool.zygote_pid) and not os.path.exists(pool.ipc_dir) \
        and our_memfds() == memfds_before


def test_close_from_a_done_callback_finishes_by_itself():
    memfds = our_memfds()
    pool = wp.Pool(modelzoo.numpy_model, probe_predict, workers=2)
    raised = []

    def close_from_callback(future):
        try:
            pool.close()  # runs on the pool's own thread
        except BaseException as exc:  # noqa: BLE001 - the assertion below reports it
            raised.append(exc)

    queued = [pool.submit(i) for i in range(5)]
    queued[0].add_done_callback(close_from_callback)
    assert [f.result(timeout=60) for f in queued] == list(range(5))  # drained
    assert wait_until(lambda: released(pool, memfds), 30)
    assert raised == []
    pool.close()  # and again, from here: nothing left to do, no error
    with pytest.raises(wp.PoolClosed):
        pool.submit(1)


def test_close_interrupted_by_ctrl_c_finishes_on_the_second_call():
    memfds = our_memfds()
    pool = wp.Pool(modelzoo.numpy_model, probe_predict, workers=1)
    slow = pool.submit(3.0, mode="sleep")
    with ctrl_c_once(lambda: pool._generation.shutdown.requested):
        with pytest.raises(KeyboardInterrupt):
            pool.close()  # draining the slow request when Ctrl-C arrives
    assert not slow.done()  # it was interrupted while the request still ran
    pool.close()
    assert released(pool, memfds)
    assert slow.result(timeout=0) == 3.0  # the drain went on and answered it


def test_an_unreachable_pool_shuts_itself_down_with_a_resource_warning():
    memfds = our_memfds()
    pool = wp.Pool(modelzoo.numpy_model, probe_predict, workers=2)
    zygote, private_dir = pool.zygote_pid, pool.ipc_dir
    pids = pool.pids
    future = pool.submit(0.2, mode="sleep")
    with pytest.warns(ResourceWarning, match="unclosed <workerpool.Pool"):
        del pool
        gc.collect()
    assert future.result(timeout=60) == 0.2  # accepted work still drains
    assert wait_until(lambda: not any(is_running(p) for p in [zygote, *pids]), 30)
    assert wait_until(lambda: not os.path.exists(private_dir) and our_memfds() == memfds, 30)


def test_a_pool_made_and_dropped_in_one_expression_still_answers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        future = wp.Pool(modelzoo.numpy_model, probe_predict, workers=1).submit(7)
        gc.collect()
    assert future.result(timeout=60) == 7


# -- processes around the pool: forks, signals ---------------------------------------------
FORK_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path[:0] = {paths!r}
    import modelzoo, workerpool as wp
    from testkit import wait_until
    if __name__ == "__main__":
        pool = wp.Pool(modelzoo.numpy_model, modelzoo.numpy_predict, workers=2,
                       start_method=sys.argv[1])
        child = os.fork()
        if child == 0:  # a pre-forked web worker, say: it tries the pool, then exits normally
            try:
                pool.submit(1)
                print(json.dumps({{"child": "submitted"}}), flush=True)
            except wp.WrongProcess as exc:
                print(json.dumps({{"child": str(exc)}}), flush=True)
            sys.exit(0)  # runs atexit, as any normal exit does
        os.waitpid(child, 0)
        x = __import__("numpy").ones((2, 32), dtype="float32")
        before = pool.pids
        os.kill(before[0], signal.SIGKILL)  # the owner needs its zygote and socket now
        assert wait_until(lambda: len(set(pool.pids) - set(before)) == 1, 30)
        results = [pool.submit(x).result(timeout=60)["label"] for _ in range(8)]
        print(json.dumps({{"owner": results, "dir": os.path.exists(pool.ipc_dir)}}),
              flush=True)
        pool.close()
""")


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
def test_a_forked_child_leaves_the_owners_pool_alone(tmp_path, start_method):
    script = tmp_path / "forker.py"
    script.write_text(FORK_SCRIPT.format(paths=[*sys.path, os.path.dirname(__file__)]))
    done = subprocess.run([sys.executable, str(script), start_method], capture_output=True,
                          text=True, timeout=180)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, done.stderr
    child = next(line["child"] for line in lines if "child" in line)
    assert "belongs to process" in child and "forked" in child
    owner = next(line for line in lines if "owner" in line)
    assert len(owner["owner"]) == 8 and owner["dir"]


SIGTERM_SCRIPT = textwrap.dedent("""
    import json, signal, sys, time
    sys.path[:0] = {paths!r}
    import modelzoo, workerpool as wp
    if __name__ == "__main__":
        if sys.argv[2] == "exit":  # a program that exits cleanly on SIGTERM
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        pool = wp.Pool(modelzoo.mlp, modelzoo.torch_predict, workers=2, start_method=sys.argv[1])
        print(json.dumps({{"pids": pool.pids, "zygote": pool.zygote_pid,
                          "dir": pool.ipc_dir}}), flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
@pytest.mark.parametrize("parent", ["default", "exit"])
def test_sigterm_to_the_process_group_leaves_nothing(tmp_path, start_method, parent):
    script = tmp_path / "served.py"
    script.write_text(SIGTERM_SCRIPT.format(paths=[*sys.path, os.path.dirname(__file__)]))
    process = subprocess.Popen([sys.executable, str(script), start_method, parent],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        info = json.loads(next(process.stdout))
        everyone = [process.pid, info["zygote"], *info["pids"]]
        assert all(is_running(pid) for pid in everyone)
        os.killpg(process.pid, signal.SIGTERM)  # systemd's stop, `kill -TERM -PGID`
        process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
    assert wait_until(lambda: not any(is_running(pid) for pid in everyone), 10)
    assert wait_until(lambda: not os.path.exists(info["dir"]), 10), \
        f"{info['dir']} was left: {os.listdir(info['dir'])}"


# -- strangers on the pool's socket --------------------------------------------------------
class RunsCode:
    """Unpickling it would create the marker file: code run by whoever unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_stranger_on_the_socket_gets_no_work_and_runs_no_code(tmp_path):
    marker = str(tmp_path / "unpickled")
    with wp.Pool(modelzoo.mlp, probe_predict, workers=2) as pool:
        context = zmq.Context()
        strangers = []
        # The identities the pool once gave its workers in order, and a few random ones.
        for identity in [b"%d" % i for i in range(1, 12)] + [os.urandom(8) for _ in range(3)]:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{pool.ipc_dir}/pool.sock")
            strangers.append(sock)
        before = pool.pids
        os.kill(before[0], signal.SIGKILL)  # the moment a stranger once took a worker's place
        assert wait_until(lambda: len(set(pool.pids) - set(before)) == 1, 30)
        for sock in strangers:  # a READY as a worker sends it, with a guessed secret
            sock.send_multipart([b"R", msgpack.packb(
                {"pid": os.getpid(), "credits": 8, "secret": b"guess" * 8})])
            sock.send_multipart([b"garbage"])
        futures = [pool.submit(torch.randn(3, 32), mode="model") for _ in range(20)]
        tasks = 0
        for _ in range(50):  # answer any work with a pickle that runs code when loaded
            for sock in strangers:
                while sock.poll(0):
                    frames = sock.recv_multipart()
                    tasks += 1
                    meta = msgpack.unpackb(frames[1])
                    sock.send_multipart([b"D", msgpack.packb(
                        {"ids": meta["ids"], "parts": [2] * len(meta["ids"])}),
                        *[b"\xc7\x01\x04\x00", pickle.dumps(RunsCode(marker))]
                        * len(meta["ids"])])
            time.sleep(0.01)
        for future in futures:
            future.result(timeout=60)
        for sock in strangers:
            sock.close()
        context.term()
        assert tasks == 0, "a stranger was sent work"
        assert not os.path.exists(marker)
        assert wait_until(lambda: all(w["state"] == "ready" for w in
                                      pool.stats(memory_usage=False)["workers"]), 30)
        assert_serves(pool)
