"""Message kinds on the pool's ROUTER <-> worker DEALER link.

Every message is multipart: ``[kind, meta, *rest]``. ``kind`` is one of the constants below,
``meta`` a msgpack map. The parent's ROUTER sees the worker's identity as an extra first
frame.

    worker -> parent   READY   {pid, credits, secret}   after attaching; worker takes work.
                               The secret (the pool's, handed to the zygote on its private
                               channel) admits it; nothing else from it is read before.
                       RESULT  {ids, parts, compute_s}, (body, *frames) per request
                       ERROR   {ids, type, message, traceback, pickled}  for every id
                       HEARTBEAT {}                     idle this long: the loop is alive
                       BYE     {}                       leaving on purpose (STOP)
    parent -> worker   TASK    {ids, parts}, (body, *frames) per request: a batch; body is
                               the codec-encoded (args, kwargs), parts the frames of each
                       STOP    {}                       finish the current task, then exit
"""

from __future__ import annotations

import msgpack

from ..errors import ProtocolError

READY = b"R"
RESULT = b"D"
ERROR = b"E"
BYE = b"B"
HEARTBEAT = b"H"
TASK = b"T"
STOP = b"S"



def pack_meta(meta: dict) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


MAX_CREDITS = 1024


def unpack_meta(frame) -> dict:
    data = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    try:
        meta = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ProtocolError(f"undecodable message header: {exc}") from exc
    if not isinstance(meta, dict):
        raise ProtocolError(f"message header is not a map: {meta!r}")
    return meta


# How a worker process ends on purpose (any other status is a crash).
EXIT_OK = 0
EXIT_BOOT_ERROR = 70  # could not attach the model or connect to the pool
EXIT_PARENT_GONE = 71  # the pool's process or the zygote died


def check_ready(meta: dict) -> None:
    """A READY's fields are what a worker sends; ProtocolError otherwise."""
    if not isinstance(meta.get("secret"), bytes) or not isinstance(meta.get("pid"), int):
        raise ProtocolError("READY without a secret or a pid")
    credits = meta.get("credits")
    if not isinstance(credits, int) or not 1 <= credits <= MAX_CREDITS:
        raise ProtocolError(f"READY with bad credits {credits!r}")


def reply_ids(meta: dict) -> list[int]:
    """The request ids a RESULT or ERROR answers; ProtocolError if they are not ids."""
    ids = meta.get("ids")
    if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
        raise ProtocolError(f"reply without a list of request ids: {ids!r}")
    return ids


def check_result(meta: dict, n_frames: int) -> None:
    """A RESULT names one part count per id, and the parts add up to its frames."""
    parts = meta.get("parts")
    if not isinstance(parts, list) or len(parts) != len(meta["ids"]) or \
            not all(type(n) is int and n >= 1 for n in parts) or sum(parts) != n_frames:
        raise ProtocolError(f"RESULT whose parts {parts!r} do not match its {n_frames} frames")
    compute_s = meta.get("compute_s", 0.0)
    if not isinstance(compute_s, (int, float)):
        raise ProtocolError(f"RESULT with bad compute_s {compute_s!r}")


def check_error(meta: dict) -> None:
    """An ERROR's texts are strings and its pickled exception bytes (or absent)."""
    if not all(isinstance(meta.get(key, ""), str) for key in ("type", "message", "traceback")) \
            or not isinstance(meta.get("pickled") or b"", bytes):
        raise ProtocolError("ERROR with malformed fields")
