"""TensorFlow Serving's REST API, on the HTTP port beside KServe v2.

    POST /v1/models/{m}[/versions/{v} | /labels/{l}]:predict
         {"signature_name"?, "instances": [row, ...]}  -> {"predictions": [row, ...]}
             row: a value (one input) or {"input name": value, ...}
         {"signature_name"?, "inputs": value | {"input name": value}}
                                                       -> {"outputs": value | {name: value}}
    GET  /v1/models/{m}[/versions/{v}]                 -> {"model_version_status": [...]}
    GET  /v1/models/{m}[/versions/{v}]/metadata        -> {"model_spec", "metadata":
                                                           {"signature_def": ...}}

Strings may be sent as {"b64": "..."}; string outputs come back as text, or as {"b64": ...}
when they are not UTF-8. NaN and infinities are the bare tokens NaN, Infinity and -Infinity
both ways, as TF Serving's own REST API writes and reads them (not strict JSON; its docs
say so). A number's dtype is the input's datatype in the model's signature; where that
is not known, float32 for numbers with a fraction, int64 for integers. Predict is decode
-> the data plane -> encode; status and metadata are serve/tfserving.py's JSON forms.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from ...errors import OutputEncodeError
from ...serving.errors import BadRequest, ModelNotFound, Unimplemented
from ...serving.limits import MAX_RANK, parse_json
from ...signature import DATATYPES
from ..tfserving import metadata_json, status_json
from .exchange import Exchange

PROTOCOL = "tfserving_rest"


def parse_path(parts: list[str]) -> tuple[str, str | None, list[str], str | None]:
    """The path after /v1/models, split -> (model, version label or None, the rest, verb)."""
    rest = list(parts)
    verb = None
    if rest and ":" in rest[-1]:
        rest[-1], verb = rest[-1].rsplit(":", 1)
    if not rest or not rest[0]:
        raise ModelNotFound("a model name is missing after /v1/models/")
    name, rest = rest[0], rest[1:]
    version = None
    if rest[:1] in (["versions"], ["labels"]):
        if len(rest) < 2 or not rest[1]:
            raise ModelNotFound(f"a version is missing after /{rest[0]}/")
        version, rest = rest[1], rest[2:]
    return name, version, rest, verb


async def route(app, exchange: Exchange, parts: list[str]) -> None:
    name, version, rest, verb = parse_path(parts)
    if verb is not None:
        if rest:
            raise ModelNotFound(f"no route {exchange.method} {exchange.path}")
        if verb in ("classify", "regress"):
            raise Unimplemented(f":{verb} is not offered; use :predict")
        if verb != "predict":
            raise ModelNotFound(f"no method :{verb}; use :predict")
        exchange.expect("POST")
        await predict(app, exchange, name, version)
        return
    exchange.expect("GET")
    if rest == []:
        models = [app.plane.model(name, version)] if version is not None else \
            app.plane.versions(name)
        await exchange.json(200, status_json(models))
    elif rest == ["metadata"]:
        await exchange.json(200, metadata_json(app.plane.model(name, version)))
    else:
        raise ModelNotFound(f"no route {exchange.method} {exchange.path}")


async def predict(app, exchange: Exchange, name: str, version: str | None) -> None:
    with app.plane.inference(name, version, PROTOCOL, exchange.started) as call:
        request = parse_json(await exchange.body(app.max_request_bytes))
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        signature = request.get("signature_name", "")
        if not isinstance(signature, str):
            raise BadRequest(f"'signature_name' must be a string, got {signature!r}")
        specs = {spec.name: spec for spec in call.signature(signature).inputs or ()}
        if ("instances" in request) == ("inputs" in request):
            raise BadRequest("give either 'instances' (row format) or 'inputs' (columnar)")
        rows = "instances" in request
        if rows:
            inputs = _from_rows(call.model.name, request["instances"], specs)
        else:
            inputs = _from_columns(call.model.name, request["inputs"], specs)
        outputs = await call.run(inputs, signature=signature)
        await exchange.json(200, encode(outputs, rows))


def encode(outputs: dict[str, np.ndarray], rows: bool) -> dict:
    """The answer: ``predictions`` (row format) or ``outputs`` (columnar)."""
    try:
        if rows:
            return {"predictions": _as_rows(outputs)}
        if len(outputs) == 1:
            return {"outputs": _json_value(next(iter(outputs.values())))}
        return {"outputs": {key: _json_value(value) for key, value in outputs.items()}}
    except ValueError as exc:
        raise OutputEncodeError(f"the model's output cannot be sent: {exc}") from None


def _from_rows(model: str, instances, specs: dict) -> dict:
    if not isinstance(instances, list) or not instances:
        raise BadRequest("'instances' must be a non-empty list of rows")
    named = [isinstance(row, dict) and not _is_b64(row) for row in instances]
    if all(named):
        names = list(instances[0])
        if any(sorted(row) != sorted(names) for row in instances):
            raise BadRequest("every row of 'instances' must name the same inputs")
        return {key: _array(key, [row[key] for row in instances], specs.get(key))
                for key in names}
    if any(named):
        raise BadRequest("'instances' mixes named rows (objects) with bare values")
    key = _unnamed_input(model, specs)
    return {key: _array(key, instances, specs.get(key))}


def _from_columns(model: str, inputs, specs: dict) -> dict:
    if isinstance(inputs, dict) and not _is_b64(inputs):
        if not inputs:
            raise BadRequest("'inputs' names no input")
        return {key: _array(key, value, specs.get(key)) for key, value in inputs.items()}
    key = _unnamed_input(model, specs)
    return {key: _array(key, inputs, specs.get(key))}


def _unnamed_input(model: str, specs: dict) -> str:
    if len(specs) > 1:
        raise BadRequest(f"model {model} takes inputs {sorted(specs)}; name each one")
    return next(iter(specs), "input")


def _is_b64(value) -> bool:
    return isinstance(value, dict) and list(value) == ["b64"]


def _decoded(value, depth: int = 0):
    """JSON data with {"b64": ...} objects as bytes; nested at most MAX_RANK deep (600
    levels of valid JSON once ran this recursion out of stack: a 500)."""
    if isinstance(value, list):
        if depth >= MAX_RANK:
            raise BadRequest(f"an input value is nested deeper than {MAX_RANK} levels")
        return [_decoded(item, depth + 1) for item in value]
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError):
            raise BadRequest("a {\"b64\": ...} value is not base64") from None
    if isinstance(value, dict) or value is None:
        raise BadRequest(f"an input value is a {type(value).__name__}")
    return value


def _array(name: str, value, spec):
    data = _decoded(value)
    leaves = np.array(data, dtype=object)
    if leaves.dtype == object and any(isinstance(v, list) for v in leaves.reshape(-1)):
        raise BadRequest(f"input {name!r}: rows of different lengths")
    flat = leaves.reshape(-1).tolist()
    texts = [isinstance(v, (str, bytes)) for v in flat]
    datatype = spec.datatype if spec is not None else None
    if datatype == "BYTES" or (datatype is None and flat and all(texts)):
        if not all(texts):
            raise BadRequest(f"input {name!r}: expected strings")
        items = [v.encode() if isinstance(v, str) else v for v in flat]
        return np.array(items, dtype=object).reshape(leaves.shape).tolist() \
            if leaves.ndim else items[0]
    if any(texts):
        raise BadRequest(f"input {name!r}: strings where numbers are expected")
    if datatype is None:
        if all(isinstance(v, bool) for v in flat) and flat:
            datatype = "BOOL"
        elif all(isinstance(v, int) for v in flat):
            datatype = "INT64"
        else:
            datatype = "FP32"
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(leaves.shape)
    except (OverflowError, ValueError, TypeError) as exc:
        raise BadRequest(f"input {name!r}: data does not fit {datatype}: {exc}") from None


def _as_rows(arrays: dict[str, np.ndarray]) -> list:
    if len(arrays) == 1:
        return _json_value(next(iter(arrays.values())))
    sizes = {array.shape[0] if array.ndim else None for array in arrays.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("the outputs do not share a batch size, so they cannot be given "
                         "as rows; send the columnar 'inputs' format")
    columns = {key: _json_value(array) for key, array in arrays.items()}
    return [{key: column[i] for key, column in columns.items()} for i in range(sizes.pop())]


def _json_value(array: np.ndarray):
    if array.dtype.kind != "O":
        return array.tolist()
    return np.array([_text(item) for item in array.reshape(-1).tolist()],
                    dtype=object).reshape(array.shape).tolist()


def _text(item: bytes):
    try:
        return item.decode()
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(item).decode()}
