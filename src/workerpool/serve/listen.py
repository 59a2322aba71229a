"""Listening: TCP sockets and the uvicorn servers on them, for the server's process and its
HTTP front ends (which import this, not the server: no registry, pools or metrics there).

uvicorn's own signal handling is off: it re-raises the signal after shutting down, which
would end the process with the signal instead of 0 after a clean drain.
"""

from __future__ import annotations

import contextlib
import socket

import uvicorn

from .http.guard import HeadLimits, protocol_class
from .settings import MAX_HEADERS, ServerSettings


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # run() handles SIGTERM and SIGINT


def bind(host: str, port: int, *, reuse_port: bool = False,
         listen: bool = True) -> socket.socket:
    """A TCP socket on (host, port), listening unless told not to. ``reuse_port``: one of a
    group on the same port (SO_REUSEPORT: the kernel spreads new connections over the
    group's listening sockets)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.setblocking(False)
    return sock


def http_server(app, settings: ServerSettings) -> _Server:
    """A uvicorn server for the ASGI ``app``, its request heads bounded (http/guard.py);
    TLS only, with the settings' certificate."""
    http = settings.http if has_module(settings.http) else "h11"
    head = HeadLimits(settings.max_header_bytes, MAX_HEADERS, settings.header_timeout)
    config = uvicorn.Config(app, http=protocol_class(http, head),
                            h11_max_incomplete_event_size=head.max_bytes,
                            lifespan="off", ws="none", access_log=False, log_level="warning",
                            timeout_graceful_shutdown=int(max(1, settings.drain_timeout)),
                            timeout_keep_alive=30, ssl_certfile=settings.tls_cert,
                            ssl_keyfile=settings.tls_key,
                            # X-Forwarded-For from a proxy on this host: only the access
                            # log reads the client; without one, uvicorn's middleware was
                            # ~1 us of a light request for nothing
                            proxy_headers=settings.access_log is not None)
    return _Server(config)


def has_module(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
