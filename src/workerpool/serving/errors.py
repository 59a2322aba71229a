"""What goes wrong in a server, and the one table mapping errors to protocol statuses.

Every protocol front end asks this table: HTTP (:func:`status_of`, answering
``{"error": ...}``), gRPC (:func:`grpc_code_of`) and the metrics' outcome labels
(:func:`outcome_of`); nothing else decides a status. A model's own exception is a 500 with its
message only: no traceback or internal path unless the server runs with ``--debug``.
"""

from __future__ import annotations

import traceback

from .. import errors

# The longest error message a client is sent: a request naming 100,000 unknown inputs once
# got a 1 MB answer, and gRPC refuses status messages over its 8 KiB metadata limit.
MAX_ERROR_CHARS = 2000


class ServeError(Exception):
    """An error a client caused or can act on; the message is safe to send."""


class BadRequest(ServeError):
    """Malformed JSON or header, a tensor whose datatype, shape or data do not fit."""


class Unauthorized(ServeError):
    """No API key, or a wrong one."""


class ModelNotFound(ServeError):
    """No model (or version) of that name."""


class RequestTooLarge(ServeError):
    """The body is larger than --max-request-bytes."""


class NotReady(ServeError):
    """The model is loading, warming up, broken or closing."""


class NoWorkerNow(NotReady):
    """The model is loaded but none of its workers is ready right now (a crashed one is
    being replaced: milliseconds to its warm-up's length)."""


class MethodNotAllowed(ServeError):
    """The route exists, the method does not."""


class TooManyModels(ServeError):
    """A repository load would pass --max-models loaded model versions."""


class Unimplemented(ServeError):
    """A method of a protocol this server does not offer (TF Serving's Classify, ...)."""


def unknown_model(name: str, version: str | None = None) -> str:
    """Triton's words for a model (or a version) the server does not have: what its
    clients match on. Our detail follows them."""
    what = repr(name) + (f" version {version}" if version is not None else "")
    return f"Request for unknown model: {what} is not found"


class StreamFailed(Exception):
    """A stream ended by ``error`` after its answer began: the client was told in the
    stream itself (its last event or message); the request is counted by ``error``'s row
    and answered nothing more."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


# (error type, HTTP status, seconds to put in Retry-After or None, gRPC status code name),
# first match wins.
STATUS_TABLE = [
    (BadRequest, 400, None, "INVALID_ARGUMENT"),
    (errors.SharedMemoryError, 400, None, "INVALID_ARGUMENT"),  # the client's region
    (errors.OutputEncodeError, 500, None, "INTERNAL"),  # the model's output: its fault
    (errors.MessageTooLarge, 413, None, "RESOURCE_EXHAUSTED"),
    (errors.EncodeError, 400, None, "INVALID_ARGUMENT"),
    (errors.InputMismatch, 400, None, "INVALID_ARGUMENT"),
    (Unauthorized, 401, None, "UNAUTHENTICATED"),
    (ModelNotFound, 404, None, "NOT_FOUND"),
    (MethodNotAllowed, 405, None, "UNIMPLEMENTED"),
    (RequestTooLarge, 413, None, "RESOURCE_EXHAUSTED"),
    (TooManyModels, 409, None, "RESOURCE_EXHAUSTED"),
    (Unimplemented, 501, None, "UNIMPLEMENTED"),
    (errors.QueueFull, 503, 1, "RESOURCE_EXHAUSTED"),
    (NoWorkerNow, 503, 1, "UNAVAILABLE"),
    (NotReady, 503, 5, "UNAVAILABLE"),
    (errors.PoolClosed, 503, 5, "UNAVAILABLE"),
    (errors.PoolBroken, 503, 30, "UNAVAILABLE"),
    (errors.TaskTimeout, 504, None, "DEADLINE_EXCEEDED"),
]
MODEL_ERROR = (500, None, "INTERNAL")  # the model raised, or its output cannot be sent
_OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
             501: "unimplemented", 503: "unavailable", 504: "timeout"}


def _row(error: BaseException) -> tuple[int, int | None, str]:
    if isinstance(error, StreamFailed):
        error = error.error
    for kind, status, retry_after, code in STATUS_TABLE:
        if isinstance(error, kind):
            return status, retry_after, code
    return MODEL_ERROR


def status_of(error: BaseException) -> tuple[int, int | None]:
    """(HTTP status, Retry-After seconds or None) for an error."""
    status, retry_after, _ = _row(error)
    return status, retry_after


def grpc_code_of(error: BaseException) -> str:
    """The name of the gRPC status code for an error (a ``grpc.StatusCode`` member)."""
    return _row(error)[2]


def outcome_of(error: BaseException) -> str:
    """A metrics label for how a request ended; QueueFull is "unavailable" in every
    protocol (gRPC answers it RESOURCE_EXHAUSTED, HTTP 503)."""
    return _OUTCOMES.get(_row(error)[0], "error")


def message_of(error: BaseException, debug: bool = False,
               limit: int = MAX_ERROR_CHARS) -> str:
    """What the client is told: the message; with ``debug``, the remote traceback too.
    At most ``limit`` characters (a request naming 100,000 unknown inputs must not get a
    megabyte back); the traceback of ``debug`` keeps its last ``limit`` characters."""
    if isinstance(error, (ServeError, errors.WorkerpoolError)) and \
            not isinstance(error, errors.RemoteError):
        # Our messages put stacks and tracebacks (with file paths) after the first line.
        text = str(error) if debug else str(error).split("\n", 1)[0]
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if debug:
        cause = error.__cause__
        detail = getattr(cause, "tb", None) or "".join(traceback.format_exception(error))
        if len(detail) > limit:  # the innermost frames say most
            detail = f"[{len(detail) - limit} characters cut]...{detail[-limit:]}"
        return f"{clip(text, limit)}\n{detail}"
    return clip(text, limit)


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


def clip_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, on a character boundary."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", "ignore") + "..."
