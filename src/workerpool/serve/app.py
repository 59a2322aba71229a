"""The HTTP routes: a plain ASGI application on the server's one event loop.

    GET  /v2                                    server metadata
    GET  /v2/health/live | /v2/health/ready     200, or 503 until every model is ready
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    200 or 503
    POST /v2/models/{m}[/versions/{v}]/infer    KServe v2 JSON or binary tensors (v2_http.py);
                                                without a version: the newest ready one
    POST /v2/repository/index                   every model version and its state
    POST /v2/repository/models/{m}/load         load, or hot-swap a loaded one; optional JSON
                                                {"parameters": {"version", "source", "config"}}
    POST /v2/repository/models/{m}/unload       drain, then free (optional "version")
    POST /v1/models/{m}[/versions/{v}]:predict  TensorFlow Serving's REST API (tf_rest.py),
    GET  /v1/models/{m}[/versions/{v}][/metadata]   and its status and metadata routes
    GET  /metrics                               Prometheus text format
    GET  /                                      the operators' status page (static HTML)
    GET  /status                                what the page shows, as JSON

Handlers await the pool's asyncio API and never block the loop on model work; reading pool
statistics (smaps) runs in a thread. Every route but health and the static page needs the
API key when one is set. Errors are ``{"error": ...}`` with the status from errors.py.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import json
import logging
import time

from .. import __version__
from . import tf_rest, v2_http
from .errors import (BadRequest, MethodNotAllowed, ModelNotFound, RequestTooLarge, Unauthorized,
                     message_of, status_of)
from .limits import DEFAULT_MAX_REQUEST_BYTES, parse_json
from .metrics import CONTENT_TYPE, ServerMetrics
from .registry import Registry, select_outputs
from .status import status_report

log = logging.getLogger("workerpool.serve")

_JSON = [(b"content-type", b"application/json")]
_OPEN_ROUTES = {"/v2/health/live", "/v2/health/ready", "/"}  # no API key needed


class App:
    """The ASGI callable ``uvicorn`` runs."""

    def __init__(self, registry: Registry, *, api_key: str | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, debug: bool = False):
        self.registry = registry
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.debug = debug
        self.metrics = ServerMetrics(registry)
        self.status_page = importlib.resources.files(__package__).joinpath(
            "status.html").read_bytes()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path = scope["path"]
        method = scope["method"]
        try:
            if self.api_key is not None and path not in _OPEN_ROUTES:
                self.check_key(scope["headers"])
            await self.route(method, path, scope, receive, send, started)
        except Exception as error:  # noqa: BLE001 - every error is an answer, never a crash
            await self.send_error(send, error)

    def check_key(self, headers) -> None:
        if not key_matches(headers, self.api_key):
            raise Unauthorized("this server needs its API key: send 'Authorization: Bearer "
                               "<key>' (or 'X-API-Key: <key>')")

    async def route(self, method: str, path: str, scope, receive, send, started) -> None:
        parts = path.strip("/").split("/")
        if parts[:1] == ["v2"]:
            if len(parts) >= 3 and parts[1] == "models":
                await self.model_route(method, parts[2:], scope, receive, send, started)
                return
            if parts[1:2] == ["repository"]:
                await self.repository_route(method, parts[2:], scope, receive, send)
                return
            if parts == ["v2"]:
                self.expect(method, "GET")
                await send_json(send, 200, {"name": "workerpool", "version": __version__,
                                            "extensions": ["binary_tensor_data",
                                                           "model_repository"]})
                return
            if parts[1:] == ["health", "live"]:
                await send_json(send, 200, {"live": True})
                return
            if parts[1:] == ["health", "ready"]:
                ready = self.registry.ready
                await send_json(send, 200 if ready else 503, {"ready": ready})
                return
        elif parts[:2] == ["v1", "models"]:
            await tf_rest.route(self, method, parts, scope, receive, send, started)
            return
        elif path == "/metrics":
            self.expect(method, "GET")
            body = await asyncio.to_thread(self.metrics.exposition)
            await send_body(send, 200, body, [(b"content-type", CONTENT_TYPE.encode())])
            return
        elif path == "/":
            self.expect(method, "GET")
            await send_body(send, 200, self.status_page,
                            [(b"content-type", b"text/html; charset=utf-8")])
            return
        elif path == "/status":
            self.expect(method, "GET")
            report = await asyncio.to_thread(status_report, self.registry)
            await send_json(send, 200, report)
            return
        raise ModelNotFound(f"no route {method} {path}")

    async def model_route(self, method: str, parts: list[str], scope, receive, send,
                          started) -> None:
        name, rest = parts[0], parts[1:]
        version = None
        if rest[:1] == ["versions"]:
            if len(rest) < 2:
                raise ModelNotFound("a version is missing after /versions/")
            version, rest = rest[1], rest[2:]
        if rest == ["infer"]:
            self.expect(method, "POST")
            await self.infer(name, version, scope, receive, send, started)
            return
        model = self.registry.get(name, version)
        if rest == []:
            self.expect(method, "GET")
            await send_json(send, 200, model.metadata(self.registry.version_labels(name)))
        elif rest == ["ready"]:
            self.expect(method, "GET")
            await send_json(send, 200 if model.ready else 503,
                            {"name": model.name, "ready": model.ready})
        else:
            raise ModelNotFound(f"no route {method} /v2/models/{'/'.join(parts)}")

    async def repository_route(self, method: str, parts: list[str], scope, receive,
                               send) -> None:
        """The model repository extension; load and unload run in a thread (they wait for
        workers to start or drain) while the loop keeps serving."""
        self.expect(method, "POST")
        body = await self.read_body(scope, receive)
        request = parse_json(body) if body.strip() else {}
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        if parts == ["index"]:
            await send_json(send, 200, self.registry.index(request.get("ready") is True))
            return
        if len(parts) != 3 or parts[0] != "models" or parts[2] not in ("load", "unload"):
            raise ModelNotFound(f"no route {method} /v2/repository/{'/'.join(parts)}")
        name, action = parts[1], parts[2]
        parameters = request.get("parameters")
        if action == "load":
            model = await asyncio.to_thread(self.registry.load, name, parameters)
            await send_json(send, 200, {"name": model.name, "version": model.version,
                                        "weights_version": model.weights_version})
        else:
            models = await asyncio.to_thread(self.registry.unload, name, parameters)
            await send_json(send, 200, {"name": name,
                                        "unloaded": [m.version for m in models]})

    async def infer(self, name: str, version: str | None, scope, receive, send,
                    started: float) -> None:
        with self.metrics.counted(name, "kserve_http", started):
            self.registry.get(name, version)  # 404 before reading a body
            body = await self.read_body(scope, receive)
            request = v2_http.parse_infer(body, header(scope, b"inference-header-content-length"),
                                          self.max_request_bytes)
            model, outputs = await self.registry.infer(name, version, request.inputs)
            select_outputs(name, outputs, [o.name for o in request.outputs or ()])
            try:
                response, headers = v2_http.encode_response(model.name, model.version,
                                                            request, outputs)
            except ValueError as exc:
                raise RuntimeError(f"the model's output cannot be sent: {exc}") from None
            await send_body(send, 200, response,
                            [(k.encode(), v.encode()) for k, v in headers.items()])

    async def read_body(self, scope, receive) -> bytes:
        """The whole body; 413 before reading it when Content-Length says it is too big,
        or as soon as a chunked body grows past the limit."""
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            raise RequestTooLarge(f"the body is {length} bytes; this server takes at most "
                                  f"{self.max_request_bytes} (--max-request-bytes)")
        if (header(scope, b"content-encoding") or "identity").strip().lower() != "identity":
            raise BadRequest("compressed request bodies are not supported; send it "
                                     "uncompressed")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                raise RequestTooLarge(f"the body is over {self.max_request_bytes} bytes "
                                      "(--max-request-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    def expect(method: str, allowed: str) -> None:
        if method != allowed:
            raise MethodNotAllowed(f"use {allowed} here, not {method}")

    async def send_error(self, send, error: BaseException) -> None:
        status, retry_after = status_of(error)
        if status >= 500 and not isinstance(error, (ConnectionError,)):
            log.info("request failed (%d): %s", status, error)
        headers = list(_JSON)
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        body = json.dumps({"error": message_of(error, self.debug)}).encode()
        try:
            await send_body(send, status, body, headers)
        except Exception:  # noqa: BLE001 - the response had started, or the client is gone
            pass


class MetricsPortApp:
    """The app of ``--metrics-port``: /metrics (with the API key, as on the main port) and
    the health routes; nothing else."""

    ROUTES = {"/metrics", "/v2/health/live", "/v2/health/ready"}

    def __init__(self, app: App):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.ROUTES:
            await self.app.send_error(send, ModelNotFound(
                f"no route {scope['path']} on the metrics port; it serves /metrics"))
            return
        await self.app(scope, receive, send)


def key_matches(pairs, key: bytes) -> bool:
    """Whether HTTP headers or gRPC metadata (name, value pairs; bytes or str) carry the
    API key, as ``authorization: Bearer <key>`` or ``x-api-key: <key>``; compared in
    constant time."""
    given = None
    for name, value in pairs or ():
        name = name.encode() if isinstance(name, str) else name
        value = value.encode() if isinstance(value, str) else value
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            given = value[7:].strip()
        elif name == b"x-api-key":
            given = value.strip()
    return given is not None and hmac.compare_digest(given, key)


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json(send, status: int, payload) -> None:
    await send_body(send, status, json.dumps(payload).encode(), _JSON)


async def send_body(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
