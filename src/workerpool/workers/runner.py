"""One task in a worker: decode, collate, call ``predict`` once, split, encode.

A TASK carries one request or a batch of compatible ones (the dispatcher chose them: one
array each, same dtype and trailing shape). A batch is concatenated along axis 0, ``predict``
runs once, and its output (an array, or a tuple/list/dict of arrays, batch on axis 0) is cut
back into one result per request. Nothing raised by ``predict`` escapes: it becomes an ERROR
for every request of the task and the worker goes on serving. Only a fatal signal or
``os._exit`` ends the process, and the supervisor sees that.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import time
import traceback

from ..errors import BatchShapeError, EncodeError
from ..ipc import protocol
from ..ipc.codec import Codec


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
            return error_reply(ids, exc)
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
            return error_reply(ids, exc)
        meta = {"ids": ids, "parts": parts, "compute_s": compute_s}
        return [protocol.RESULT, protocol.pack_meta(meta), *out_frames]

    def decode_calls(self, parts: list[int], frames: list) -> list[tuple[tuple, dict]]:
        calls, start = [], 0
        for n_parts in parts:
            body, value_frames = frames[start], frames[start + 1:start + n_parts]
            calls.append(self.codec.decode(body.bytes, value_frames))
            start += n_parts
        return calls


def concatenate(inputs: list):
    """One batch along axis 0 from the requests' arrays (all numpy or all torch)."""
    torch = sys.modules.get("torch")
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


def error_reply(ids: list, exc: BaseException) -> list:
    """An ERROR message carrying the exception, by value when it pickles, always as text."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickled = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(pickled)  # an exception that pickles but cannot be rebuilt is no use
    except Exception:
        pickled = None
    meta = {
        "ids": ids,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": _safe_str(exc),
        "traceback": tb,
        "pickled": pickled,
    }
    return [protocol.ERROR, protocol.pack_meta(meta)]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _inference_mode():
    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()
