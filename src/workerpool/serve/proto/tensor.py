"""TensorFlow's ``TensorProto`` to numpy and back, with numpy only (TensorFlow never imported).

    TensorProto{dtype, tensor_shape, tensor_content | float_val | int_val | string_val ...}
        -> to_array() -> ndarray (DT_STRING: nested lists of bytes, as every protocol gives
                                  BYTES tensors to predict)
    ndarray -> from_array() -> TensorProto (numbers as tensor_content, strings as string_val)

Both forms a client may send are read: ``tensor_content`` (what ``tf.make_tensor_proto``
writes for a numpy array: raw little-endian bytes) and the typed repeated fields, where, as
in TensorFlow's own ``make_ndarray``, a single value fills the whole shape.
"""

from __future__ import annotations

import numpy as np

from ...serving.errors import BadRequest
from ...serving.limits import check_fill, check_shape, narrow
from ...tensors import nest
from . import protocol

# TensorFlow dtype name -> (numpy dtype, the TensorProto field of its typed values)
_BY_NAME = {
    "DT_FLOAT": (np.dtype(np.float32), "float_val"),
    "DT_DOUBLE": (np.dtype(np.float64), "double_val"),
    "DT_HALF": (np.dtype(np.float16), "half_val"),  # the bits of each value, in an int32
    "DT_INT8": (np.dtype(np.int8), "int_val"),
    "DT_INT16": (np.dtype(np.int16), "int_val"),
    "DT_INT32": (np.dtype(np.int32), "int_val"),
    "DT_INT64": (np.dtype(np.int64), "int64_val"),
    "DT_UINT8": (np.dtype(np.uint8), "int_val"),
    "DT_UINT16": (np.dtype(np.uint16), "int_val"),
    "DT_UINT32": (np.dtype(np.uint32), "uint32_val"),
    "DT_UINT64": (np.dtype(np.uint64), "uint64_val"),
    "DT_BOOL": (np.dtype(bool), "bool_val"),
    "DT_STRING": (np.dtype(object), "string_val"),
}

class _Types:
    """The DataType enum's numbers, from the compiled descriptors."""

    def __init__(self):
        self.number = protocol("tf_serving").enum_values("tensorflow.DataType")
        self.name = {number: name for name, number in self.number.items()}
        self.by_number = {self.number[name]: spec for name, spec in _BY_NAME.items()}
        self.of_dtype = {dtype: self.number[name] for name, (dtype, _) in _BY_NAME.items()
                         if name != "DT_STRING"}


_types: _Types | None = None


def types() -> _Types:
    global _types
    if _types is None:
        _types = _Types()
    return _types


def to_array(name: str, tensor, max_tensor_bytes: int):
    """A request's TensorProto as what predict gets; BadRequest says what is wrong.
    ``max_tensor_bytes`` bounds the shape (limits.check_shape) and what one sent value may
    fill (limits.check_fill), before anything is allocated."""
    known = types()
    spec = known.by_number.get(tensor.dtype)
    if spec is None:
        raise BadRequest(f"input {name!r}: dtype {known.name.get(tensor.dtype, tensor.dtype)} "
                         f"is not supported; use one of {sorted(_BY_NAME)}")
    dtype, field = spec
    if tensor.tensor_shape.unknown_rank:
        raise BadRequest(f"input {name!r}: the tensor's shape is unknown; give its dims")
    shape = [dim.size for dim in tensor.tensor_shape.dim]
    if any(size < 0 for size in shape):
        raise BadRequest(f"input {name!r}: shape {shape} has a negative dimension")
    count = check_shape(name, shape, dtype.itemsize, max_tensor_bytes)
    if dtype.kind == "O":
        items = tensor.string_val
        if len(items) == 1 and count != 1:
            check_fill(name, shape, count, None, max_tensor_bytes)
        return nest(_filled(name, list(items), count, shape), shape)
    if tensor.tensor_content:
        content = tensor.tensor_content
        if len(content) != count * dtype.itemsize:
            raise BadRequest(f"input {name!r}: shape {shape} of {known.name[tensor.dtype]} "
                             f"needs {count * dtype.itemsize} bytes of tensor_content, got "
                             f"{len(content)}")
        return np.frombuffer(content, dtype=dtype.newbyteorder("<")).reshape(shape)
    values = getattr(tensor, field)
    if len(values) == 1 and count != 1:
        check_fill(name, shape, count, dtype.itemsize, max_tensor_bytes)
    if field == "half_val":
        array = narrow(name, values, np.dtype(np.uint16), "uint16").view(np.float16)
    elif field == "int_val" and dtype != np.int32:
        array = narrow(name, values, dtype, dtype.name)
    else:
        array = np.array(values, dtype=dtype)
    if array.size == count:
        return array.reshape(shape)
    if array.size == 1:
        return np.full(shape, array[0], dtype=dtype)
    raise BadRequest(f"input {name!r}: shape {shape} needs {count} values, {field} has "
                     f"{array.size}")


def _filled(name: str, items: list, count: int, shape: list) -> list:
    if len(items) == count:
        return items
    if len(items) == 1:
        return items * count
    raise BadRequest(f"input {name!r}: shape {shape} needs {count} strings, string_val "
                     f"has {len(items)}")


def from_array(array: np.ndarray, tensor) -> None:
    """Fill the (empty) TensorProto ``tensor`` with an output array (from ``as_tensor``:
    numbers, or an object array of bytes)."""
    known = types()
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    if array.dtype.kind == "O":
        tensor.dtype = known.number["DT_STRING"]
        tensor.string_val.extend(array.reshape(-1).tolist())
        return
    number = known.of_dtype.get(array.dtype.newbyteorder("="))
    if number is None:
        raise ValueError(f"an output of dtype {array.dtype} has no TensorFlow dtype")
    tensor.dtype = number
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    tensor.tensor_content = np.ascontiguousarray(little).tobytes()
