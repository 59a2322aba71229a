"""The protocols' JSON: orjson's speed, the standard library's answers."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from workerpool.serving import jsontext
from workerpool.serving.errors import BadRequest
from workerpool.serving.limits import parse_json

DOCUMENTS = [
    {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.1, -2.5e-7, 3]}]},
    [1, "é", None, True, {"nested": [[], {}]}],
    {"id": "a\u2028b", "parameters": {"binary_data_output": False}},
]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_strict_documents_read_and_write_as_the_standard_library_does(document):
    text = json.dumps(document)
    assert jsontext.loads(text.encode()) == json.loads(text)
    assert json.loads(jsontext.dumps(document)) == document
    assert b" " not in jsontext.dumps([1, {"a": 2}])


def test_what_orjson_refuses_the_standard_library_still_reads():
    values = jsontext.loads(b"[NaN, Infinity, -Infinity, 18446744073709551616]")
    assert math.isnan(values[0]) and values[1:3] == [math.inf, -math.inf]
    assert values[3] == 2**64 and isinstance(values[3], int)
    assert jsontext.loads("[0, 1000000000000000000000000000000]") == [0, 10**30]
    assert jsontext.dumps([2**70]) == b"[1180591620717411303424]"


def test_bad_documents_are_the_clients_errors():
    for data, message in [(b"{", "not valid JSON"), (b"\xff", "not valid JSON"),
                          (b"[" * 100_000 + b"]" * 100_000, "too deeply")]:
        with pytest.raises(BadRequest, match=message):
            parse_json(data)


def test_a_long_integer_anywhere_in_bytes_is_read_exactly():
    """The scan for 20 digits in a row (where orjson would turn an integer into a float)."""
    assert jsontext.loads(b'{"a": [0.5, 100000000000000000000000000000]}') == \
        {"a": [0.5, 10**29]}
    assert jsontext.loads(b"[12345678901234567890]") == [12345678901234567890]
    long_fraction = b"[0.12345678901234567890123]"  # 20 digits, a float either way
    assert jsontext.loads(long_fraction) == json.loads(long_fraction)
    for text in ("[-123456789012345678901]", '{"n": 123456789012345678901}',
                 "[1.5, 99999999999999999999]", "99999999999999999999"):
        assert jsontext._has_long_integers(text.encode()) and \
            jsontext._has_long_integers(text), text
        assert jsontext.loads(text.encode()) == json.loads(text)


def test_floats_with_twenty_digits_take_the_fast_path_and_read_the_same():
    # small floats print with 20 digits or more after the point (0.00012345678901234567):
    # they are no integers orjson would change, so they must not send a body to the
    # standard library's parser (3.5x slower on a 256-row body)
    rng = random.Random(0)
    values = [rng.random() * 10.0 ** -rng.randint(3, 30) for _ in range(2000)]
    values += [12345678901234567890123.5, 1.2345678901234567e+22]
    text = json.dumps(values)
    assert max(len(run) for run in re.findall(r"[0-9]+", text)) >= 20  # the case at hand
    assert not jsontext._has_long_integers(text.encode())
    assert not jsontext._has_long_integers(text)
    assert jsontext.loads(text.encode()) == json.loads(text)
