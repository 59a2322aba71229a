"""A streaming call in a worker: ``predict`` yields, each item goes back as it comes.

    TASK{stream: n} ──> predict(model, *args) ──> a generator (or any iterator; a plain value
                        is a stream of one item)
        loop: read what the pool sent meanwhile (MORE: n more credits, CANCEL: stop)
              no credit left: wait for MORE (HEARTBEAT while waiting: a slow consumer is
              not a hung worker)
              next(generator) under inference mode ──> ITEM (the first at once; later fast
              ones are held up to FLUSH_AFTER_S and sent together)
        end:  the generator is closed (GeneratorExit inside predict when it is cut short),
              then END{items}, or ERROR when predict raised (after the items it yielded)

Credits bound what a worker sends ahead of its consumer: the pool grants a window of items
and more as the consumer takes them (pool/streams.py), so a slow reader never makes the
worker (or the pool's process) buffer without bound. A TASK or STOP that arrives during a
stream waits in ``backlog`` for the work loop; a MORE or CANCEL of a stream already ended
is dropped there.
"""

from __future__ import annotations

import collections
import time

import zmq

from ..ipc import wire
from . import tagged_output
from ..modules import inference_mode
from .runner import FLUSH_AFTER_S, SLOW_CALL_S, Runner, _items_nbytes


class StreamLink:
    """The worker's end of one stream: its credit, whether it was cancelled, the socket."""

    def __init__(self, sock: zmq.Socket, request_id: int, credit: int, heartbeat_ms: int,
                 backlog: collections.deque):
        self.sock = sock
        self.request_id = request_id
        self.credit = credit
        self.heartbeat_ms = heartbeat_ms
        self.backlog = backlog
        self.cancelled = False

    def read_pending(self) -> None:
        """Everything the pool sent so far, without waiting (ZMQ_EVENTS, not poll(): a
        poll builds a Poller each call, a fifth of a fast stream's time per item)."""
        while wire.has_message(self.sock):
            self._read_one()

    def wait_for_credit(self) -> bool:
        """True once an item may be sent; False if the stream was cancelled meanwhile."""
        while self.credit <= 0 and not self.cancelled:
            if self.sock.poll(self.heartbeat_ms):
                self._read_one()
            else:
                self.sock.send(wire.head(wire.HEARTBEAT, {}))
        return not self.cancelled

    def _read_one(self) -> None:
        frames = wire.recv(self.sock)
        kind, meta = wire.read_head(frames[0])
        if kind in (wire.MORE, wire.CANCEL):
            if meta.get("id") != self.request_id:
                return  # for a stream that has ended
            if kind == wire.CANCEL:
                self.cancelled = True
            elif type(meta.get("n")) is int:
                self.credit += meta["n"]
        else:
            self.backlog.append(frames)

    def send(self, frames: list) -> None:
        wire.send(self.sock, frames)


def run_stream(runner: Runner, meta: dict, frames: list, link: StreamLink,
               clock=time.perf_counter) -> None:
    """Serve one streaming TASK over ``link``; every outcome is sent (nothing raises).
    What predict writes meanwhile carries the request's id (workers/tagged_output.py)."""
    tags = meta.get("tags")
    with tagged_output.serving(tags[0] if isinstance(tags, list) and tags else None):
        _run_stream(runner, meta, frames, link, clock)


def _run_stream(runner: Runner, meta: dict, frames: list, link: StreamLink,
                clock) -> None:
    request_id = link.request_id
    try:
        (item,) = wire.split_items(meta, frames)
        with inference_mode():
            output = runner.call(*item, stream=True)
    except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
        link.send(runner.error([request_id], exc))
        return
    iterator = output if _is_iterator(output) else iter((output,))
    sent, held, held_since = 0, [], 0.0

    def flush() -> None:
        nonlocal sent, held
        link.send(wire.stream_items(request_id, held))
        sent += len(held)
        held = []

    try:
        while True:
            link.read_pending()
            if link.cancelled:
                break
            if held and (link.credit <= 0 or clock() - held_since > FLUSH_AFTER_S):
                flush()
            if not link.wait_for_credit():
                break
            started = clock()
            try:
                with inference_mode():
                    value = next(iterator)
            except StopIteration:
                break
            except BaseException as exc:  # noqa: BLE001 - the consumer's, after its items
                error = exc
            else:
                encoded, _, error = runner.outcome(lambda: [value])
            if error is not None:
                if held:
                    flush()
                link.send(runner.error([request_id], error))
                return
            if not held:
                held_since = clock()
            held += encoded
            link.credit -= 1
            # The first item goes at once (time to first item), and so does one that took
            # long to make; fast ones wait a little for company.
            if sent == 0 or clock() - started > SLOW_CALL_S or \
                    _items_nbytes(held) > runner.codec.max_message_bytes // 2:
                flush()
        if held and not link.cancelled:
            flush()
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                with inference_mode():
                    close()  # GeneratorExit inside predict, where it stopped
            except BaseException:  # noqa: BLE001 - a generator that fails to close has ended
                pass
    link.send(wire.stream_end(request_id, sent))


def _is_iterator(value) -> bool:
    """A generator or another iterator: what streams item by item. Arrays, strings, dicts
    and lists are values (one item), though they can be iterated."""
    return hasattr(value, "__next__") and hasattr(value, "__iter__")
