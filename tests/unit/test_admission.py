"""Who the dispatcher listens to: real sockets and real peer credentials, no worker processes.

The dispatcher is driven by hand (its thread is never started): a DEALER in this process
plays a worker. The stand-in supervisor holds only the two facts admission asks of it: the
pool's secret and the zygote's pid (our own parent's, so that this process counts as a
child of the zygote, as a real worker is).
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from concurrent.futures import Future

import msgpack
import pytest
import zmq

import workerpool as wp
from workerpool.config import PoolConfig
from workerpool.ipc import wire
from workerpool.ipc.codec import Codec
from workerpool.pool.dispatcher import Dispatcher, Request
from workerpool.pool.scheduling import Task, WorkerSlot, pick_worker

SECRET = os.urandom(32)


class ZygoteFacts:
    """The supervisor as admission sees it; process control is only recorded."""

    def __init__(self, zygote_pid: int):
        self.secret = SECRET
        self.zygote_pid = zygote_pid
        self.signals: list[tuple[int, int]] = []
        self.started: list[int] = []

    def signal_worker(self, worker_id: int, signum: int) -> None:
        self.signals.append((worker_id, signum))

    def start_worker(self, worker_id: int, identity: bytes, cpus) -> None:
        self.started.append(worker_id)

    def crash_report(self, worker_id: int) -> str:
        return ""


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def link(tmp_path):
    """(dispatcher with one starting worker slot, a DEALER speaking as that worker)."""
    def make(zygote_pid=os.getppid(), identity=None):
        config = PoolConfig(workers=1)
        endpoint = f"ipc://{tmp_path}/pool.sock"
        dispatcher = Dispatcher(config, ZygoteFacts(zygote_pid), endpoint,
                                Codec(allow_pickle=True, max_message_bytes=1 << 20))
        dispatcher.router = context.socket(zmq.ROUTER)
        dispatcher.router.setsockopt(zmq.LINGER, 0)
        dispatcher.router.bind(endpoint)
        worker = WorkerSlot(1, 0)
        dispatcher.workers[1] = worker
        dispatcher.scheduler.by_identity[worker.identity] = worker
        peer = context.socket(zmq.DEALER)
        peer.setsockopt(zmq.IDENTITY, identity or worker.identity)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(endpoint)
        sockets.extend([dispatcher.router, peer])
        return dispatcher, worker, peer

    context, sockets = zmq.Context(), []
    yield make
    for sock in sockets:
        sock.close()
    context.term()


def deliver(dispatcher, peer, *frames):
    """Send a message as the peer and let the dispatcher read it."""
    peer.send_multipart(list(frames))
    assert dispatcher.router.poll(5000)
    time.sleep(0.01)  # every frame of the multipart is in
    dispatcher.read_workers()


def ready(secret=SECRET, pid=None, credits=2):
    return [wire.head(wire.READY, {"pid": os.getpid() if pid is None else pid,
                                   "credits": credits, "secret": secret})]


ADMISSION = [
    # id, READY fields, zygote pid the dispatcher expects (None: ours), admitted?
    ("right secret, child of the zygote", {}, None, True),
    ("wrong secret", {"secret": b"x" * 32}, None, False),
    ("secret of another length", {"secret": b"short"}, None, False),
    # (this process's own pid: never its parent, even where the test runner's parent died
    # and init, pid 1, adopted it)
    ("right secret, not a child of the zygote", {}, "self", False),
    ("right secret, pid that is not the peer's", {"pid": 1}, None, False),
]


@pytest.mark.parametrize("fields, zygote_pid, admitted", [c[1:] for c in ADMISSION],
                         ids=[c[0] for c in ADMISSION])
def test_admission_table(link, fields, zygote_pid, admitted):
    if zygote_pid == "self":
        zygote_pid = os.getpid()
    dispatcher, worker, peer = link(**({} if zygote_pid is None else {"zygote_pid": zygote_pid}))
    deliver(dispatcher, peer, *ready(**fields))
    assert worker.admitted is admitted
    assert worker.state == ("ready" if admitted else "starting")
    assert dispatcher.counters["rejected_peers"] == (0 if admitted else 1)


def test_nothing_is_unpickled_from_a_peer_before_it_is_admitted(link, tmp_path):
    marker = str(tmp_path / "ran")
    dispatcher, worker, peer = link()
    request = Request(0, Future(), b"", [])
    worker.inflight[0] = request  # as if sent to this slot
    deliver(dispatcher, peer, wire.head(wire.ERROR,
        {"ids": [0], "type": "x.Y", "message": "", "traceback": "",
         "pickled": pickle.dumps(RunsCode(marker))}))
    assert not os.path.exists(marker) and not request.future.done()
    assert dispatcher.counters["rejected_peers"] == 1


def result_head(**meta):
    return wire.head(wire.RESULT, meta)


MALFORMED = [
    # id, frames after admission, naming request 0; the dispatcher answers it with
    # ProtocolError, counts the message and keeps going
    ("parts overrun the frames", [result_head(ids=[0], bodies=[None], parts=[3]), b""]),
    ("parts short of the frames", [result_head(ids=[0], bodies=[b""], parts=[0]), b"", b""]),
    ("bodies missing", [result_head(ids=[0], parts=[1]), b""]),
    ("a body that is not bytes", [result_head(ids=[0], bodies=[5], parts=[0])]),
    ("compute_s not a number", [result_head(ids=[0], bodies=[b"\xc0"], parts=[0],
                                            compute_s="x")]),
    ("error texts not strings", [wire.head(wire.ERROR, {"ids": [0], "message": 5})]),
]
MALFORMED_OTHER = [
    # not a reply: counted, nothing answered
    ("credits out of range", [wire.head(wire.READY, {"pid": os.getpid(), "credits": 10**9,
                                                      "secret": SECRET})]),
    ("unknown kind", [b"Z" + msgpack.packb({})]),
]


def admitted_with_request_in_flight(link):
    dispatcher, worker, peer = link()
    deliver(dispatcher, peer, *ready())
    request = Request(0, Future(), b"", [])
    request.worker, request.attempts = worker, 1
    worker.inflight[0] = request
    worker.tasks.append(Task([0], each=False))
    worker.credits -= 1
    return dispatcher, worker, peer, request


def answer_42(dispatcher, peer):
    body, frames_out = Codec(allow_pickle=False, max_message_bytes=1 << 20).encode(42)
    deliver(dispatcher, peer, *wire.result([0], [(body, frames_out)], 0.0))


@pytest.mark.parametrize("frames", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_reply_answers_its_request_with_protocol_error(link, frames):
    dispatcher, worker, peer, request = admitted_with_request_in_flight(link)
    deliver(dispatcher, peer, *frames)
    assert dispatcher.counters["malformed_messages"] == 1
    with pytest.raises(wp.ProtocolError, match="malformed reply"):
        request.future.result(timeout=0)
    assert worker.credits == 2 and not worker.tasks  # the task is over: its credit is back


@pytest.mark.parametrize("frames", [c[1] for c in MALFORMED_OTHER],
                         ids=[c[0] for c in MALFORMED_OTHER])
def test_other_malformed_messages_are_counted_never_fatal(link, frames):
    dispatcher, worker, peer, request = admitted_with_request_in_flight(link)
    deliver(dispatcher, peer, *frames)
    assert dispatcher.counters["malformed_messages"] == 1
    assert not request.future.done()
    answer_42(dispatcher, peer)  # and the link still works
    assert request.future.result(timeout=0) == 42


def test_a_late_reply_that_overruns_its_frames_is_counted_not_fatal(link):
    """Checked before anything is indexed, even when no request waits for it any more."""
    dispatcher, worker, peer, request = admitted_with_request_in_flight(link)
    deliver(dispatcher, peer, result_head(ids=[99], bodies=[None, None], parts=[1, 5]), b"")
    assert dispatcher.counters["malformed_messages"] == 1
    answer_42(dispatcher, peer)
    assert request.future.result(timeout=0) == 42


UNREADABLE = [
    # id, frames after admission: which requests they answer cannot be known
    ("one frame", []),
    ("empty head", [b""]),
    ("head not msgpack", [wire.RESULT + b"\xc1\xc1"]),
    ("head not a map", [wire.RESULT + msgpack.packb([1, 2])]),
    ("ids not a list", [result_head(ids="0", bodies=[b""], parts=[0])]),
]


@pytest.mark.parametrize("frames", [c[1] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE])
def test_an_unreadable_reply_replaces_its_worker_and_retries_its_requests(link, frames):
    """Its requests are not left in flight until their deadline: the worker is aborted,
    and when its exit is reported they are retried on another."""
    dispatcher, worker, peer, request = admitted_with_request_in_flight(link)
    if frames:
        deliver(dispatcher, peer, *frames)
    else:  # the identity frame alone
        peer.send(b"")
        dispatcher.router.poll(5000)
        dispatcher.read_workers()
    assert dispatcher.counters["malformed_messages"] == 1
    assert worker.state == "garbled"
    assert dispatcher.supervisor.signals == [(worker.worker_id, signal.SIGABRT)]
    assert not request.future.done()
    dispatcher.carry_out(dispatcher.scheduler.on_exit(worker.worker_id, -signal.SIGABRT, "",
                                                      time.monotonic()))
    assert list(dispatcher.scheduler.retries) == [request] and not request.future.done()
    assert dispatcher.supervisor.started  # a replacement is on its way


def test_a_worker_saying_bye_is_sent_nothing_more(link):
    dispatcher, worker, peer, request = admitted_with_request_in_flight(link)
    answer_42(dispatcher, peer)
    assert worker.credits == 2 and pick_worker(dispatcher.workers.values(), False) is worker
    deliver(dispatcher, peer, wire.head(wire.BYE, {}))
    assert worker.state == "stopping"
    assert pick_worker(dispatcher.workers.values(), idle=False) is None
