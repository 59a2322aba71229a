"""Which request a piece of work serves, for log lines: a server sets the request's id
(X-Request-ID, taken from the client or made here) while it handles the request; a pool
reads it when the request is submitted and carries it to the worker, which prefixes what
predict prints or logs with it (workers/tagged_output.py).

    current: ContextVar   the id of the request this task serves (None: none)
    served: ContextVar    (model, version, protocol) that answered it, for the access log
    timings: ContextVar   a dict the pool fills with the request's queue and compute times
    accepted(value)       a client's X-Request-ID if it is a sane one, else a new id
"""

from __future__ import annotations

import contextvars
import itertools
import os
import re

current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "workerpool_request_id", default=None)

# A new id: this process's random prefix and a counter (uuid4 per request would read the
# OS's random source each time; these need to be unique, not secret).
_PREFIX = os.urandom(6).hex()
_COUNTER = itertools.count(1)
# What we take from a client: printable, no spaces, short enough for a log line.
_SANE = re.compile(r"^[\x21-\x7e]{1,128}$")


def new() -> str:
    return f"{_PREFIX}-{next(_COUNTER):x}"


def accepted(value: str | None) -> str:
    """``value`` (a client's X-Request-ID) when it is 1-128 printable characters without
    spaces, else a new id."""
    return value if value is not None and _SANE.match(value) else new()


# The model version that answered the request this task serves, and the protocol's label:
# (name, version, protocol), set by the data plane when it finds the model (the access log
# reads it when the answer is done).
served: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "workerpool_served", default=None)

# Where a pool notes a request's times (monotonic seconds: "enqueued", "sent", "answered",
# and the worker's "compute_s"), when a tracer asked (serve/tracing.py); None: nobody did.
timings: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "workerpool_timings", default=None)
