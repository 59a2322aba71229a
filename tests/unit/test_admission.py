"""Who the dispatcher listens to: real sockets and real peer credentials, no worker processes.

The dispatcher is driven by hand (its thread is never started): a DEALER in this process
plays a worker. The stand-in supervisor holds only the two facts admission asks of it: the
pool's secret and the zygote's pid (our own parent's, so that this process counts as a
child of the zygote, as a real worker is).
"""

from __future__ import annotations

import os
import pickle
import time
from concurrent.futures import Future

import msgpack
import pytest
import zmq

import workerpool as wp
from workerpool.config import PoolConfig
from workerpool.ipc import protocol
from workerpool.ipc.codec import Codec
from workerpool.pool.dispatcher import Dispatcher, Request, WorkerSlot

SECRET = os.urandom(32)


class ZygoteFacts:
    def __init__(self, zygote_pid: int):
        self.secret = SECRET
        self.zygote_pid = zygote_pid


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
        dispatcher.by_identity[worker.identity] = worker
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
    peer.send_multipart(list(frames))
    assert dispatcher.router.poll(5000)
    time.sleep(0.01)  # every frame of the multipart is in
    dispatcher.read_workers()


def ready(secret=SECRET, pid=None, credits=2):
    return [protocol.READY, protocol.pack_meta(
        {"pid": os.getpid() if pid is None else pid, "credits": credits, "secret": secret})]


ADMISSION = [
    # id, READY fields, zygote pid the dispatcher expects (None: ours), admitted?
    ("right secret, child of the zygote", {}, None, True),
    ("wrong secret", {"secret": b"x" * 32}, None, False),
    ("secret of another length", {"secret": b"short"}, None, False),
    ("right secret, not a child of the zygote", {}, 1, False),
    ("right secret, pid that is not the peer's", {"pid": 1}, None, False),
]


@pytest.mark.parametrize("fields, zygote_pid, admitted", [c[1:] for c in ADMISSION],
                         ids=[c[0] for c in ADMISSION])
def test_admission_table(link, fields, zygote_pid, admitted):
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
    deliver(dispatcher, peer, protocol.ERROR, protocol.pack_meta(
        {"ids": [0], "type": "x.Y", "message": "", "traceback": "",
         "pickled": pickle.dumps(RunsCode(marker))}))
    assert not os.path.exists(marker) and not request.future.done()
    assert dispatcher.counters["rejected_peers"] == 1


MALFORMED = [
    # id, frames after admission; the dispatcher counts each and keeps going
    ("one frame", [b"D"]),
    ("header not msgpack", [protocol.RESULT, b"\xc1\xc1"]),
    ("header not a map", [protocol.RESULT, msgpack.packb([1, 2])]),
    ("ids not a list", [protocol.RESULT, msgpack.packb({"ids": "0", "parts": [1]}), b""]),
    ("parts do not add up", [protocol.RESULT, msgpack.packb({"ids": [0], "parts": [3]}), b""]),
    ("error texts not strings", [protocol.ERROR, msgpack.packb({"ids": [0], "message": 5})]),
    ("credits out of range", [protocol.READY, protocol.pack_meta(
        {"pid": os.getpid(), "credits": 10**9, "secret": SECRET})]),
    ("unknown kind", [b"Z", msgpack.packb({})]),
]


@pytest.mark.parametrize("frames", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_messages_are_counted_never_fatal(link, frames):
    dispatcher, worker, peer = link()
    deliver(dispatcher, peer, *ready())
    request = Request(0, Future(), b"", [])
    worker.inflight[0] = request
    worker.tasks.append([0])
    deliver(dispatcher, peer, *frames)
    assert dispatcher.counters["malformed_messages"] == 1
    if request.future.done():  # a reply naming it answers it, with the reason
        with pytest.raises(wp.ProtocolError, match="malformed reply"):
            request.future.result()
    # and the link still works: a well-formed result settles the request
    if not request.future.done():
        body, frames_out = Codec(allow_pickle=False, max_message_bytes=1 << 20).encode(42)
        deliver(dispatcher, peer, protocol.RESULT,
                protocol.pack_meta({"ids": [0], "parts": [1 + len(frames_out)]}), body,
                *frames_out)
        assert request.future.result(timeout=0) == 42
