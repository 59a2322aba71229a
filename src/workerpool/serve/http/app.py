"""The HTTP side of ``workerpool serve``: one ASGI app on the server's event loop.

    /v2/...                 KServe v2 and its model repository extension  (kserve.py)
    /v1/models/...          TensorFlow Serving's REST API                  (tfserving.py)
    GET /metrics            Prometheus text format
    GET /                   the operators' status page (static HTML)
    GET /status             what the page shows, as JSON (with the last minutes' samples:
                            serve/history.py)

Every route but health and the static page needs the API key when one is set (checked here,
before any route reads a byte of the body). Route modules decode their protocol, call the
data plane, and encode its answer; errors are answered by Exchange.error through the one
table. Reading pool statistics (smaps) runs in a thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import importlib.resources

from ...serving.dataplane import DataPlane
from ...serving.errors import ModelNotFound
from ...serving.limits import DEFAULT_MAX_REQUEST_BYTES
from ..history import History
from ..metrics import CONTENT_TYPE, ServerMetrics
from ..registry import Registry
from ..status import status_report
from . import kserve, tfserving
from .asgi import OPEN_ROUTES, AsgiApp, require_key
from .exchange import Exchange



class App(AsgiApp):
    """The ASGI callable ``uvicorn`` runs."""

    def __init__(self, registry: Registry, *, api_key: str | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, debug: bool = False,
                 access_log=None, tracing=None, history_interval: float = 5.0):
        self.registry = registry
        self.access_log = access_log  # serve/access_log.py's AccessLog, or None
        self.tracing = tracing  # serve/tracing.py's Tracing, or None
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.debug = debug
        self.metrics = ServerMetrics(registry)
        self.history = History(registry, history_interval)  # (the server's loop samples it)
        self.metrics.history = self.history
        self.plane = DataPlane(registry, self.metrics, max_tensor_bytes=max_request_bytes)
        self.status_page = importlib.resources.files("workerpool.serve").joinpath(
            "status.html").read_bytes()

    async def handle(self, exchange: Exchange) -> None:
        if self.api_key is not None and exchange.path not in OPEN_ROUTES:
            require_key(exchange.scope["headers"], self.api_key)
        await self.route(exchange)

    async def route(self, exchange: Exchange) -> None:
        path = exchange.path
        parts = path.strip("/").split("/")
        if parts[0] == "v2":
            await kserve.route(self, exchange, parts[1:])
        elif parts[:2] == ["v1", "models"]:
            await tfserving.route(self, exchange, parts[2:])
        elif path == "/metrics":
            exchange.expect("GET")
            body = await asyncio.to_thread(self.metrics.exposition)
            await exchange.respond(200, body, [(b"content-type", CONTENT_TYPE.encode())])
        elif path == "/":
            exchange.expect("GET")
            await exchange.respond(200, self.status_page,
                                   [(b"content-type", b"text/html; charset=utf-8")])
        elif path == "/status":
            exchange.expect("GET")
            report = await asyncio.to_thread(status_report, self.registry)
            report["history"] = self.history.report()
            await exchange.json(200, report)
        else:
            raise ModelNotFound(f"no route {exchange.method} {path}")


class MetricsPortApp:
    """The app of ``--metrics-port``: /metrics (with the API key, as on the main port) and
    the health routes; nothing else."""

    ROUTES = {"/metrics", "/v2/health/live", "/v2/health/ready"}

    def __init__(self, app: App):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.ROUTES:
            await Exchange(scope, receive, send).error(ModelNotFound(
                f"no route {scope['path']} on the metrics port; it serves /metrics"), False)
            return
        await self.app(scope, receive, send)
