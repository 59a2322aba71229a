"""What goes wrong in a server, and the one table mapping errors to protocol statuses.

Every protocol front end asks this table: HTTP (:func:`status_of`, answering
``{"error": ...}``), gRPC (:func:`grpc_code_of`) and the metrics' outcome labels
(:func:`outcome_of`); nothing else decides a status. A model's own exception is a 500 with its
message only: no traceback or internal path unless the server runs with ``--debug``.
"""

from __future__ import annotations

import traceback

from .. import errors


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


class MethodNotAllowed(ServeError):
    """The route exists, the method does not."""


class Unimplemented(ServeError):
    """A method of a protocol this server does not offer (TF Serving's Classify, ...)."""


# (error type, HTTP status, seconds to put in Retry-After or None, gRPC status code name),
# first match wins.
STATUS_TABLE = [
    (BadRequest, 400, None, "INVALID_ARGUMENT"),
    (errors.MessageTooLarge, 413, None, "RESOURCE_EXHAUSTED"),
    (errors.EncodeError, 400, None, "INVALID_ARGUMENT"),
    (errors.InputMismatch, 400, None, "INVALID_ARGUMENT"),
    (Unauthorized, 401, None, "UNAUTHENTICATED"),
    (ModelNotFound, 404, None, "NOT_FOUND"),
    (MethodNotAllowed, 405, None, "UNIMPLEMENTED"),
    (RequestTooLarge, 413, None, "RESOURCE_EXHAUSTED"),
    (Unimplemented, 501, None, "UNIMPLEMENTED"),
    (errors.QueueFull, 503, 1, "RESOURCE_EXHAUSTED"),
    (NotReady, 503, 5, "UNAVAILABLE"),
    (errors.PoolClosed, 503, 5, "UNAVAILABLE"),
    (errors.PoolBroken, 503, 30, "UNAVAILABLE"),
    (errors.TaskTimeout, 504, None, "DEADLINE_EXCEEDED"),
]
MODEL_ERROR = (500, None, "INTERNAL")  # the model raised, or its output cannot be sent
_OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large",
             501: "unimplemented", 503: "unavailable", 504: "timeout"}


def _row(error: BaseException) -> tuple[int, int | None, str]:
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


def message_of(error: BaseException, debug: bool = False) -> str:
    """What the client is told: the message; with ``debug``, the remote traceback too."""
    if isinstance(error, (ServeError, errors.WorkerpoolError)) and \
            not isinstance(error, errors.RemoteError):
        # Our messages put stacks and tracebacks (with file paths) after the first line.
        text = str(error) if debug else str(error).split("\n", 1)[0]
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if debug:
        cause = error.__cause__
        detail = getattr(cause, "tb", None) or "".join(traceback.format_exception(error))
        text += f"\n{detail}"
    return text
