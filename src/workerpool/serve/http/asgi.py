"""What every HTTP app of the server shares (the server's own App, a front end's FrontApp): the
ASGI entry (lifespan, scopes, errors as answers) and the API key check."""

from __future__ import annotations

import asyncio

from ... import request_ids
from ...serving.errors import Unauthorized
from ..access_log import client_of
from ..auth import key_matches
from .exchange import Exchange

OPEN_ROUTES = {"/v2/health/live", "/v2/health/ready", "/"}  # no API key needed


# A scope key the relay sets on requests a front end passed on whole: that front end logs
# them in its access log, the server's app does not again.
RELAYED = "workerpool.relayed"


class AsgiApp:
    """What every HTTP app of the server does around its routes: the lifespan answered,
    other scopes ignored, every error an answer (never a crash), the request's id set for
    the pool (its worker's log lines), and the access log written. ``handle(exchange)``:
    the request."""

    debug = False
    access_log = None  # serve/access_log.py's AccessLog, when one is kept
    tracing = None  # serve/tracing.py's Tracing, with --tracing

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        exchange = Exchange(scope, receive, send)
        request_ids.current.set(exchange.request_id)
        cycle = cancel_when_client_leaves(receive)
        relayed = scope.get(RELAYED)  # (its front end logs and traces it)
        if self.tracing is None or relayed:
            await self._answer(exchange, cycle, relayed)
            return
        with self.span(exchange) as span:
            try:
                await self._answer(exchange, cycle, relayed)
            finally:
                if exchange.status is not None:
                    span.set_attribute("http.response.status_code", exchange.status)

    async def _answer(self, exchange: Exchange, cycle, relayed) -> None:
        try:
            await self.handle(exchange)
        except Exception as error:  # noqa: BLE001 - every error is an answer, never a crash
            await exchange.error(error, self.debug)
        except asyncio.CancelledError:
            if getattr(cycle, "disconnected", False):
                return  # the client went away: nobody to answer (guard.py cancelled us)
            raise
        finally:
            if self.access_log is not None and not relayed:
                scope = exchange.scope
                self.access_log.write(
                    client=client_of(scope), protocol="http", method=exchange.method,
                    path=exchange.path, status=exchange.status, started=exchange.started,
                    request_id=exchange.request_id)

    async def handle(self, exchange: Exchange) -> None:
        raise NotImplementedError

    def span(self, exchange: Exchange):
        """The request's span (serve/tracing.py), under the client's trace context."""
        return self.tracing.request(
            f"{exchange.method} {exchange.path}",
            {key.decode("latin-1"): value.decode("latin-1")
             for key, value in exchange.scope["headers"]},
            {"http.request.method": exchange.method, "url.path": exchange.path,
             "workerpool.request_id": exchange.request_id})


def cancel_when_client_leaves(receive):
    """Mark this request's task for cancellation if its connection is lost before the
    answer is complete (guard.py's protocols cancel it): a queued request is then never
    sent to a worker, a stream stops its generator. uvicorn only flags the request as
    disconnected, which a handler waiting on the pool never reads. Returns uvicorn's
    request cycle (``receive``'s owner), or None under another server."""
    cycle = getattr(receive, "__self__", None)
    if cycle is not None:
        # On the loop guard.py noted: without one, Python 3.11 asks the OS for the pid to
        # find the running loop (a syscall: ~2% of a light request's CPU under load)
        cycle.workerpool_task = asyncio.current_task(getattr(cycle, "workerpool_loop", None))
    return cycle


def cancel_abandoned(cycle) -> None:
    """From a protocol whose connection was lost: cancel the request's task, if its answer
    was not complete (uvicorn set ``disconnected``)."""
    if cycle is not None and getattr(cycle, "disconnected", False):
        task = getattr(cycle, "workerpool_task", None)
        if task is not None and not task.done():
            task.cancel()


def require_key(headers, api_key: bytes) -> None:
    """Unauthorized unless the request's ``headers`` carry ``api_key``."""
    if not key_matches(headers, api_key):
        raise Unauthorized("this server needs its API key: send 'Authorization: Bearer "
                           "<key>' (or 'X-API-Key: <key>')")


async def answer_lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
