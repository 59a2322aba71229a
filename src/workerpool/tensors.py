"""Tensor conventions every front end shares: what predict gets, how its result is named.

    named inputs {name: array}  ──call_argument──> predict(model, x)   (one input: the array;
                                                                        several: the dict)
    predict's result ──output_items──> [(name, value)]: a dict by its keys; a tuple/list of
                                       arrays as output_0..k (or the names given); anything
                                       else as one output
                     ──name_outputs──> {name: ndarray} (``as_tensor`` each: BYTES as object
                                       arrays of bytes), raising OutputEncodeError for what
                                       no protocol can send
    {name: ndarray} ──select_outputs──> the ones a request asked for, in its order

and the conversions the protocol decoders share (``nest`` for BYTES tensors, ``narrowed``
for integers a protocol carries wider). Used by ``workerpool serve`` (every protocol), the
Ray Serve deployment and ``workerpool score`` (output columns).
"""

from __future__ import annotations

import struct

import numpy as np

from .errors import OutputEncodeError

_LENGTH = struct.Struct("<I")


def call_argument(inputs):
    """What predict gets for named inputs: the one array, or a dict of them by name."""
    if isinstance(inputs, dict) and len(inputs) == 1:
        return next(iter(inputs.values()))
    return inputs


def output_items(result, names: list[str] | None = None,
                 single: str = "output_0") -> list[tuple[str, object]]:
    """predict's result as ``(name, value)`` pairs: a dict by its keys (strings only); a
    tuple/list of arrays as ``output_0..k`` (or ``names`` when there are as many); anything
    else as one output named ``names[0]`` or ``single``."""
    if result is None:
        raise OutputEncodeError(
            "predict returned None; return an array, a list or tuple of arrays, or a dict "
            "of arrays by output name")
    if isinstance(result, dict):
        unnamed = [key for key in result if not isinstance(key, str)]
        if unnamed:
            shown = repr(unnamed[:10])
            raise OutputEncodeError(
                f"predict returned a dict whose keys {shown[:200]} are not strings; name "
                "each output with a string")
        return list(result.items())
    if type(result) in (tuple, list) and result and all(hasattr(v, "shape") for v in result):
        values = list(result)
    else:
        values = [result]
    if names is None or len(names) != len(values):
        names = [single] if len(values) == 1 else [f"output_{i}" for i in range(len(values))]
    return list(zip(names, values))


def name_outputs(result, names: list[str] | None = None,
                 keep: type | None = None) -> dict[str, np.ndarray]:
    """predict's result as named tensors (see ``output_items``); OutputEncodeError when a
    value is no tensor a protocol can carry. Values of type ``keep`` stay as they are (an
    output a worker wrote into shared memory)."""
    try:
        return {name: value if keep is not None and type(value) is keep
                else as_tensor(name, value) for name, value in output_items(result, names)}
    except ValueError as exc:
        raise OutputEncodeError(str(exc)) from None


def select_outputs(outputs: dict, wanted: list[str] | None, model: str = "the model") -> dict:
    """The outputs a request asked for, in its order (all, in the model's order, when it
    named none); an unknown name is a ValueError listing the model's outputs."""
    if not wanted:
        return outputs
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise ValueError(f"{model} has no outputs {unknown}; it has {sorted(outputs)}")
    return {name: outputs[name] for name in wanted}


def as_tensor(name: str, value) -> np.ndarray:
    """A predict output as an array; lists of str/bytes become a BYTES (object) array."""
    if isinstance(value, np.ndarray) and value.dtype.kind != "O":
        return value
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise ValueError(f"output {name!r} is not a rectangular tensor: {exc}") from None
    if array.dtype.kind in "SUO":
        flat = array.reshape(-1).tolist()
        texts = [isinstance(v, (str, bytes)) for v in flat]
        if not all(texts):
            other = type(flat[texts.index(False)]).__name__
            raise ValueError(f"output {name!r} mixes strings with {other} values" if any(texts)
                             else f"output {name!r} is not a tensor: it holds {other} values")
        return np.array([v.encode() if isinstance(v, str) else v for v in flat],
                        dtype=object).reshape(array.shape)
    return array


def bytes_tensor(items: list, shape: list) -> np.ndarray:
    """A BYTES tensor as predict gets it: a numpy object array of bytes, of ``shape`` (how
    Triton's clients and Python backend hold one)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def serialized_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor as Triton lays it out in binary data and shared memory: each
    element's length (u32, little-endian), then its bytes, element after element."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in array.reshape(-1).tolist())


def split_serialized_bytes(data, count: int) -> list[bytes]:
    """The ``count`` elements of a BYTES tensor laid out as :func:`serialized_bytes`
    writes it; ValueError saying what does not add up."""
    items, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ValueError("a BYTES element's length is cut off")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise ValueError("a BYTES element runs past its data")
        items.append(bytes(data[offset:offset + length]))
        offset += length
    if len(items) != count:
        raise ValueError(f"shape needs {count} BYTES elements, got {len(items)}")
    return items


def nest(items: list, shape: list):
    """A flat list as nested lists of ``shape`` (BYTES tensors: lists of bytes)."""
    for size in reversed(shape[1:]):
        items = [items[i:i + size] for i in range(0, len(items), size)] if size else []
    return items


def narrowed(values, dtype: np.dtype) -> np.ndarray | None:
    """Integers a protocol carries in a wider field (int32 on the wire) as ``dtype``; None
    when one does not fit."""
    wide = np.array(values, dtype=np.int64)
    limits = np.iinfo(dtype)
    if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
        return None
    return wide.astype(dtype)
