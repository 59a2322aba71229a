"""Triton's generate extension, the codec: a flat JSON object in, a flat JSON object out.

    POST .../generate         {"text_input": "Once", "max_tokens": 20, "parameters": {...}}
    POST .../generate_stream   the same; answered as server-sent events
    answer (each item)        {"model_name": ..., "model_version": ..., "text_output": "x"}

Inputs are the body's top-level keys (all but ``parameters`` and ``id``), by name, as
Triton maps them: a scalar is a tensor of one element, a list a tensor of its shape; the
datatype and rank are the model's declared input's when it declares one (a scalar given
for a ``[1]`` input), else inferred (str: BYTES, bool: BOOL, int: INT64, float: FP32).
Outputs come back by name: a tensor of one element as a scalar, others as nested lists,
BYTES as text.
"""

from __future__ import annotations

import json

import numpy as np

from ..signature import Signature, datatype_of
from ..tensors import nest
from .errors import BadRequest
from .kserve import _from_json, _json_data
from .limits import check_shape, parse_json

RESERVED = ("parameters", "id")


def parse_generate(body: bytes, signature: Signature, max_tensor_bytes: int) -> dict:
    """The inputs by name of a generate request's body; BadRequest says what is wrong."""
    request = parse_json(body)
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object of inputs by name, e.g. "
                         '{"text_input": "Once upon", "max_tokens": 20}')
    declared = {spec.name: spec for spec in signature.inputs or ()}
    inputs = {}
    for name, value in request.items():
        if name in RESERVED:
            continue
        if isinstance(value, (dict, type(None))):
            raise BadRequest(f"input {name!r} must be a value or a list of values, got "
                             f"{type(value).__name__}")
        spec = declared.get(name)
        shape = list(np.shape(value)) if isinstance(value, list) else [1]
        if spec is not None and len(spec.shape) > len(shape):
            shape = [1] * (len(spec.shape) - len(shape)) + shape
        datatype = spec.datatype if spec is not None else _datatype_of(name, value)
        count = check_shape(name, shape, 8, max_tensor_bytes)
        inputs[name] = _from_json(name, datatype, shape, count, value)
    if not inputs:
        raise BadRequest("the body names no inputs; give each input as a top-level key"
                         + (f": this model takes {sorted(declared)}" if declared else ""))
    return inputs


def _datatype_of(name: str, value) -> str:
    first = value
    while isinstance(first, list):
        if not first:
            raise BadRequest(f"input {name!r} is an empty list; its datatype cannot be told")
        first = first[0]
    for kind, datatype in ((bool, "BOOL"), (int, "INT64"), (float, "FP32"), (str, "BYTES")):
        if isinstance(first, kind):
            return datatype
    raise BadRequest(f"input {name!r}: values must be numbers, booleans or strings")


def item_json(model_name: str, model_version: str, outputs: dict[str, np.ndarray]) -> dict:
    """One answer (or one item of a stream) as Triton's generate extension writes it."""
    answer = {"model_name": model_name, "model_version": model_version}
    for name, array in outputs.items():
        if name in answer:
            raise ValueError(f"an output named {name!r} cannot be told from the answer's "
                             "own field; rename it")
        data = _json_data(name, array, datatype_of(array.dtype))
        answer[name] = data[0] if array.size == 1 else nest(data, list(array.shape))
    return answer


def event(payload: dict) -> bytes:
    """One server-sent event carrying ``payload``."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
