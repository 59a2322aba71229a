"""KServe v2 binary tensors as serving/kserve.py reads them, and its plans: a header seen
before is not parsed again, but every request still gets its own tensors, and every wrong
one the BadRequest a first reading gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workerpool.serving import kserve
from workerpool.serving.errors import BadRequest
from workerpool.serving.kserve import parse_infer
from workerpool.tensors import serialized_bytes

LIMIT = 1 << 20


def binary_body(arrays: dict, datatypes: dict | None = None, **fields) -> tuple[bytes, str]:
    """A body of ``arrays`` as binary inputs, and its Inference-Header-Content-Length."""
    datatypes = datatypes or {}
    inputs, raw = [], []
    for name, array in arrays.items():
        datatype = datatypes.get(name, "FP32")
        data = serialized_bytes(array) if datatype == "BYTES" else array.tobytes()
        inputs.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                       "parameters": {"binary_data_size": len(data)}})
        raw.append(data)
    header = json.dumps({"inputs": inputs, **fields}).encode()
    return header + b"".join(raw), str(len(header))


@pytest.fixture(autouse=True)
def no_plans():
    kserve._plans.clear()
    yield
    kserve._plans.clear()


def test_a_repeated_header_gets_each_requests_own_tensors():
    rng = np.random.default_rng(0)
    first = {"a": rng.standard_normal((2, 3)).astype(np.float32),
             "b": rng.standard_normal((4,)).astype(np.float32)}
    second = {name: array + 1 for name, array in first.items()}
    body, length = binary_body(first, id="r1", parameters={"binary_data_output": True},
                               outputs=[{"name": "y", "parameters": {"binary_data": False}}])
    again, same_length = binary_body(second, id="r1",
                                     parameters={"binary_data_output": True},
                                     outputs=[{"name": "y",
                                               "parameters": {"binary_data": False}}])
    assert same_length == length and again[:int(length)] == body[:int(length)]
    requests = [parse_infer(body, length, LIMIT), parse_infer(again, length, LIMIT)]
    assert len(kserve._plans) == 1  # the second was read from the plan
    for request, arrays in zip(requests, (first, second)):
        assert list(request.inputs) == ["a", "b"]
        for name, array in arrays.items():
            assert request.inputs[name].dtype == np.float32
            assert np.array_equal(request.inputs[name], array)
        assert request.id == "r1" and request.binary_output is True
        assert [(o.name, o.binary) for o in request.outputs] == [("y", False)]


def test_a_planned_header_followed_by_the_wrong_bytes_is_refused_as_at_first():
    body, length = binary_body({"a": np.ones((2, 3), np.float32)})
    parse_infer(body, length, LIMIT)
    short = body[:-4]
    with pytest.raises(BadRequest) as planned:
        parse_infer(short, length, LIMIT)
    kserve._plans.clear()
    with pytest.raises(BadRequest) as first:
        parse_infer(short, length, LIMIT)
    assert str(planned.value) == str(first.value)
    assert "binary_data_size 24 runs past the end of the body" in str(first.value)


def test_bytes_inputs_are_split_per_request_and_checked_each_time():
    words = np.array([b"ab", b"cde"], dtype=object)
    body, length = binary_body({"s": words}, {"s": "BYTES"})
    assert list(parse_infer(body, length, LIMIT).inputs["s"]) == [b"ab", b"cde"]
    other = np.array([b"xy", b"zzz"], dtype=object)
    again, _ = binary_body({"s": other}, {"s": "BYTES"})
    assert list(parse_infer(again, length, LIMIT).inputs["s"]) == [b"xy", b"zzz"]
    # the same length of bytes, but the first element says it runs past them all
    broken = again[:int(length)] + (99).to_bytes(4, "little") + again[int(length) + 4:]
    with pytest.raises(BadRequest, match="'s'"):
        parse_infer(broken, length, LIMIT)


def test_a_header_planned_under_a_larger_limit_is_refused_under_a_smaller_one():
    # an empty tensor whose other dimension describes 4 MB: what the limit bounds
    body, length = binary_body({"a": np.ones((1, 1), np.float32),
                                "e": np.zeros((0, 10**6), np.float32)})
    parse_infer(body, length, 8 * LIMIT)
    with pytest.raises(BadRequest, match="max-request-bytes"):
        parse_infer(body, length, LIMIT)


def test_headers_with_json_data_or_without_bytes_after_them_are_not_planned():
    header = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1], "data": [1.5]},
        {"name": "b", "datatype": "FP32", "shape": [1],
         "parameters": {"binary_data_size": 4}}]}).encode()
    body = header + np.float32(2.5).tobytes()
    for _ in range(2):
        request = parse_infer(body, str(len(header)), LIMIT)
        assert request.inputs["a"].tolist() == [1.5] and request.inputs["b"].tolist() == [2.5]
    json_only = json.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1],
                                        "data": [1.5]}]}).encode()
    parse_infer(json_only, None, LIMIT)
    parse_infer(json_only, str(len(json_only)), LIMIT)
    assert kserve._plans == {}


def test_plans_are_bounded():
    for rows in range(kserve._MAX_PLANS + 10):
        body, length = binary_body({"a": np.zeros((rows + 1, 2), np.float32)})
        parse_infer(body, length, LIMIT)
        assert len(kserve._plans) <= kserve._MAX_PLANS


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bodies_of_any_buffer_type_are_planned_alike(kind):
    first, length = binary_body({"a": np.arange(4, dtype=np.float32)})
    second, _ = binary_body({"a": np.arange(4, 8, dtype=np.float32)})
    assert parse_infer(kind(first), length, LIMIT).inputs["a"].tolist() == [0, 1, 2, 3]
    assert parse_infer(kind(second), length, LIMIT).inputs["a"].tolist() == [4, 5, 6, 7]
    assert len(kserve._plans) == 1
