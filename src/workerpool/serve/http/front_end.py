"""An HTTP front-end process of ``workerpool serve --http-workers N``.

    python -m workerpool.serve.http.front_end      (started by serve/http_workers.py; its
                                                    boot JSON on stdin)

It listens on the server's port beside the other front ends (SO_REUSEPORT) and answers
with the same routes as the server's own process:

    POST /v2/models/{m}[/versions/{v}]/infer   decoded and encoded here (kserve.infer, the
                                               same code as in one process); the inference
                                               itself runs in the server (relay.py "infer"),
                                               or, for an inline model, here on this front
                                               end's own copy (inline_fronts.py)
    anything else                              relayed whole to the server's app (relay.py
                                               "http"): repository, metadata, health,
                                               status, metrics, TF Serving REST

The API key is checked here, before the body is read (and again by the server's app for
what is relayed). The
process ends when the server's process does (a pidfd lifeline), and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import os
import signal
import socket
import sys

from ... import request_ids
from ...ipc import wire
from ...ipc.endpoints import remove_private_dir
from ...serving.errors import ModelNotFound, NotReady
from ...workers.main import exit_when_any_dies
from ..access_log import AccessLog
from ..inline_fronts import FrontInline, RelayInstead
from ..tracing import Tracing
from ..listen import bind, http_server
from ..relay import RelayClient
from ..settings import ServerSettings
from . import kserve
from .asgi import OPEN_ROUTES, AsgiApp, require_key
from .exchange import Exchange


# The inference that failed in this front end before reaching the server, if any (set by
# RemotePlane.inference, read by FrontApp.handle in the same task).
failed_here: contextvars.ContextVar = contextvars.ContextVar("failed_here", default=None)


class RemoteInference:
    """kserve.infer's ``call`` in a front end: ``run`` asks the server."""

    def __init__(self, plane: "RemotePlane", name: str, version: str | None, protocol: str,
                 started: float):
        self.plane, self.name, self.version = plane, name, version
        self.protocol, self.started = protocol, started
        self.model = None  # (name, version) of the model that answered, after run
        self.reached_server = False  # the server counted it (outcome included)

    async def run(self, inputs: dict, outputs: list[str] | None = None,
                  placed: dict | None = None):
        message = {"kind": "infer", "name": self.name, "version": self.version,
                   "protocol": self.protocol, "started": self.started, "inputs": inputs,
                   "outputs": outputs, "placed": placed,
                   "request_id": request_ids.current.get(),
                   "trace": tracing.inject() if (tracing := self.plane.tracing) else None}
        try:
            name, version, answer = await self.plane.client.call(message)
        finally:
            self.reached_server = True
        self.model = _Answered(name, version)
        request_ids.served.set((name, version, self.protocol))  # (the access log)
        return answer


class _Answered:
    __slots__ = ("name", "version")

    def __init__(self, name: str, version: str):
        self.name, self.version = name, version


class RemotePlane:
    """What kserve.infer reads of the data plane, in a front end."""

    def __init__(self, client: RelayClient, max_tensor_bytes: int, tracing=None):
        self.client = client
        self.max_tensor_bytes = max_tensor_bytes
        self.tracing = tracing  # (the request's trace context goes to the server)

    @contextlib.contextmanager
    def inference(self, name: str, version: str | None, protocol: str, started: float):
        call = RemoteInference(self, name, version, protocol, started)
        try:
            yield call
        except Exception:
            if not call.reached_server:  # failed here (a body that does not decode)
                failed_here.set(call)  # FrontApp settles and counts it
            raise

    async def settle(self, call: RemoteInference, error: Exception) -> Exception:
        """The error a request that failed in this front end is answered with, counted.

        The server's own process looks the model up before it decodes a byte, so an
        unknown model is a 404 whatever the body; here the body is decoded first, so the
        server is asked about the model before a decoding error is answered."""
        try:
            await self.client.call({"kind": "lookup", "name": call.name,
                                    "version": call.version})
        except ModelNotFound as missing:
            error = missing
        except Exception:  # noqa: BLE001 - the server could not say (draining): as it was
            pass
        self._count(call, error)
        return error

    def _count(self, call: RemoteInference, error: Exception) -> None:
        message = {"kind": "count", "name": call.name, "protocol": call.protocol,
                   "started": call.started, "error": wire.describe_error(error, 1 << 16)}
        self.client.notify(message)


class FrontApp(AsgiApp):
    """The ASGI app of a front-end process."""

    def __init__(self, client: RelayClient, settings: ServerSettings):
        self.client = client
        self.api_key = settings.api_key.encode() if settings.api_key else None
        self.max_request_bytes = settings.max_request_bytes
        self.debug = settings.debug
        self.access_log = AccessLog(settings.access_log) if settings.access_log else None
        self.tracing = Tracing.start() if settings.tracing else None
        self.plane = RemotePlane(client, settings.max_request_bytes, self.tracing)
        # inline models: called here, from this front end's own copy
        self.inline = FrontInline(client, settings.max_request_bytes)

    async def handle(self, exchange: Exchange) -> None:
        # the key first, as the server's app asks it: before a byte of the body is read
        if self.api_key is not None and exchange.path not in OPEN_ROUTES:
            require_key(exchange.scope["headers"], self.api_key)
        target = _infer_target(exchange)
        if target is None:
            await self.relay(exchange)
            return
        if self.inline.serves(*target):
            try:
                await kserve.infer(self.inline, exchange, *target)
                return
            except RelayInstead:
                pass  # (shared memory; or the model left meanwhile) the server answers it
        failed_here.set(None)
        try:
            await kserve.infer(self, exchange, *target)
        except Exception as error:
            call = failed_here.get()
            if call is None:
                raise
            settled = await self.plane.settle(call, error)
            if settled is error:
                raise
            raise settled from None

    async def relay(self, exchange: Exchange) -> None:
        """The whole request to the server's app; its answer back as it is."""
        scope = exchange.scope
        body = await exchange.body(self.max_request_bytes)
        message = {"kind": "http", "method": exchange.method, "path": exchange.path,
                   "raw_path": scope.get("raw_path") or exchange.path.encode(),
                   "query_string": scope.get("query_string", b""),
                   "http_version": scope.get("http_version", "1.1"),
                   # the id this front end gave the request, which the server keeps
                   "headers": [*([key, value] for key, value in scope["headers"]
                                 if key != b"x-request-id"),
                               [b"x-request-id", exchange.request_id.encode()]],
                   "client": list(scope["client"]) if scope.get("client") else None,
                   "server": list(scope["server"]) if scope.get("server") else None,
                   "body": body}
        parts: asyncio.Queue = asyncio.Queue()  # an event stream's pieces, as they come
        call = asyncio.ensure_future(self.client.call(message, parts))
        try:
            while True:
                piece = asyncio.ensure_future(parts.get())
                await asyncio.wait({call, piece}, return_when=asyncio.FIRST_COMPLETED)
                if not piece.done():
                    piece.cancel()
                    break
                await _write_piece(exchange, piece.result())
            while not parts.empty():  # (what came before the end, in order)
                await _write_piece(exchange, parts.get_nowait())
            status, headers, answer = call.result()
        except asyncio.CancelledError:
            call.cancel()  # our client went away: the server cancels it too
            raise
        except Exception as exc:
            raise NotReady(f"the server could not answer: {exc}") from exc
        if headers is None:  # an event stream, written already
            await exchange.send({"type": "http.response.body", "body": b""})
            return
        await exchange.send({"type": "http.response.start", "status": status,
                             "headers": [tuple(pair) for pair in headers]})
        await exchange.send({"type": "http.response.body", "body": answer})


async def _write_piece(exchange: Exchange, piece: dict) -> None:
    if "start" in piece:
        status, headers = piece["start"]
        await exchange.send({"type": "http.response.start", "status": status,
                             "headers": [tuple(pair) for pair in headers]})
    else:
        await exchange.send({"type": "http.response.body", "body": bytes(piece["part"]),
                             "more_body": True})


def _infer_target(exchange: Exchange) -> tuple[str, str | None] | None:
    """(model, version) of a KServe v2 infer request; None for every other request."""
    if exchange.method != "POST":
        return None
    parts = exchange.path.strip("/").split("/")
    if len(parts) == 4 and parts[0] == "v2" and parts[1] == "models" and parts[3] == "infer":
        return parts[2], None
    if len(parts) == 6 and parts[:2] == ["v2", "models"] and parts[3] == "versions" \
            and parts[5] == "infer":
        return parts[2], parts[4]
    return None


async def serve(settings: ServerSettings, sock: socket.socket, relay_path: str) -> int:
    server = None

    def drain() -> None:
        server.should_exit = True

    client = RelayClient(relay_path, on_lost=drain)  # the server's end closed: stop too
    await client.connect()
    app = FrontApp(client, settings)
    server = http_server(app, settings)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, drain)
    try:
        await app.inline.start()  # its inline models loaded before it answers
        await server.serve(sockets=[sock])
    finally:
        await app.inline.stop()  # (its last tally sent)
        client.close()
        if app.tracing is not None:
            app.tracing.shutdown()
    return 0


def main() -> int:
    # Ctrl-C reaches the whole process group; the server's process decides, then tells
    # us (SIGTERM), so requests in flight drain in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    boot = json.load(sys.stdin)
    sys.stdin.close()
    # the server's process killed: its relay directory is ours to remove
    exit_when_any_dies([os.pidfd_open(boot["server_pid"])], before_exit=functools.partial(
        remove_private_dir, os.path.dirname(boot["relay"])))
    if os.getppid() != boot["server_pid"]:
        return 0  # the server died before the lifeline watched it
    values = boot["settings"]
    values["allow_sources"] = tuple(values["allow_sources"])
    settings = ServerSettings(**values)
    host, port = boot["address"]
    sock = bind(host, port, reuse_port=True)
    if settings.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(serve(settings, sock, boot["relay"]))
    return asyncio.run(serve(settings, sock, boot["relay"]))


if __name__ == "__main__":
    sys.exit(main())
