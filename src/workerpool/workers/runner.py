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

import inspect
import time

from ..errors import (BatchShapeError, EncodeError, MessageTooLarge, OutputEncodeError,
                      OutputTooLarge)
from ..ipc import wire
from ..ipc.codec import Codec, frame_nbytes
from ..ipc.regions import PlacedCall
from . import tagged_output
from ..modules import imported, inference_mode


class Runner:
    def __init__(self, model, predict, codec: Codec, clock=time.perf_counter):
        self.model = model
        self.predict = predict
        self.codec = codec
        self.clock = clock

    def run(self, meta: dict, frames: list):
        """The replies (RESULT or ERROR messages) to one TASK, each as soon as it is ready:
        one per call for a chunk (``each``: a call's failure is its own), one for a batch."""
        ids = meta.get("ids", [])
        try:
            items = wire.split_items(meta, frames)
        except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
            yield self.error(ids, exc)
            return
        tags = meta.get("tags")
        if not isinstance(tags, list) or len(tags) != len(items):
            tags = [None] * len(items)
        if meta.get("coalesce") and len(items) > 1:
            yield from self.run_coalesced(ids, items, tags)
        elif meta.get("each") or len(items) == 1:
            for request_id, item, tag in zip(ids, items, tags):
                with tagged_output.serving(tag):
                    reply = self.answer([request_id], lambda: [self.call(*item)])
                yield reply
        else:
            with tagged_output.serving(",".join(sorted({t for t in tags if t})) or None):
                reply = self.answer(ids, lambda: self.call_batch(items))
            yield reply

    def run_coalesced(self, ids: list, items: list, tags: list):
        """A chunk's calls one by one, the answers of fast ones sent together: held until
        one was held FLUSH_AFTER_S, a call took longer than SLOW_CALL_S (slow calls gain
        nothing from company, and their answers must not wait for the next), an error (sent
        alone, after what is held), the size limit, or the chunk's end."""
        held_ids, held_items, held_compute, held_bytes, held_since = [], [], 0.0, 0, 0.0

        def flush():
            reply = wire.result(list(held_ids), list(held_items), held_compute / len(held_ids))
            held_ids.clear()
            held_items.clear()
            return reply

        for position, (request_id, item, tag) in enumerate(zip(ids, items, tags)):
            started = self.clock()
            with tagged_output.serving(tag):
                encoded, compute_s, error = self.outcome(lambda: [self.call(*item)])
            now = self.clock()
            if error is not None:
                if held_ids:
                    yield flush()
                yield self.error([request_id], error)
                continue
            size = _items_nbytes(encoded)
            if held_ids and held_bytes + size > self.codec.max_message_bytes:
                yield flush()
            if not held_ids:
                held_compute, held_bytes, held_since = 0.0, 0, now
            held_ids.append(request_id)
            held_items.extend(encoded)
            held_compute += compute_s
            held_bytes += size
            if position == len(ids) - 1 or now - started > SLOW_CALL_S or \
                    now - held_since > FLUSH_AFTER_S:
                yield flush()

    def call(self, body: bytes, frames: list, stream: bool = False):
        args, kwargs = self.codec.decode_call(body, frames)
        placed = args[0] if len(args) == 1 and type(args[0]) is PlacedCall else None
        if placed is not None:  # outputs go into a client's shared memory
            args = [placed.argument]
        output = self.predict(self.model, *args, **kwargs)
        if not stream and inspect.isgenerator(output):
            output.close()
            raise OutputEncodeError(
                "predict returned a generator: a model that yields is read item by item "
                "with Pool.stream() or Pool.stream_async() (over HTTP: the generate_stream "
                "route; over gRPC: ModelStreamInfer), not with submit()")
        return placed.place(output) if placed is not None and not stream else output

    def call_batch(self, items: list) -> list:
        inputs = [self.codec.decode_call(body, frames)[0][0] for body, frames in items]
        output = self.predict(self.model, concatenate(inputs))
        return split_rows(output, [len(x) for x in inputs])

    def answer(self, ids: list, compute) -> list:
        """RESULT with the values ``compute()`` returns (one per id), or ERROR."""
        items, compute_s, error = self.outcome(compute)
        if error is not None:
            return self.error(ids, error)
        return wire.result(ids, items, compute_s)

    def outcome(self, compute) -> tuple[list, float, BaseException | None]:
        """``(encoded values, compute seconds, None)`` of ``compute()``, or the exception
        that is its answer instead, as ``([], 0.0, exception)``."""
        started = self.clock()
        try:
            with inference_mode():
                values = compute()
        except BaseException as exc:  # noqa: BLE001 - every failure is the caller's answer
            return [], 0.0, exc
        compute_s = self.clock() - started
        try:
            items = [self.codec.encode(value) for value in values]
        except BaseException as exc:  # noqa: BLE001
            return [], 0.0, _output_error(exc)
        total = _items_nbytes(items)
        if total > self.codec.max_message_bytes:
            return [], 0.0, OutputTooLarge(
                f"the results of a batch of {len(values)} requests add up to {total} bytes, "
                f"over max_message_bytes={self.codec.max_message_bytes}; lower "
                "max_batch_size or raise max_message_bytes")
        return items, compute_s, None

    def error(self, ids: list, exc: BaseException) -> list:
        return wire.error(ids, exc, self.codec.max_message_bytes)

    def warm_up(self, inputs: list) -> None:
        """``predict`` once on each input, before the worker takes work; raises on failure."""
        for x in inputs:
            try:
                with inference_mode():
                    output = self.predict(self.model, x)
                    if inspect.isgenerator(output):  # a streaming model: its items too
                        for _ in output:
                            pass
            except Exception as exc:
                raise RuntimeError(f"warm-up input {_describe(x)} failed in predict: "
                                   f"{exc!r}") from exc


# A chunk's fast answers wait at most this long for company (see Runner.run_coalesced).
FLUSH_AFTER_S = 0.001
SLOW_CALL_S = 0.0002


def _output_error(exc: BaseException) -> OutputEncodeError:
    """Why predict's output cannot be sent, as the model's error (not the caller's)."""
    if isinstance(exc, MessageTooLarge):
        return OutputTooLarge(str(exc))
    if isinstance(exc, EncodeError):
        return OutputEncodeError(str(exc))
    return OutputEncodeError(f"cannot encode the output of predict(): {exc!r}")


def _items_nbytes(items: list) -> int:
    return sum(len(body) + sum(frame_nbytes(f) for f in frames) for body, frames in items)


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

