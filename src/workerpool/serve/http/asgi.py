"""What every HTTP app of the server shares (the server's own App, a front end's FrontApp): the
ASGI entry (lifespan, scopes, errors as answers) and the API key check."""

from __future__ import annotations

from ...serving.errors import Unauthorized
from ..auth import key_matches
from .exchange import Exchange

OPEN_ROUTES = {"/v2/health/live", "/v2/health/ready", "/"}  # no API key needed


class AsgiApp:
    """What every HTTP app of the server does around its routes: the lifespan answered,
    other scopes ignored, every error an answer (never a crash). ``handle(exchange)``: the
    request."""

    debug = False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        exchange = Exchange(scope, receive, send)
        try:
            await self.handle(exchange)
        except Exception as error:  # noqa: BLE001 - every error is an answer, never a crash
            await exchange.error(error, self.debug)

    async def handle(self, exchange: Exchange) -> None:
        raise NotImplementedError


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
