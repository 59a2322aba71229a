"""One HTTP request and its answer, over ASGI: what every route module reads and writes.

Bodies are read whole, refused with 413 before a byte is read when Content-Length is over
the limit (or as soon as a chunked body grows past it); compressed bodies are refused.
Errors are answered ``{"error": ..., "request_id": ...}`` with the status serving/errors.py's
table gives; every answer carries X-Request-ID (the client's, or one made here).
"""

from __future__ import annotations

import json
import logging
import time

from ... import request_ids
from ...serving.errors import (BadRequest, MethodNotAllowed, RequestTooLarge, StreamFailed,
                               message_of, status_of)

log = logging.getLogger("workerpool.serve")

JSON = [(b"content-type", b"application/json")]


class Exchange:
    def __init__(self, scope, receive, send):
        self.scope, self.receive, self._send = scope, receive, send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.started = time.perf_counter()
        # each header's first value by name (a scan of the list per header read was ~2 us
        # of a light model's request: four are read)
        self._headers = dict(reversed(scope["headers"]))
        # X-Request-ID: the client's (if sane) or a new one; on every answer, in error
        # bodies, and in the log lines of the worker that serves it
        self.request_id = request_ids.accepted(self.header(b"x-request-id"))
        self.status: int | None = None  # the answer's, once it started
        self._body: bytes | None = None  # once read (a front end may relay it after)

    async def send(self, message: dict) -> None:
        """The ASGI send, with the request id on the answer (unless a relayed answer has
        it already)."""
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = message.get("headers") or []
            if not any(key == b"x-request-id" for key, _ in headers):
                message = dict(message, headers=[
                    *headers, (b"x-request-id", self.request_id.encode())])
        await self._send(message)

    def header(self, name: bytes) -> str | None:
        """A request header's value (``name`` in lower case), or None."""
        value = self._headers.get(name)
        return value.decode("latin-1") if value is not None else None

    def expect(self, allowed: str) -> None:
        if self.method != allowed:
            raise MethodNotAllowed(f"use {allowed} here, not {self.method}")

    async def body(self, max_bytes: int) -> bytes:
        """The whole body; 413 before reading it when Content-Length says it is too big,
        or as soon as a chunked body grows past ``max_bytes``. Read once: a second call
        returns what the first read."""
        if self._body is not None:
            return self._body
        length = self.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise RequestTooLarge(f"the body is {length} bytes; this server takes at most "
                                  f"{max_bytes} (--max-request-bytes)")
        if (self.header(b"content-encoding") or "identity").strip().lower() != "identity":
            raise BadRequest("compressed request bodies are not supported; send it "
                             "uncompressed")
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise RequestTooLarge(f"the body is over {max_bytes} bytes "
                                      "(--max-request-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return self._body

    async def respond(self, status: int, body: bytes, headers: list) -> None:
        await self._start(status, headers, len(body))
        await self._send({"type": "http.response.body", "body": body})

    async def respond_parts(self, status: int, parts: list, headers: list) -> None:
        """:meth:`respond` with a body given as parts (bytes-like, each sent as it is)."""
        if len(parts) == 1:
            await self.respond(status, parts[0], headers)
            return
        await self._start(status, headers, sum(map(len, parts)))
        for index, part in enumerate(parts):
            await self._send({"type": "http.response.body", "body": part,
                              "more_body": index < len(parts) - 1})

    async def _start(self, status: int, headers: list, length: int) -> None:
        """The answer's start: ``headers`` (ours: never an X-Request-ID of their own), its
        length and the request id. (:meth:`send`'s check of the headers, skipped here, was
        ~1 us of a light model's request.)"""
        self.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": [
            *headers, (b"content-length", b"%d" % length),
            (b"x-request-id", self.request_id.encode())]})

    async def json(self, status: int, payload) -> None:
        await self.respond(status, json.dumps(payload).encode(), JSON)

    async def error(self, error: BaseException, debug: bool) -> None:
        """Answer ``error`` with its status; nothing if the answer had already started or
        the client is gone."""
        if isinstance(error, StreamFailed):
            return  # its stream carried the error already
        status, retry_after = status_of(error)
        if status >= 500 and not isinstance(error, ConnectionError):
            log.info("request failed (%d): %s", status, error)
        headers = list(JSON)
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        body = json.dumps({"error": message_of(error, debug),
                           "request_id": self.request_id}).encode()
        try:
            await self.respond(status, body, headers)
        except Exception:  # noqa: BLE001 - the response had started, or the client is gone
            pass
