"""One task in a worker: decode, collate, call ``predict`` once, split, encode.

A TASK carries one request or a batch of compatible ones (the dispatcher chose them: one
array each, same dtype and trailing shape). A batch is concatenated along axis 0, ``predict``
runs once, and its output (an array, or a tuple/list/dict of arrays, batch on axis 0) is cut
back into one result per request. Nothing raised by ``predict`` escapes: it becomes an ERROR
for every request of the task and the worker goes on serving (SystemExit and
KeyboardInterrupt included: they end no process, and reach the caller as RemoteError). Only a
fatal signal or ``os._exit`` ends the process, and the supervisor sees that. Every reply fits
in ``max_message_bytes``: an error's text is cut to fit, and a batch whose results together
exceed it is answered with MessageTooLarge.
"""

from __future__ import annotations

import contextlib
import pickle
import time
import traceback

from ..errors import BatchShapeError, EncodeError, MessageTooLarge
from ..ipc import protocol
from ..ipc.codec import Codec, frame_nbytes
from ..frameworks import imported


class Runner:
    def __init__(self, model, predict, codec: Codec):
        self.model = model
        self.predict = predict
        self.codec = codec

    def run(self, meta: dict, frames: list) -> list:
        """Return the reply's frames (RESULT or ERROR) for one TASK."""
        ids = meta.get("ids", [])
        started = time.perf_counter()
        try:
            calls = self.decode_calls(meta.get("parts", []), frames)
            with _inference_mode():
                if len(calls) == 1:
                    args, kwargs = calls[0]
                    values = [self.predict(self.model, *args, **kwargs)]
                else:
                    inputs = [args[0] for args, _ in calls]
                    output = self.predict(self.model, concatenate(inputs))
                    values = split_rows(output, [len(x) for x in inputs])
        except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
            return error_reply(ids, exc, self.codec.max_message_bytes)
        compute_s = time.perf_counter() - started
        parts, out_frames = [], []
        try:
            for value in values:
                header, value_frames = self.codec.encode(value)
                parts.append(1 + len(value_frames))
                out_frames += [header, *value_frames]
        except BaseException as exc:  # noqa: BLE001
            if not isinstance(exc, EncodeError):
                exc = EncodeError(f"cannot encode the output of predict(): {exc!r}")
            return error_reply(ids, exc, self.codec.max_message_bytes)
        total = sum(frame_nbytes(f) for f in out_frames)
        if total > self.codec.max_message_bytes:
            return error_reply(ids, MessageTooLarge(
                f"the results of a batch of {len(values)} requests add up to {total} bytes, "
                f"over max_message_bytes={self.codec.max_message_bytes}; lower "
                "max_batch_size or raise max_message_bytes"), self.codec.max_message_bytes)
        meta = {"ids": ids, "parts": parts, "compute_s": compute_s}
        return [protocol.RESULT, protocol.pack_meta(meta), *out_frames]

    def warm_up(self, inputs: list) -> None:
        """``predict`` once on each input, before the worker takes work; raises on failure."""
        for x in inputs:
            try:
                with _inference_mode():
                    self.predict(self.model, x)
            except Exception as exc:
                raise RuntimeError(f"warm-up input {_describe(x)} failed in predict: "
                                   f"{exc!r}") from exc

    def decode_calls(self, parts: list[int], frames: list) -> list[tuple[tuple, dict]]:
        calls, start = [], 0
        for n_parts in parts:
            body, value_frames = frames[start], frames[start + 1:start + n_parts]
            calls.append(self.codec.decode(body.bytes, value_frames))
            start += n_parts
        return calls


def concatenate(inputs: list):
    """One batch along axis 0 from the requests' arrays (all numpy or all torch)."""
    torch = imported("torch")
    if torch is not None and isinstance(inputs[0], torch.Tensor):
        return torch.cat(inputs)
    import numpy as np

    return np.concatenate(inputs)


def split_rows(output, sizes: list[int]) -> list:
    """Cut a batched output back into one value per request (``sizes`` rows each)."""
    if isinstance(output, dict):
        columns = {key: split_rows(value, sizes) for key, value in output.items()}
        return [{key: column[i] for key, column in columns.items()} for i in range(len(sizes))]
    if type(output) in (tuple, list):
        columns = [split_rows(value, sizes) for value in output]
        return [type(output)(column[i] for column in columns) for i in range(len(sizes))]
    shape = getattr(output, "shape", None)
    if shape is None or len(shape) == 0 or shape[0] != sum(sizes):
        raise BatchShapeError(
            f"predict returned {_describe(output)} for a batch of {sum(sizes)} rows from "
            f"{len(sizes)} requests; a batched pool needs outputs with the batch on axis 0 "
            "(arrays or tensors, or tuples/lists/dicts of them). Pass batched=False (or "
            "max_batch_size=1) for a model that cannot batch")
    pieces, start = [], 0
    for size in sizes:
        pieces.append(output[start:start + size])
        start += size
    return pieces


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None \
        else f"a {type(value).__name__}"


# An error's message and traceback text are cut to this (and to an eighth of
# max_message_bytes each), so an ERROR always fits in one message.
MAX_ERROR_TEXT = 64 * 1024


def error_reply(ids: list, exc: BaseException, max_bytes: int) -> list:
    """An ERROR message carrying the exception, by value when it pickles (and is an
    Exception: SystemExit or KeyboardInterrupt must never end the caller), always as text.
    The whole message stays well under ``max_bytes``."""
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
    meta = {
        "ids": ids,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": short_message,
        "traceback": clip(tb, text_limit),
        "pickled": pickled,
    }
    return [protocol.ERROR, protocol.pack_meta(meta)]


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


def _inference_mode():
    torch = imported("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()
