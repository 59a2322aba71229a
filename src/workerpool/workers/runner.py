"""One task in a worker: decode, collate, call ``predict``, split, encode.

A TASK carries one request, a chunk of calls run one by one (each answered as it is done),
or a batch of compatible requests (the dispatcher chose them: one array each, same dtype and
trailing shape). A batch is concatenated along axis 0, ``predict`` runs once, and its output
(an array, or a tuple/list/dict of arrays, batch on axis 0) is cut back into one result per
request. Nothing raised by ``predict`` escapes: it becomes an ERROR for the call (for every
request of a batch) and the worker goes on serving (SystemExit and
KeyboardInterrupt included: they end no process, and reach the caller as RemoteError). Only a
fatal signal or ``os._exit`` ends the process, and the supervisor sees that. Every reply fits
in ``max_message_bytes``: an error's text is cut to fit, and a batch whose results together
exceed it is answered with MessageTooLarge.
"""

from __future__ import annotations

import contextlib
import time

from ..errors import BatchShapeError, EncodeError, MessageTooLarge
from ..ipc import wire
from ..ipc.codec import Codec, frame_nbytes
from ..frameworks import imported


class Runner:
    def __init__(self, model, predict, codec: Codec):
        self.model = model
        self.predict = predict
        self.codec = codec

    def run(self, meta: dict, frames: list):
        """The replies (RESULT or ERROR messages) to one TASK, each as soon as it is ready:
        one per call for a chunk (``each``: a call's failure is its own), one for a batch."""
        ids = meta.get("ids", [])
        try:
            items = wire.split_items(meta, frames)
        except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
            yield self.error(ids, exc)
            return
        if meta.get("each") or len(items) == 1:
            for request_id, item in zip(ids, items):
                yield self.answer([request_id], lambda: [self.call(*item)])
        else:
            yield self.answer(ids, lambda: self.call_batch(items))

    def call(self, body: bytes, frames: list):
        args, kwargs = self.codec.decode_call(body, frames)
        return self.predict(self.model, *args, **kwargs)

    def call_batch(self, items: list) -> list:
        inputs = [self.codec.decode_call(body, frames)[0][0] for body, frames in items]
        output = self.predict(self.model, concatenate(inputs))
        return split_rows(output, [len(x) for x in inputs])

    def answer(self, ids: list, compute) -> list:
        """RESULT with the values ``compute()`` returns (one per id), or ERROR."""
        started = time.perf_counter()
        try:
            with _inference_mode():
                values = compute()
        except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
            return self.error(ids, exc)
        compute_s = time.perf_counter() - started
        try:
            items = [self.codec.encode(value) for value in values]
        except BaseException as exc:  # noqa: BLE001
            if not isinstance(exc, EncodeError):
                exc = EncodeError(f"cannot encode the output of predict(): {exc!r}")
            return self.error(ids, exc)
        total = sum(len(body) + sum(frame_nbytes(f) for f in value_frames)
                    for body, value_frames in items)
        if total > self.codec.max_message_bytes:
            return self.error(ids, MessageTooLarge(
                f"the results of a batch of {len(values)} requests add up to {total} bytes, "
                f"over max_message_bytes={self.codec.max_message_bytes}; lower "
                "max_batch_size or raise max_message_bytes"))
        return wire.result(ids, items, compute_s)

    def error(self, ids: list, exc: BaseException) -> list:
        return wire.error(ids, exc, self.codec.max_message_bytes)

    def warm_up(self, inputs: list) -> None:
        """``predict`` once on each input, before the worker takes work; raises on failure."""
        for x in inputs:
            try:
                with _inference_mode():
                    self.predict(self.model, x)
            except Exception as exc:
                raise RuntimeError(f"warm-up input {_describe(x)} failed in predict: "
                                   f"{exc!r}") from exc


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


def _inference_mode():
    torch = imported("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()
