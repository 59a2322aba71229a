"""Message kinds on the pool's ROUTER <-> worker DEALER link.

Every message is multipart: ``[kind, meta, *rest]``. ``kind`` is one of the constants below,
``meta`` a msgpack map. The parent's ROUTER sees the worker's identity as an extra first
frame.

    worker -> parent   READY   {pid, credits}           after attaching; worker takes work
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
