"""serve/access_log.py's two styles, and request_ids.py's ids."""

from __future__ import annotations

import io
import json
import time

import pytest

from workerpool import request_ids
from workerpool.serve.access_log import AccessLog


def test_text_and_json_lines_say_the_same():
    for style in ("text", "json"):
        stream = io.StringIO()
        token = request_ids.served.set(("mlp", "2", "kserve_http"))
        try:
            AccessLog(style, stream).write(
                client="10.0.0.1:5000", protocol="http", method="POST",
                path="/v2/models/mlp/infer", status=200, started=time.perf_counter() - 0.002,
                request_id="abc")
        finally:
            request_ids.served.reset(token)
        line = stream.getvalue()
        assert line.endswith("\n") and line.count("\n") == 1
        if style == "json":
            entry = json.loads(line)
            assert entry["model"] == "mlp" and entry["version"] == "2"
            assert entry["protocol"] == "kserve_http" and entry["status"] == 200
            assert entry["duration_ms"] >= 2 and entry["request_id"] == "abc"
        else:
            assert " 10.0.0.1:5000 kserve_http POST /v2/models/mlp/infer model=mlp " \
                   "version=2 status=200 duration_ms=" in line
            assert line.rstrip().endswith("request_id=abc")


def test_a_request_without_a_model_or_an_answer():
    stream = io.StringIO()
    AccessLog("text", stream).write(client="-", protocol="http", method="GET", path="/x",
                                    status=None, started=time.perf_counter(), request_id="r")
    assert "model=- version=- status=- " in stream.getvalue()
    with pytest.raises(ValueError):
        AccessLog("xml")


def test_request_ids_are_new_unless_a_client_gave_a_sane_one():
    made = {request_ids.accepted(None) for _ in range(1000)}
    assert len(made) == 1000
    assert request_ids.accepted("abc-123_X.y") == "abc-123_X.y"
    for bad in ("", "a b", "x" * 129, "\u00e9", "tab\there"):
        assert request_ids.accepted(bad) != bad
