"""What goes wrong in a server, and the one table mapping errors to protocol statuses.

Every protocol front end (HTTP today) asks :func:`status_of` and answers ``{"error": ...}``
with that status; nothing else decides a status. A model's own exception is a 500 with its
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


# (error type, HTTP status, seconds to put in Retry-After or None), first match wins.
STATUS_TABLE = [
    (BadRequest, 400, None),
    (errors.MessageTooLarge, 413, None),
    (errors.EncodeError, 400, None),
    (Unauthorized, 401, None),
    (ModelNotFound, 404, None),
    (MethodNotAllowed, 405, None),
    (RequestTooLarge, 413, None),
    (errors.QueueFull, 503, 1),
    (NotReady, 503, 5),
    (errors.PoolClosed, 503, 5),
    (errors.PoolBroken, 503, 30),
    (errors.TaskTimeout, 504, None),
]
MODEL_ERROR_STATUS = 500


def status_of(error: BaseException) -> tuple[int, int | None]:
    """(HTTP status, Retry-After seconds or None) for an error."""
    for kind, status, retry_after in STATUS_TABLE:
        if isinstance(error, kind):
            return status, retry_after
    return MODEL_ERROR_STATUS, None


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
