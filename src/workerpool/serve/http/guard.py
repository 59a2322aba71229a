"""uvicorn's HTTP protocols with the request head bounded in size, lines and time.

    bytes arrive ──> count them while the head (request line + headers) is incomplete
                     ├─ past max_header_bytes ──> 431, connection closed
                     ├─ past MAX_HEADERS lines ──> 431, connection closed
                     └─ not complete header_timeout s after the connection opened or the
                        request's first byte ──> 408, connection closed
    head complete ──> uvicorn as usual (the body is bounded by --max-request-bytes in app.py)
    connection lost before the answer is complete ──> the request's task is cancelled
                     (asgi.py): a queued request is never sent, a stream stops its generator

Neither httptools nor uvicorn bounds the head: httptools joins a header's pieces by
concatenation, so one 200 MiB header line kept the loop (HTTP and both gRPC services)
busy for ~40 s before the API key could even be checked. The guard counts bytes before the
parser sees them, so a head over the limit costs at most one read (256 KiB) of parsing.
The limits' reasons are in serving/limits.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .asgi import cancel_abandoned
from .cork import CorkedTransport
from ..settings import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES, MAX_HEADERS


log = logging.getLogger("workerpool.serve")

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


@dataclasses.dataclass(frozen=True)
class HeadLimits:
    max_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = MAX_HEADERS
    timeout: float = DEFAULT_HEADER_TIMEOUT_S


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a head that is refused."""


class _HeadGuard:
    """What both protocols share: the head's byte count, its timer, the refusal."""

    limits: HeadLimits  # set on the class protocol_class() makes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_bytes: int | None = 0  # None: the head is complete, a body may follow
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_started()  # a connection that never sends a byte is timed out too

    def connection_lost(self, exc) -> None:
        self._head_done()
        super().connection_lost(exc)
        cancel_abandoned(self.cycle)  # nobody waits for its answer any more

    def _head_started(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.timeout, self._head_timed_out)

    def _head_done(self) -> None:
        self._head_bytes = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _next_head(self) -> None:
        self._head_bytes = 0

    def _count_head(self, data: bytes) -> bool:
        """Counts ``data`` if a head is being read; False (and the connection refused) when
        the head was already over the limit before it."""
        if self._head_bytes is None:
            return True
        if self._head_bytes > self.limits.max_bytes:
            self._refuse(431, self._too_long())
            return False
        self._head_bytes += len(data)
        return True

    def _check_head(self) -> None:
        """After parsing: a head still incomplete past the limit is refused at once."""
        if self._head_bytes is not None and self._head_bytes > self.limits.max_bytes and \
                not self.transport.is_closing():
            self._refuse(431, self._too_long())

    def _too_long(self) -> str:
        return (f"the request line and headers are over {self.limits.max_bytes} bytes "
                "(--max-header-bytes)")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and not self.transport.is_closing():
            self._refuse(408, f"the request line and headers did not arrive within "
                              f"{self.limits.timeout:g} s (--header-timeout)")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with our JSON error body and close the connection."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = None
        log.info("refused a request head from %s: %s", self.client, message)
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n", body]))
        self.transport.close()


class GuardedHttpTools(_HeadGuard, HttpToolsProtocol):
    """uvicorn's httptools protocol (the default) with the head bounded, and a response's
    head and body sent in one write (cork.py)."""

    _in_head = False  # between a request's first byte and the end of its head

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = CorkedTransport(transport, self.loop)

    def data_received(self, data: bytes) -> None:
        if self._count_head(data):
            super().data_received(data)  # a _Refused from a callback: send_400_response
            self._check_head()
            if self._in_head and self._head_timer is None and \
                    not self.transport.is_closing():
                self._head_started()  # a head begun in this read, not complete in it

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_lines = 0
        # The head's timer starts only if this read ends before the head does (see
        # data_received): a head that comes whole in one read, as nearly all do, costs
        # no timer (a timer made and cancelled per request: ~1.7 us on uvloop).
        self._in_head = True

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_lines += 1
        if self._header_lines > self.limits.max_headers:
            self._refusal = (431, f"the request has more than {self.limits.max_headers} "
                                  "header lines")
            raise _Refused()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_done()
        super().on_headers_complete()
        if self.cycle is not None:  # (asgi.py finds the request's task on this loop)
            self.cycle.workerpool_loop = self.loop

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._next_head()

    def on_response_complete(self) -> None:
        # A request served alone is sent now, not when the loop's pass ends (after the rest
        # of its step: its access log, its task's end): one sequential light request inline,
        # p50 ~175-180 us -> ~126-144 us. With others in progress it waits for the pass's
        # end, with theirs: flushed at once, 32 clients cost ~15 us more CPU a request
        # (~90-98 us against ~73-80) and ~15% of the req/s. Head and body one write either way.
        if len(self.tasks) <= 1:  # (this request's own task)
            self.transport.flush()
        super().on_response_complete()


class GuardedH11(_HeadGuard, H11Protocol):
    """uvicorn's h11 protocol (``--http h11``): h11 bounds the head's size itself
    (``h11_max_incomplete_event_size``: answered 400); the guard adds the timeout."""

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is h11.IDLE:  # between requests, or reading a head
            if self.conn.trailing_data[0]:
                self._next_head()
                self._head_started()
        else:
            self._head_done()


def protocol_class(http: str, limits: HeadLimits) -> type:
    """The guarded protocol class for uvicorn's ``http`` setting ("httptools" or "h11")."""
    base = GuardedH11 if http == "h11" else GuardedHttpTools
    return type(base.__name__, (base,), {"limits": limits})
