"""The pool's link, both ends: message kinds, how a message is laid out, and how it is checked.

Every message is ``[head, *frames]``: ``head`` is one byte naming the kind followed by a
msgpack map (the "meta"); the parent's ROUTER sees the worker's identity as an extra first
frame. A small request is therefore two frames on the parent's side (identity, head): each
frame is one ``send`` and, under load, one chance for another thread to take the GIL.

    worker -> parent   READY     {pid, credits, secret}   after attaching; it takes work. The
                                 secret (the pool's, handed over by the zygote) admits it;
                                 nothing else from it is read before.
                       RESULT    {ids, bodies, parts, compute_s} + frames: one value per id
                       ERROR     {ids, type, message, traceback, pickled}: for every id
                       HEARTBEAT {}   idle this long: the loop is alive
                       BYE       {}   leaving, as told by STOP
                       ITEM      {ids, bodies, parts} + frames: items a stream's generator
                                 yielded, in order (``ids``: the stream's id, once per item)
                       END       {ids, items}   the stream's generator is done (or was
                                 cancelled): ``items`` were sent in all
    parent -> worker   TASK      {ids, bodies, parts, each, coalesce} + frames: several
                                 calls. ``each``: run them one by one (a chunk of unbatchable
                                 calls), each answered when done, or with ``coalesce`` the
                                 answers of fast calls together (one message for many: see
                                 workers/runner.py); else they are one batch, run together.
                                 With ``stream: n`` it is one call whose items stream back
                                 (workers/streaming.py), at most ``n`` before a MORE.
                                 ``tags`` (optional, one per id): the request ids of a
                                 server's requests, which prefix predict's output lines
                       MORE      {id, n}   the stream ``id`` may send ``n`` more items
                       CANCEL    {id}      stop the stream ``id`` (GeneratorExit in predict)
                       STOP      {}   finish the current task, then exit

A call or a value travels as a codec body and its frames (ipc/codec.py). ``bodies[i]`` is the
i-th body inline in the head, or None when it was too large to copy into the head and is the
first of its frames; ``parts[i]`` is how many frames the i-th item takes. They must add up to
the frames the message has: a peer that says otherwise gets ProtocolError, never an
IndexError in the dispatcher's thread.
"""

from __future__ import annotations

import pickle
import traceback

import msgpack
import zmq

from ..errors import ProtocolError, RemoteError, RemoteTraceback

READY = b"R"
RESULT = b"D"
ERROR = b"E"
BYE = b"B"
HEARTBEAT = b"H"
ITEM = b"I"
END = b"N"
TASK = b"T"
MORE = b"M"
CANCEL = b"C"
STOP = b"S"

MAX_CREDITS = 1024
# Bodies up to this size are copied into the head (one frame less); larger ones go as their
# own frame, so a large string or list is not copied once more.
INLINE_BODY_LIMIT = 64 * 1024

# How a worker process ends on purpose (any other status is a crash).
EXIT_OK = 0
EXIT_BOOT_ERROR = 70  # could not attach the model or connect to the pool
EXIT_PARENT_GONE = 71  # the pool's process or the zygote died
EXIT_SERVING_ERROR = 72  # the worker's own loop failed after READY (a bug in workerpool)

_SNDMORE = int(zmq.SNDMORE)
# As plain ints: pyzmq's enums cost a Flag operation per test, several per request.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# Frames below this are copied by libzmq anyway (pyzmq's own threshold): sending them as
# bytes skips making a zmq.Frame for each.
_COPY_BELOW = zmq.COPY_THRESHOLD


def has_message(sock: zmq.Socket) -> bool:
    """A whole message waits on ``sock`` (ZMQ_EVENTS: no wait, no Poller, no zmq.Again).
    Also what a socket polled by its fd must be asked after every send or receive: either
    may consume the edge of the fd's signal."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


# -- heads -----------------------------------------------------------------------------------
def head(kind: bytes, meta: dict) -> bytes:
    return kind + msgpack.packb(meta, use_bin_type=True)


def read_head(frame) -> tuple[bytes, dict]:
    """(kind, meta) of a message's first frame; ProtocolError if it is not one."""
    data = _frame_bytes(frame)
    if not data:
        raise ProtocolError("an empty message head")
    try:
        meta = msgpack.unpackb(memoryview(data)[1:], raw=False)
    except Exception as exc:
        raise ProtocolError(f"undecodable message header: {exc}") from exc
    if not isinstance(meta, dict):
        raise ProtocolError(f"message header is not a map: {meta!r}")
    return data[:1], meta


def send(sock: zmq.Socket, frames: list, flags: int = 0) -> None:
    """Send one multipart message: like ``send_multipart``, without its per-frame flag
    arithmetic and Frame objects for small frames (the dispatcher's hot path)."""
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        more = _SNDMORE if index < last else 0
        if type(frame) is bytes and len(frame) < _COPY_BELOW:
            sock.send(frame, flags | more)
        else:
            sock.send(frame, flags | more, copy=False)


def recv(sock: zmq.Socket, flags: int = 0, copied: int = 1) -> list:
    """One multipart message: its first ``copied`` frames as bytes (identity, head: small),
    the rest as zmq Frames, not copied (arrays)."""
    frames = [sock.recv(flags)]
    while sock.get(zmq.RCVMORE):
        frames.append(sock.recv() if len(frames) < copied else sock.recv(copy=False))
    return frames


# -- items: (body, frames) per call or per value ---------------------------------------------
def pack_items(items: list[tuple[bytes, list]]) -> tuple[list, list, list]:
    """(bodies, parts, frames) for a head and the frames that follow it."""
    bodies, parts, frames = [], [], []
    for body, item_frames in items:
        if len(body) <= INLINE_BODY_LIMIT:
            bodies.append(body)
            parts.append(len(item_frames))
        else:
            bodies.append(None)
            parts.append(1 + len(item_frames))
            frames.append(body)
        frames += item_frames
    return bodies, parts, frames


def split_items(meta: dict, frames: list) -> list[tuple[bytes, list]]:
    """Inverse of :func:`pack_items`, checked against ``ids`` and the frames there are."""
    ids, bodies, parts = meta.get("ids"), meta.get("bodies"), meta.get("parts")
    if not (isinstance(bodies, list) and isinstance(parts, list) and isinstance(ids, list)
            and len(bodies) == len(parts) == len(ids)):
        raise ProtocolError(f"a message whose bodies and parts do not match its {_n(ids)} ids")
    items, start = [], 0
    for body, n_frames in zip(bodies, parts):
        if type(n_frames) is not int or n_frames < (body is None) or \
                not (body is None or isinstance(body, bytes)):
            raise ProtocolError(f"a message with bad parts {parts!r}")
        if start + n_frames > len(frames):  # checked before any frame is indexed
            raise ProtocolError(f"a message whose parts {parts!r} overrun its "
                                f"{len(frames)} frames")
        item_frames = frames[start:start + n_frames]
        start += n_frames
        if body is None:
            body, item_frames = _frame_bytes(item_frames[0]), item_frames[1:]
        items.append((body, item_frames))
    if start != len(frames):
        raise ProtocolError(f"a message whose parts {parts!r} do not match its "
                            f"{len(frames)} frames")
    return items


def _frame_bytes(frame) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _n(ids) -> str:
    return str(len(ids)) if isinstance(ids, list) else "missing"


def task(ids: list[int], items: list[tuple[bytes, list]], each: bool,
         coalesce: bool = False, stream: int | None = None,
         tags: list | None = None) -> list:
    bodies, parts, frames = pack_items(items)
    meta = {"ids": ids, "bodies": bodies, "parts": parts, "each": each, "coalesce": coalesce}
    if stream is not None:
        meta["stream"] = stream
    if tags is not None:
        meta["tags"] = tags
    return [head(TASK, meta), *frames]


def stream_items(request_id: int, items: list[tuple[bytes, list]]) -> list:
    bodies, parts, frames = pack_items(items)
    return [head(ITEM, {"ids": [request_id] * len(items), "bodies": bodies, "parts": parts}),
            *frames]


def stream_end(request_id: int, items: int) -> list:
    return [head(END, {"ids": [request_id], "items": items})]


def stream_more(request_id: int, n: int) -> bytes:
    return head(MORE, {"id": request_id, "n": n})


def stream_cancel(request_id: int) -> bytes:
    return head(CANCEL, {"id": request_id})


def result(ids: list[int], items: list[tuple[bytes, list]], compute_s: float) -> list:
    bodies, parts, frames = pack_items(items)
    return [head(RESULT, {"ids": ids, "bodies": bodies, "parts": parts,
                          "compute_s": compute_s}), *frames]


# -- checks of what a worker says ------------------------------------------------------------
def check_ready(meta: dict) -> None:
    """A READY's fields are what a worker sends; ProtocolError otherwise."""
    if not isinstance(meta.get("secret"), bytes) or not isinstance(meta.get("pid"), int):
        raise ProtocolError("READY without a secret or a pid")
    credits = meta.get("credits")
    if not isinstance(credits, int) or not 1 <= credits <= MAX_CREDITS:
        raise ProtocolError(f"READY with bad credits {credits!r}")


def reply_ids(meta: dict) -> list[int]:
    """The request ids a RESULT, ERROR, ITEM or END answers; ProtocolError if they are not ids."""
    ids = meta.get("ids")
    if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
        raise ProtocolError(f"reply without a list of request ids: {ids!r}")
    return ids


def check_compute_s(meta: dict) -> None:
    if not isinstance(meta.get("compute_s", 0.0), (int, float)):
        raise ProtocolError(f"RESULT with bad compute_s {meta.get('compute_s')!r}")


def check_end(meta: dict) -> None:
    if len(meta["ids"]) != 1 or type(meta.get("items")) is not int:
        raise ProtocolError(f"END with bad fields {meta!r:.200}")


def check_error(meta: dict) -> None:
    """An ERROR's texts are strings and its pickled exception bytes (or absent)."""
    if not all(isinstance(meta.get(key, ""), str) for key in ("type", "message", "traceback")) \
            or not isinstance(meta.get("pickled") or b"", bytes):
        raise ProtocolError("ERROR with malformed fields")


# -- errors: the worker's exception there, rebuilt here --------------------------------------
# An error's message and traceback text are cut to this (and to an eighth of
# max_message_bytes each), so an ERROR always fits in one message.
MAX_ERROR_TEXT = 64 * 1024


def error(ids: list, exc: BaseException, max_bytes: int) -> list:
    """An ERROR message carrying the exception, by value when it pickles (and is an
    Exception: SystemExit or KeyboardInterrupt must never end the caller), always as text.
    The whole message stays well under ``max_bytes``."""
    return [head(ERROR, {"ids": ids, **describe_error(exc, max_bytes)})]


def describe_error(exc: BaseException, max_bytes: int) -> dict:
    """``exc`` as ``rebuild_exception`` takes it: type, message, traceback and, when it
    pickles, the exception itself; under ``max_bytes`` together."""
    text_limit = max(128, min(MAX_ERROR_TEXT, max_bytes // 8))
    message = _safe_str(exc)
    short_message = clip(message, text_limit)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    pickled = None
    if isinstance(exc, Exception):
        pickled = _pickled_exception(exc, max_bytes // 2)
        if pickled is None and short_message != message:
            # Too big to travel whole: the same type with the cut message, if it has the
            # usual one-argument constructor.
            pickled = _pickled_exception(_same_type(exc, short_message), max_bytes // 2)
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": short_message,
        "traceback": clip(tb, text_limit),
        "pickled": pickled,
    }


def clip(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and a note saying how much was cut."""
    if len(text) <= limit:
        return text
    return (text[:limit] + f"... [{len(text) - limit} more characters cut: the error was "
            "too large to send whole]")


def _pickled_exception(exc: BaseException | None, limit: int) -> bytes | None:
    if exc is None:
        return None
    try:
        pickled = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(pickled)  # an exception that pickles but cannot be rebuilt is no use
    except Exception:
        return None
    return pickled if len(pickled) <= limit else None


def _same_type(exc: BaseException, message: str) -> BaseException | None:
    try:
        return type(exc)(message)
    except Exception:
        return None


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


_NOT_EXCEPTIONS = {"SystemExit", "KeyboardInterrupt", "GeneratorExit"}


def rebuild_exception(meta: dict, raised_by: str = "predict") -> Exception:
    """The worker's exception, by value where possible, with its traceback as __cause__.

    Never SystemExit, KeyboardInterrupt or GeneratorExit: raised in the caller, a model's
    ``sys.exit()`` would end the serving process; those arrive as RemoteError."""
    exc = None
    if meta.get("pickled"):
        try:
            exc = pickle.loads(meta["pickled"])
        except Exception:
            exc = None
    if not isinstance(exc, Exception):
        remote_type = str(meta.get("type", "Exception"))
        message = str(meta.get("message", ""))
        name = remote_type.rsplit(".", 1)[-1]
        if name in _NOT_EXCEPTIONS:
            message = f"{message} ({raised_by} raised {name})"
            if raised_by == "predict":
                message = message[:-1] + "; it ended no process: the worker is still serving)"
        exc = RemoteError(remote_type, message)
    exc.__cause__ = RemoteTraceback(meta.get("traceback", ""))
    return exc
