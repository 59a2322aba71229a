"""The link between HTTP front-end processes (``--http-workers N``) and the server's own process.

    front end (RelayClient)                         server (Relay, on its event loop)
      KServe v2 infer, decoded here  --"infer"-->   data plane: the model looked up, inputs
                                                    checked, the pool called (batching,
                                                    deadlines, metrics, hot swaps: all here)
                                     <--outputs--   (or the error, rebuilt there by type)
      a decode error of its own      --"count"-->   counted in the metrics (no answer)
      every other request, whole     --"http"--->   the server's own ASGI app answers it:
                                     <--response-   repository, status, metrics, TF Serving
                                     <--parts----   an event stream (generate_stream) comes
                                                    back as it is written: its head, then
                                                    each piece, then the end
      its client went away           --"cancel"->   the request's task there is cancelled
                                                    (a queued request is never sent, a
                                                    stream's generator stops)
      the inline models to hold      --"inline"->   answered when they change (a long poll)
      what its inline models served  --"tally"-->   counted as the server's own requests
                                                    (inline_fronts.py)

The front ends spend the CPU a request costs in HTTP parsing, JSON and response encoding;
the server keeps what must be one: the pools, the registry, the counters. A message is a
codec-encoded dict (``[header, *frames]``) under a request id; the reply echoes the id. Both
ends are processes of this server behind a 0700 directory, so the codec may pickle (object
arrays of BYTES tensors).

Why a unix stream socket on the event loops and not ZeroMQ: a ZeroMQ send wakes libzmq's I/O
thread, which writes the socket, and the peer's I/O thread wakes the reader's thread in turn.
Measured with py-spy on the relay over ZeroMQ (light model, 32 clients, 2 front ends):
zmq's Socket.send was 40% of the server process's main-thread samples and 18% of a front
end's. On a stream the loop's thread writes once (uvloop, a syscall) and the peer's loop
reads it directly. The framing is a length per part: a message is
``<request id: u64><parts: u32><lengths: u64 each><parts>`` (no library frames parts of a
stream for asyncio's protocols; this is struct and a buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
import time

from .. import request_ids
from ..ipc import wire
from ..ipc.codec import Codec
from ..ipc.endpoints import make_private_dir, remove_private_dir
from .http.asgi import RELAYED
from .inline_fronts import InlineTable, count_tally

log = logging.getLogger("workerpool.serve")

# Between our own processes the codec's bound protects nothing: the front end bounded the
# request (--max-request-bytes) and the pool bounds what reaches a worker.
_UNBOUNDED = 1 << 62
_ERROR_BYTES = 1 << 20
NO_ANSWER = 0  # the id of a message that wants none ("count")
_HEAD = struct.Struct("<QI")


def relay_path(private_dir: str) -> str:
    return os.path.join(private_dir, "relay.sock")


def _codec() -> Codec:
    return Codec(allow_pickle=True, max_message_bytes=_UNBOUNDED, pickle_object_arrays=True)


class FramedStream(asyncio.Protocol):
    """Messages of parts over a stream: ``send(request_id, parts)``; each message received
    goes to ``on_message(stream, request_id, parts)`` (parts: memoryviews of one bytes
    object, valid as long as they are referenced)."""

    def __init__(self, on_message, on_lost=None, on_made=None):
        self.on_message = on_message
        self.on_lost = on_lost
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.on_made is not None:
            self.on_made(self)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.on_lost is not None:
            self.on_lost(self)

    def send(self, request_id: int, parts: list) -> None:
        if self.transport is None:
            raise ConnectionError("the relay's connection is closed")
        sizes = [len(part) if isinstance(part, bytes) else memoryview(part).nbytes
                 for part in parts]
        head = _HEAD.pack(request_id, len(parts)) + struct.pack(f"<{len(parts)}Q", *sizes)
        self.transport.writelines([head, *parts])

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, end = 0, len(buffer)
        while end - offset >= _HEAD.size:
            request_id, count = _HEAD.unpack_from(buffer, offset)
            sizes_at = offset + _HEAD.size
            if end - sizes_at < 8 * count:
                break
            sizes = struct.unpack_from(f"<{count}Q", buffer, sizes_at)
            body_at = sizes_at + 8 * count
            if end - body_at < sum(sizes):
                break
            body = memoryview(bytes(buffer[body_at:body_at + sum(sizes)]))
            parts, at = [], 0
            for size in sizes:
                parts.append(body[at:at + size])
                at += size
            offset = body_at + at
            self.on_message(self, request_id, parts)
        if offset:
            del buffer[:offset]


class Relay:
    """The server's end: answers the front ends on the server's event loop. ``app``: the
    server's serve.http.app.App (its data plane, metrics, and routes). Its socket lives in
    a new 0700 directory, removed by close() (or by a front end, if this process is
    killed)."""

    def __init__(self, app):
        self.app = app
        self.private_dir = make_private_dir()
        self.path = relay_path(self.private_dir)
        self.codec = _codec()
        self.server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._answering: set[asyncio.Task] = set()  # the loop holds tasks weakly
        self._streams: set[FramedStream] = set()
        # what each front end's requests run as, by request id: a "cancel" or the front
        # end's connection lost cancels them
        self._tasks: dict[FramedStream, dict[int, asyncio.Task]] = {}
        # the inline models each front end calls itself (inline_fronts.py)
        self.inline = InlineTable(app.registry)

    @property
    def front_ends(self) -> int:
        """Front ends connected now."""
        return len(self._streams)

    async def start(self) -> None:
        """Listens from now on, on the running loop."""
        self.loop = asyncio.get_running_loop()
        self.inline.bind(self.loop)
        try:
            self.server = await self.loop.create_unix_server(
                lambda: FramedStream(self._received, on_lost=self._front_end_lost,
                                     on_made=self._streams.add), self.path)
        except OSError:
            remove_private_dir(self.private_dir)
            raise

    async def wait_for_front_ends(self, count: int, timeout: float) -> bool:
        """Until ``count`` front ends are connected (True), or ``timeout`` seconds pass."""
        deadline = self.loop.time() + timeout
        while len(self._streams) < count:
            if self.loop.time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._answering):
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        remove_private_dir(self.private_dir)

    def _front_end_lost(self, stream: FramedStream) -> None:
        self._streams.discard(stream)
        self.inline.lost(stream)
        for task in self._tasks.pop(stream, {}).values():
            task.cancel()  # nobody waits for their answers

    def _received(self, stream: FramedStream, request_id: int, parts: list) -> None:
        task = self.loop.create_task(self._answer(stream, request_id, parts))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)
        if request_id != NO_ANSWER:
            tasks = self._tasks.setdefault(stream, {})
            tasks[request_id] = task
            task.add_done_callback(lambda _: tasks.pop(request_id, None))

    async def _answer(self, stream: FramedStream, request_id: int, parts: list) -> None:
        try:
            message = self.codec.decode(parts[0], parts[1:])
            kind = message["kind"]
            if kind == "infer":
                reply = {"ok": await self._infer(message)}
            elif kind == "lookup":  # ModelNotFound, or nothing
                self.app.plane.model(message["name"], message["version"])
                reply = {"ok": None}
            elif kind == "http":
                reply = {"ok": await self._http(message, stream, request_id)}
            elif kind == "count":
                self._count(message)
                return
            elif kind == "inline":  # the next table of inline models (a long poll)
                reply = {"ok": await self.inline.next_table(stream, message["after"])}
            elif kind == "tally":  # what a front end's inline models answered
                count_tally(self.app, message)
                return
            elif kind == "cancel":
                task = self._tasks.get(stream, {}).get(message["id"])
                if task is not None:
                    task.cancel()
                return
            else:
                raise ValueError(f"relay: unknown message kind {kind!r}")
        except Exception as exc:  # noqa: BLE001 - every error goes back to its caller
            reply = {"error": wire.describe_error(exc, _ERROR_BYTES)}
        if request_id == NO_ANSWER or stream.transport is None:
            return  # wants none, or its front end is gone
        try:
            header, body = self.codec.encode(reply)
        except Exception as exc:  # noqa: BLE001 - an output the codec cannot carry
            header, body = self.codec.encode({"error": wire.describe_error(exc, _ERROR_BYTES)})
        self._send(stream, request_id, header, body)

    def _send(self, stream: FramedStream, request_id: int, header, body) -> None:
        try:
            stream.send(request_id, [header, *body])
        except Exception as exc:  # noqa: BLE001 - its connection closed meanwhile
            log.warning("relay: an answer was not sent: %s", exc)

    async def _infer(self, message: dict) -> list:
        request_ids.current.set(message.get("request_id"))  # (the worker's log lines)
        plane, tracing = self.app.plane, self.app.tracing
        # with --tracing: the queue and compute spans, children of the front end's span
        with tracing.pool_times(message.get("trace")) if tracing is not None \
                else contextlib.nullcontext(), \
                plane.inference(message["name"], message["version"], message["protocol"],
                                message["started"]) as call:
            outputs = await call.run(message["inputs"], message["outputs"],
                                     placed=message.get("placed"))
        return [call.model.name, call.model.version, outputs]

    def _count(self, message: dict) -> None:
        """A request the front end failed before it reached us (a body that does not
        decode): counted with its outcome, as the server's own process counts one."""
        metrics = self.app.plane.metrics
        if metrics is None:
            return
        error = wire.rebuild_exception(message["error"], raised_by="the front end")
        metrics.finished(message["name"], message["protocol"], error,
                         time.perf_counter() - message["started"])

    async def _http(self, message: dict, stream: FramedStream, request_id: int) -> list:
        """One whole HTTP request, answered by the server's app in this process. An event
        stream's answer goes back in parts as the app writes it (then [status, None,
        None] ends it); any other answer whole, as [status, headers, body]."""
        body = message["body"]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": message["http_version"], "method": message["method"],
                 "scheme": "http", "path": message["path"], "raw_path": message["raw_path"],
                 "query_string": message["query_string"], "root_path": "",
                 "headers": [tuple(pair) for pair in message["headers"]],
                 "client": _address(message["client"]), "server": _address(message["server"]),
                 RELAYED: True}  # (the front end logs it)
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        response: list = [500, [], []]
        streamed = False

        async def send(event):
            nonlocal streamed
            if event["type"] == "http.response.start":
                response[0] = event["status"]
                response[1] = [list(pair) for pair in event.get("headers", ())]
                streamed = [b"content-type", b"text/event-stream"] in response[1]
                if streamed:
                    self._send(stream, request_id, *self.codec.encode(
                        {"start": response[:2]}))
            elif event["type"] == "http.response.body":
                if streamed:
                    self._send(stream, request_id, *self.codec.encode(
                        {"part": event.get("body", b"")}))
                else:
                    response[2].append(event.get("body", b""))

        await self.app(scope, receive, send)
        if streamed:
            return [response[0], None, None]
        response[2] = b"".join(response[2])
        return response


def _address(pair):
    return tuple(pair) if pair else None


class RelayClient:
    """A front end's end: ``await call(message)`` -> the server's answer (or its error,
    raised here); ``notify(message)`` sends one that wants no answer. ``on_lost()``: the
    server's end closed (the front end should stop). Used on one loop."""

    def __init__(self, path: str, on_lost=None):
        self.path = path
        self.on_lost = on_lost
        self.codec = _codec()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._parts: dict[int, asyncio.Queue] = {}
        self.stream: FramedStream | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.stream = await loop.create_unix_connection(
            lambda: FramedStream(self._received, self._lost), self.path)

    def close(self) -> None:
        if self.stream is not None and self.stream.transport is not None:
            self.stream.transport.close()

    async def call(self, message: dict, parts: asyncio.Queue | None = None):
        """The server's answer; ``parts``: where the pieces of an answer that comes in
        parts go (``{"start": [status, headers]}``, ``{"part": bytes}``) before it ends.
        Cancelled (its client went away), it tells the server to cancel the request."""
        request_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        if parts is not None:
            self._parts[request_id] = parts
        try:
            header, frames = self.codec.encode(message)
            self.stream.send(request_id, [header, *frames])
            reply = await answer
        except asyncio.CancelledError:
            if self.stream is not None and self.stream.transport is not None:
                self.notify({"kind": "cancel", "id": request_id})
            raise
        finally:
            self._waiting.pop(request_id, None)
            self._parts.pop(request_id, None)
        if "error" in reply:
            raise wire.rebuild_exception(reply["error"], raised_by="the server")
        return reply["ok"]

    def notify(self, message: dict) -> None:
        header, frames = self.codec.encode(message)
        self.stream.send(NO_ANSWER, [header, *frames])

    def _received(self, stream: FramedStream, request_id: int, parts: list) -> None:
        answer = self._waiting.get(request_id)
        if answer is None or answer.done():
            return  # its caller gave up
        try:
            reply = self.codec.decode(parts[0], parts[1:])
        except Exception as exc:  # noqa: BLE001 - a reply that does not decode
            answer.set_exception(exc)
            return
        pieces = self._parts.get(request_id)
        if pieces is not None and ("start" in reply or "part" in reply):
            pieces.put_nowait(reply)
        else:
            answer.set_result(reply)

    def _lost(self, stream: FramedStream) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(ConnectionError("the server's relay closed"))
        if self.on_lost is not None:
            self.on_lost()
