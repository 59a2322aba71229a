"""KServe v2 JSON tensors as serving/kserve.py reads them: every datatype's values checked
(by the set of their types, not one by one) and shaped, every wrong value a BadRequest
that names the input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from workerpool.serving.errors import BadRequest
from workerpool.serving import kserve
from workerpool.serving.kserve import parse_infer

LIMIT = 1 << 20


def decoded(datatype: str, shape: list, data):
    body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": shape,
                                   "data": data}]}).encode()
    return parse_infer(body, None, LIMIT).inputs["x"]


@pytest.mark.parametrize("datatype, shape, data, expected", [
    ("FP32", [2, 2], [0.5, -1, 2.25, 3], np.array([[0.5, -1], [2.25, 3]], np.float32)),
    ("FP32", [2, 2], [[0.5, -1], [2.25, 3]], np.array([[0.5, -1], [2.25, 3]], np.float32)),
    ("FP64", [1], 7.5, np.array([7.5])),  # a bare value for a one-element tensor
    ("INT64", [3], [1, -2, 2**40], np.array([1, -2, 2**40], np.int64)),
    ("UINT8", [1, 2], [[0, 255]], np.array([[0, 255]], np.uint8)),
    ("BOOL", [2], [True, False], np.array([True, False])),
    ("FP32", [0], [], np.zeros((0,), np.float32)),
])
def test_values_become_the_array_a_client_means(datatype, shape, data, expected):
    array = decoded(datatype, shape, data)
    assert array.dtype == expected.dtype and np.array_equal(array, expected)


def test_non_finite_floats_are_read_from_their_names():
    array = decoded("FP32", [3], ["NaN", "Infinity", "-Infinity"])
    assert math.isnan(array[0]) and array[1] == math.inf and array[2] == -math.inf


def test_bytes_are_an_object_array_of_the_shape():
    got = decoded("BYTES", [2, 1], ["a", "é"])
    assert got.dtype == object and got.tolist() == [[b"a"], ["é".encode()]]


@pytest.mark.parametrize("datatype, shape, data, message", [
    ("FP32", [2], [1.0, True], "FP32 data must be numbers"),
    ("FP32", [2], [1.0, "one"], "FP32 data must be numbers"),
    ("INT32", [1], ["NaN"], "INT32 data must be numbers"),
    ("INT64", [2], [1, 2.5], "INT64 data must be integers"),
    ("BOOL", [2], [True, 1], "BOOL data must be true or false"),
    ("BYTES", [2], ["a", 1], "BYTES data must be strings"),
    ("FP32", [2], [1.0, None], "data holds a NoneType"),
    ("FP32", [1, 2], [[1.0, {"a": 1}]], "data holds a dict"),
    ("FP32", [2, 2], [1.0, 2.0, 3.0], r"shape \[2, 2\] needs 4 values, data has 3"),
    ("FP32", [4], [[1.0, 2.0], [3.0]], None),  # ragged but 3 values: a count mismatch
    ("UINT8", [1], [256], "data does not fit UINT8"),
])
def test_a_wrong_value_is_a_bad_request_naming_the_input(datatype, shape, data, message):
    with pytest.raises(BadRequest, match=message or "needs 4 values") as caught:
        decoded(datatype, shape, data)
    assert "input 'x'" in str(caught.value)


NESTINGS = [
    [[1.0, 2.0], [3.0, 4.0]],                       # rows: a level at a time
    [[[1, 2], [3, 4]], [[5, 6], [7, 8]]],
    [[1.0, [2.0, 3.0]], [4.0]],                     # ragged: value by value
    [[], [1.0], [[2.0]]],
    [[1.0, None]], [[{"a": 1}]], [[1.0], [None]],  # what no tensor holds
    [[1.0], [2.0, {"a": 1}], None], [[None, {"a": 1}]], [[{"a": 1}, None]],
]


@pytest.mark.parametrize("data", NESTINGS)
def test_nested_data_flattens_as_the_value_by_value_walk_does(data):
    def outcome(flatten):
        try:
            return flatten(data, "x")
        except BadRequest as exc:
            return str(exc)

    levels = outcome(lambda d, n: kserve._flatten(d, n, set(map(type, d)))[0])
    assert levels == outcome(kserve._flatten_values)


def test_nesting_deeper_than_the_rank_limit_is_refused_both_ways():
    from workerpool.serving.limits import MAX_RANK

    deepest_allowed, too_deep = [1.0], [1.0]
    for _ in range(MAX_RANK - 1):
        deepest_allowed = [deepest_allowed]
    for _ in range(MAX_RANK):
        too_deep = [too_deep]
    assert kserve._flatten(deepest_allowed, "x", {list}) == ([1.0], {float})
    with pytest.raises(BadRequest, match="nested deeper"):
        kserve._flatten(too_deep, "x", {list})
    with pytest.raises(BadRequest, match="nested deeper"):
        kserve._flatten_values(too_deep, "x")
