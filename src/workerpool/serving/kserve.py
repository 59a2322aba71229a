"""KServe Open Inference Protocol v2 over HTTP, the codec: JSON tensors and Triton's binary
extension (used by ``workerpool serve`` and the Ray Serve deployment).

    request body = JSON header [+ raw tensor bytes]      (Inference-Header-Content-Length:
                                                          the JSON's length when bytes follow)
      inputs[i]: name, shape, datatype, and either data (flat or nested) or
                 parameters.binary_data_size (its bytes follow the header, in input order)
      outputs[j]: name, parameters.binary_data ; parameters.binary_data_output: all binary
      either, in Triton's system shared memory: parameters.shared_memory_region,
                 shared_memory_byte_size, shared_memory_offset (serving/shared_memory.py)
    -> InferRequest(inputs: {name: ndarray (BYTES: an object array of bytes)}, outputs, ...)
    -> the data plane -> {name: ndarray}, selected and ordered
    -> response body = JSON header [+ raw output bytes], the same way back

Binary inputs become numpy views of the request body (no copy); the pool sends them to a
worker as they are. BYTES elements travel as 4-byte little-endian lengths plus the bytes in
binary, as strings in JSON; ``predict`` gets them as (nested) lists of ``bytes``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from ..errors import OutputEncodeError
from ..ipc.regions import PlacedOutput
from ..signature import DATATYPES, datatype_of
from ..tensors import bytes_tensor, serialized_bytes, split_serialized_bytes
from . import jsontext
from .errors import BadRequest
from .limits import MAX_RANK, check_shape, parse_json
from .shared_memory import SharedUse, shared_input, shared_use

_FLOATS = {"FP16", "FP32", "FP64"}
_NUMBERS = frozenset({int, float})
_SCALARS = frozenset({int, float, str, bool})
_NOT_VALUES = frozenset({dict, type(None)})
# JSON has no NaN or Infinity: responses write them as the protobuf JSON mapping does (strict
# parsers read them; tritonclient's as_numpy turns them back into floats); requests may use
# those strings or the bare tokens Python's json module (and so tritonclient) writes.
NON_FINITE_OUT = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
NON_FINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclasses.dataclass
class RequestedOutput:
    name: str
    binary: bool
    shared: SharedUse | None = None  # written into this region by the worker


@dataclasses.dataclass
class InferRequest:
    id: str | None
    inputs: dict  # name -> ndarray (BYTES: an object array of bytes)
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool  # the default for outputs not named in ``outputs``

    @property
    def output_names(self) -> list[str] | None:
        return [o.name for o in self.outputs] if self.outputs is not None else None

    @property
    def placed(self) -> dict[str, SharedUse] | None:
        """The outputs asked for in shared memory, by name (None: none)."""
        return {o.name: o.shared for o in self.outputs or () if o.shared is not None} or None


def parse_infer(body: bytes, header_length: str | None,
                max_tensor_bytes: int) -> InferRequest:
    """Decode an infer request body; BadRequest says what is wrong with it.
    ``max_tensor_bytes``: the bound of limits.check_shape (--max-request-bytes)."""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not a "
                             "number") from None
        if not 0 < length <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {length} does not fit a body "
                             f"of {len(body)} bytes")
        text = bytes(body[:length]) if length < len(body) else body
        plan = _plans.get((text, max_tensor_bytes)) if length < len(body) else None
        if plan is not None:
            request = plan.request(memoryview(body)[length:])
            if request is not None:
                return request
    else:
        length, text = len(body), body
    header = parse_json(text, "the request header")
    if not isinstance(header, dict):
        raise BadRequest("the request header must be a JSON object")
    raw = memoryview(body)[length:]
    request_id = header.get("id")
    parameters = _mapping(header.get("parameters"), "parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    decoded, offset = {}, 0
    for tensor in inputs:
        name, array, used = _decode_input(tensor, raw, offset, max_tensor_bytes)
        if name in decoded:
            raise BadRequest(f"input {name!r} is given twice")
        decoded[name] = array
        offset += used
    if offset != len(raw):
        raise BadRequest(f"the binary inputs declare {offset} bytes in all but "
                         f"{len(raw)} bytes follow the JSON header")
    request = InferRequest(
        id=str(request_id) if request_id is not None else None,
        inputs=decoded, outputs=_requested_outputs(header.get("outputs")),
        binary_output=bool(parameters.get("binary_data_output", False)))
    if raw and length <= _PLANNED_HEADER_BYTES:
        _HeaderPlan.keep(text, max_tensor_bytes, inputs, request)
    return request


# A binary request's JSON header, decoded and checked once, for the requests that send the
# same bytes again (a client sends one header for every request of the same shape): what
# remains per request is cutting the tensors from the bytes that follow. Parsing and
# checking a one-input header was ~4 us of a light model's request.
_PLANNED_HEADER_BYTES = 4096  # (longer headers are parsed each time)
_MAX_PLANS = 256
_plans: dict[tuple[bytes, int], "_HeaderPlan"] = {}


class _HeaderPlan:
    """The inputs (name, datatype, shape, element count, byte size) of a header whose every
    input is binary, and its request's other fields."""

    __slots__ = ("inputs", "size", "id", "outputs", "binary_output")

    def __init__(self, inputs: list, request: InferRequest):
        self.inputs = inputs
        self.size = sum(entry[4] for entry in inputs)
        self.id, self.outputs = request.id, request.outputs
        self.binary_output = request.binary_output

    @classmethod
    def keep(cls, header: bytes, max_tensor_bytes: int, tensors: list,
             request: InferRequest) -> None:
        """Keeps the plan of a header just decoded into ``request``, if it has one: every
        input binary (none in shared memory, none given as JSON data)."""
        inputs = []
        for tensor, (name, array) in zip(tensors, request.inputs.items()):
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is None or not isinstance(array, np.ndarray):
                return
            shape = tensor["shape"]
            inputs.append((name, tensor["datatype"], shape, math.prod(shape), size))
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()  # (clients with ever-new headers: they are parsed as before)
        _plans[header, max_tensor_bytes] = cls(inputs, request)

    def request(self, raw: memoryview) -> InferRequest | None:
        """The request of this header and ``raw``, the bytes after it; None when they are
        not the bytes it declares (then the header is parsed again, and says why)."""
        if len(raw) != self.size:
            return None
        decoded, offset = {}, 0
        for name, datatype, shape, count, size in self.inputs:
            decoded[name] = from_binary(name, datatype, shape, count,
                                        raw[offset:offset + size])
            offset += size
        return InferRequest(self.id, decoded, self.outputs, self.binary_output)


def _mapping(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{what}' must be a JSON object")
    return value


def _decode_input(tensor, raw: memoryview, offset: int, max_tensor_bytes: int):
    if not isinstance(tensor, dict):
        raise BadRequest("each input must be a JSON object")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("an input has no name")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not one of "
                         f"{sorted(DATATYPES)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative ints, got "
                         f"{shape!r}")
    count = check_shape(name, shape, DATATYPES[datatype].itemsize, max_tensor_bytes)
    parameters = _mapping(tensor.get("parameters"), f"input {name!r} parameters")
    use = shared_use(f"input {name!r}", parameters)
    if use is not None:  # its data is in a client's region: the worker reads it there
        return name, shared_input(name, datatype, shape, use), 0
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative int")
        if offset + size > len(raw):
            raise BadRequest(f"input {name!r}: binary_data_size {size} runs past the end of "
                             f"the body ({len(raw) - offset} bytes left)")
        return name, from_binary(name, datatype, shape, count, raw[offset:offset + size]), size
    if "data" not in tensor:
        raise BadRequest(f"input {name!r} has neither data nor parameters.binary_data_size")
    return name, _from_json(name, datatype, shape, count, tensor["data"]), 0


def from_binary(name: str, datatype: str, shape: list, count: int, data: memoryview):
    if datatype == "BYTES":
        try:
            return bytes_tensor(split_serialized_bytes(data, count), shape)
        except ValueError as exc:
            raise BadRequest(f"input {name!r}: {exc}") from None
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: shape {shape} of {datatype} needs "
                         f"{count * dtype.itemsize} bytes, binary_data_size is {len(data)}")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)


def _from_json(name: str, datatype: str, shape: list, count: int, data):
    if not isinstance(data, list):
        data = [data]
    # Type checks on the set of the values' types: C loops (~2 us for 64 values, where an
    # isinstance per value cost ~50 us). A parser makes exact types: bool is not an int here.
    types = set(map(type, data))
    flat = data
    if not types <= _SCALARS:  # nested data (or something no tensor holds: _flatten says what)
        flat, types = _flatten(data, name, types)
    if len(flat) != count:
        raise BadRequest(f"input {name!r}: shape {shape} needs {count} values, data has "
                         f"{len(flat)}")
    if datatype == "BYTES":
        if not types <= {str}:
            raise BadRequest(f"input {name!r}: BYTES data must be strings")
        return bytes_tensor([v.encode() for v in flat], shape)
    if datatype == "BOOL":
        if not types <= {bool}:
            raise BadRequest(f"input {name!r}: BOOL data must be true or false")
    elif not types <= _NUMBERS:
        flat = _with_non_finite(flat) if datatype in _FLOATS else None
        if flat is None:
            raise BadRequest(f"input {name!r}: {datatype} data must be numbers"
                             + (' (or "NaN", "Infinity", "-Infinity")'
                                if datatype in _FLOATS else ""))
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and float in types:
        raise BadRequest(f"input {name!r}: {datatype} data must be integers")
    try:
        array = np.array(flat, dtype=dtype)
    except (OverflowError, ValueError) as exc:
        raise BadRequest(f"input {name!r}: data does not fit {datatype}: {exc}") from None
    return array.reshape(shape)


def _with_non_finite(flat: list) -> list | None:
    """``flat`` with "NaN", "Infinity" and "-Infinity" as floats (how responses write
    them), or None when it holds anything else that is not a number."""
    values = []
    for value in flat:
        if isinstance(value, str):
            value = NON_FINITE_IN.get(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        values.append(value)
    return values


def _flatten(data: list, name: str, types: set) -> tuple[list, set]:
    """Nested lists' values in order, and the set of their types (``types``: those of
    ``data``'s own items). Rectangular nesting goes a level at a time in C
    (itertools.chain; a 256 x 64 body: 0.14 ms where a Python loop per value took 1.8 ms);
    a level mixing lists and values goes value by value, as before."""
    flat, depth = data, 1
    while True:
        if types & _NOT_VALUES or (list in types and types != {list}):
            flat = _flatten_values(data, name)  # (it names the first value no tensor holds)
            return flat, set(map(type, flat))
        if list not in types:
            return flat, types
        if depth >= MAX_RANK:
            raise BadRequest(f"input {name!r}: data is nested deeper than {MAX_RANK} levels")
        flat = list(itertools.chain.from_iterable(flat))
        types = set(map(type, flat))
        depth += 1


def _flatten_values(data: list, name: str) -> list:
    flat, stack = [], [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) >= MAX_RANK:
                    raise BadRequest(f"input {name!r}: data is nested deeper than {MAX_RANK} "
                                     "levels")
                stack.append(iter(value))
                break
            if isinstance(value, dict) or value is None:
                raise BadRequest(f"input {name!r}: data holds a {type(value).__name__}")
            flat.append(value)
        else:
            stack.pop()
    return flat


def _requested_outputs(outputs) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    requested = []
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest("each requested output must be an object with a name")
        what = f"output {output['name']!r}"
        parameters = _mapping(output.get("parameters"), f"{what} parameters")
        requested.append(RequestedOutput(output["name"], parameters.get("binary_data"),
                                         shared_use(what, parameters)))
    return requested


# -- responses -------------------------------------------------------------------------
def encode_response(model: str, version: str, request: InferRequest,
                    outputs: dict[str, np.ndarray]) -> tuple[list, list[tuple[bytes, bytes]]]:
    """The response body, as the parts to send one after the other, and its headers as
    (name, value) bytes (Inference-Header-Content-Length when binary outputs follow the
    JSON), for ``outputs`` as the data plane selected and ordered them. Large binary outputs
    stay views of their arrays (a 256 MiB output copied twice cost the server 0.4 s a call
    here); a small body is one part. OutputEncodeError when an output cannot be written
    (a dtype with no KServe datatype, bytes that are not UTF-8 asked for as JSON)."""
    binary_of = {o.name: o.binary for o in request.outputs} if request.outputs else {}
    tensors, buffers = [], []
    try:
        for name, array in outputs.items():
            if type(array) is PlacedOutput:  # written into the client's region
                tensors.append(placed_json(name, array, request.placed[name]))
                continue
            binary = binary_of.get(name)
            if binary is None:
                binary = request.binary_output
            datatype = datatype_of(array.dtype)
            tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            if binary:
                data = buffer_of(array, datatype)
                tensor["parameters"] = {"binary_data_size": len(data)}
                buffers.append(data)
            else:
                tensor["data"] = _json_data(name, array, datatype)
            tensors.append(tensor)
    except ValueError as exc:
        raise OutputEncodeError(f"the model's output cannot be sent: {exc}") from None
    header = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        header["id"] = request.id
    header_bytes = jsontext.dumps(header)  # outputs' NaN and infinities already spelt out
    if not buffers:
        return [header_bytes], JSON_HEADERS
    parts = [header_bytes, *buffers]
    if sum(map(len, buffers)) < SEPARATE_PARTS_FROM:
        parts = [b"".join(parts)]
    return parts, [(b"content-type", b"application/octet-stream"),
                   (b"inference-header-content-length", b"%d" % len(header_bytes))]


JSON_HEADERS = [(b"content-type", b"application/json")]  # (read, never changed)


# Binary outputs from this size on are sent as views of their arrays, each its own write;
# below it one joined body costs less than a write per part.
SEPARATE_PARTS_FROM = 64 * 1024


def placed_json(name: str, placed: PlacedOutput, use: SharedUse) -> dict:
    """An output the worker wrote into shared memory: its description, and where."""
    parameters = {"shared_memory_region": use.region,
                  "shared_memory_byte_size": placed.nbytes}
    if use.offset:
        parameters["shared_memory_offset"] = use.offset
    return {"name": name, "datatype": placed.datatype, "shape": list(placed.shape),
            "parameters": parameters}


def buffer_of(array: np.ndarray, datatype: str):
    """:func:`bytes_of`, but a numeric tensor already little-endian and contiguous (the
    usual case) is a view of its array, not a copy."""
    if datatype != "BYTES" and array.dtype.byteorder in "<=|" and array.flags.c_contiguous:
        return memoryview(array).cast("B")
    return bytes_of(array, datatype)


def bytes_of(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialized_bytes(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).tobytes()


def _json_data(name: str, array: np.ndarray, datatype: str) -> list:
    flat = array.reshape(-1).tolist()
    if datatype in _FLOATS:
        if not np.isfinite(array).all():  # strict JSON has no NaN or Infinity
            return [NON_FINITE_OUT.get(str(v), v) if not math.isfinite(v) else v
                    for v in flat]
        return flat
    if datatype != "BYTES":
        return flat
    try:
        return [item.decode() for item in flat]
    except UnicodeDecodeError:
        raise ValueError(f"output {name!r} holds bytes that are not UTF-8; ask for it as "
                         "binary data") from None
