"""What thread hand-offs alone cost a sequential round trip: the floor under any pool whose
requests pass through a dispatcher thread, measured without workerpool's own code.

Three ways to make one round trip to an echo process over ipc:// (a ROUTER here, a DEALER
there, a 30-byte message), p50 of ``--calls`` each, medians of ``--rounds`` rounds:

    raw          the calling thread sends and receives itself (bench/overhead.py's baseline)
    two_hops     the caller posts to a thread (SimpleQueue + eventfd), which sends; it also
                 receives the reply and settles a Future the caller waits on (workerpool's
                 shape)
    direct_send  the caller sends under a lock; the thread receives and settles the Future
    leader       the caller sends under the lock, then reads the socket itself until its
                 own reply is in (leader/follower: the thread reads only while no caller
                 does)

Prints JSON and writes bench/results/thread_hops.md.

    .venv/bin/python bench/thread_hops.py [--rounds 3] [--calls 3000]
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import threading
from concurrent.futures import Future

import zmq

from common import ZmqEcho, emit, markdown_table, p50_us

MESSAGE = b"T" + b"x" * 29


class Link:
    """The ROUTER, the echo process, and a receiving thread for the threaded variants. The
    thread polls the socket's own fd and touches the socket only under ``lock``."""

    def __init__(self):
        self.echo = ZmqEcho()
        self.router, self.identity = self.echo.router, self.echo.identity
        self.lock = threading.Lock()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.waiting: dict[int, Future] = {}
        self.ids = iter(range(1 << 62))
        self.stopping = False
        self.leading = threading.Lock()  # held by whoever reads the socket
        self.router_fd = self.router.get(zmq.FD)
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def send(self, request_id: int) -> None:
        self.router.send(self.identity, zmq.SNDMORE)
        self.router.send(request_id.to_bytes(8, "little") + MESSAGE)

    def loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router.get(zmq.FD), zmq.POLLIN)
        poller.register(self.wake_fd, zmq.POLLIN)
        while not self.stopping:
            events = dict(poller.poll(100))
            if self.wake_fd in events:
                os.eventfd_read(self.wake_fd)
                while True:
                    try:
                        request_id, future = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    self.waiting[request_id] = future
                    with self.lock:
                        self.send(request_id)
            if self.leading.acquire(blocking=False):
                try:
                    self.read_all()
                finally:
                    self.leading.release()

    def read_all(self) -> None:
        while True:  # the fd is edge-triggered: read all there is
            with self.lock:
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
            request_id = int.from_bytes(frames[1][:8], "little")
            self.waiting.pop(request_id).set_result(frames[1])

    def raw(self) -> None:
        with self.lock:
            self.router.send(self.identity, zmq.SNDMORE)
            self.router.send(MESSAGE)
            self.router.recv()
            self.router.recv()

    def two_hops(self) -> None:
        future: Future = Future()
        self.inbox.put((next(self.ids), future))
        os.eventfd_write(self.wake_fd, 1)
        future.result()

    def direct_send(self) -> None:
        future: Future = Future()
        request_id = next(self.ids)
        self.waiting[request_id] = future
        with self.lock:
            self.send(request_id)
        future.result()

    def leader(self) -> None:
        future: Future = Future()
        request_id = next(self.ids)
        self.waiting[request_id] = future
        with self.lock:
            self.send(request_id)
        poller = zmq.Poller()
        poller.register(self.router_fd, zmq.POLLIN)
        with self.leading:
            while True:
                self.read_all()
                if future.done():
                    return
                poller.poll(10)

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.echo.close()
        os.close(self.wake_fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    link = Link()
    ways = {"raw": link.raw, "two_hops": link.two_hops, "direct_send": link.direct_send,
            "leader": link.leader}
    rounds = []
    try:
        for call in ways.values():
            for _ in range(500):  # warm
                call()
        for _ in range(args.rounds):
            rounds.append({name: p50_us(call, args.calls) for name, call in ways.items()})
    finally:
        link.close()
    medians = {name: statistics.median(r[name] for r in rounds) for name in ways}
    rows = [{"way": name, "p50_us": round(value, 1),
             "x_raw": round(value / medians["raw"], 2)} for name, value in medians.items()]
    markdown = "\n\n".join([
        f"# Thread hand-offs alone: a sequential round trip to an echo process "
        f"({os.cpu_count()} CPUs), medians of {args.rounds} rounds",
        markdown_table(rows, ["way", "p50_us", "x_raw"])])
    emit({"rows": rows, "rounds": rounds}, "thread_hops", markdown)


if __name__ == "__main__":
    main()
