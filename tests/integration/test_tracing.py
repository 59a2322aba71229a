"""OpenTelemetry tracing (``--tracing``): the server's spans, caught by the SDK's in-memory
exporter inside the real server processes (a sitecustomize on their path sets the tracer
provider, as ``opentelemetry-instrument`` would, and writes the finished spans to a file at
exit). A request is a SERVER span under the client's traceparent, with the pool's queue
wait and the worker's compute as children inside it; over HTTP, gRPC, and through
``--http-workers`` front ends (the children then come from the server's process, under
the front end's span)."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from test_serve import TESTS, Server

pytestmark = pytest.mark.module_pool

CONFIG = textwrap.dedent("""
    [server]
    grpc_port = 0
    tracing = true

    [models.chatty]
    source = "serve_models:numbers"
    predict = "serve_models:chatty"
    workers = 1
    inputs = [{name = "x", datatype = "FP32", shape = [-1, 4]}]
""")

HOOK = textwrap.dedent("""
    import atexit, json, os
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _exporter = InMemorySpanExporter()
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(_provider)

    def _dump():
        spans = [{"name": s.name, "trace_id": s.context.trace_id, "span_id": s.context.span_id,
                  "parent": s.parent.span_id if s.parent else None,
                  "kind": s.kind.name, "start": s.start_time, "end": s.end_time,
                  "attributes": dict(s.attributes or {})}
                 for s in _exporter.get_finished_spans()]
        if spans:
            path = os.path.join(os.environ["WP_SPANS_DIR"], f"spans-{os.getpid()}.json")
            with open(path, "w") as out:
                json.dump(spans, out)

    atexit.register(_dump)
""")

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                               "data": [1, 2, 3, 4]}]}).encode()


def serve_and_collect(directory, calls, *args) -> list[dict]:
    """Start a traced server, make ``calls(server)``, stop it: every span it finished."""
    hook, spans = directory / "hook", directory / "spans"
    hook.mkdir()
    spans.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    (directory / "serve.toml").write_text(CONFIG)
    path = [str(hook), TESTS, os.path.join(TESTS, "integration"),
            os.environ.get("PYTHONPATH", "")]
    server = Server(["--config", str(directory / "serve.toml"), *args], grpc_lines=1,
                    env={"PYTHONPATH": os.pathsep.join(path), "WP_SPANS_DIR": str(spans)})
    try:
        server.wait_ready()
        calls(server)
    finally:
        assert server.stop() == 0, server.stderr()
    found = []
    for path in spans.glob("spans-*.json"):
        found.extend(json.loads(path.read_text()))
    return found


def children_of(spans: list[dict], parent: dict) -> dict[str, dict]:
    kids = {s["name"]: s for s in spans
            if s["parent"] == parent["span_id"] and s["trace_id"] == parent["trace_id"]}
    return kids


def check_pool_children(spans: list[dict], request: dict) -> None:
    kids = children_of(spans, request)
    assert {"queue", "compute"} <= set(kids), (request["name"], sorted(kids))
    slack = 2_000_000  # ns: the children's times are the pool's monotonic clock, converted
    for kid in (kids["queue"], kids["compute"]):
        assert request["start"] - slack <= kid["start"] <= kid["end"] <= request["end"] + slack
    assert kids["queue"]["end"] <= kids["compute"]["start"] + slack
    assert kids["compute"]["attributes"]["workerpool.compute_s"] > 0


def test_http_and_grpc_requests_are_spans_with_queue_and_compute(tmp_path):
    def calls(server):
        status, headers, _ = server.post("/v2/models/chatty/infer", BODY,
                                         {"Content-Type": "application/json",
                                          "traceparent": TRACEPARENT})
        assert status == 200
        client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
        try:
            x = triton_grpc.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            client.infer("chatty", [x], headers={"x-request-id": "traced-grpc"})
        finally:
            client.close()

    spans = serve_and_collect(tmp_path, calls)
    (http,) = [s for s in spans if s["name"] == "POST /v2/models/chatty/infer"]
    assert (http["trace_id"], http["parent"], http["kind"]) == (TRACE_ID, PARENT_ID, "SERVER")
    attributes = http["attributes"]
    assert (attributes["workerpool.model"], attributes["workerpool.model_version"],
            attributes["workerpool.protocol"], attributes["http.response.status_code"]) == \
        ("chatty", "1", "kserve_http", 200)
    check_pool_children(spans, http)
    (grpc_span,) = [s for s in spans if s["name"] == "ModelInfer"]
    assert grpc_span["attributes"]["workerpool.request_id"] == "traced-grpc"
    assert grpc_span["attributes"]["rpc.grpc.status_code"] == "OK"
    check_pool_children(spans, grpc_span)
    # health checks are spans too, without children
    ready = [s for s in spans if s["name"] == "GET /v2/health/ready"]
    assert ready and not children_of(spans, ready[-1])


def test_front_ends_make_the_span_and_the_server_its_children(tmp_path):
    def calls(server):
        for _ in range(3):
            status, _, _ = server.post("/v2/models/chatty/infer", BODY,
                                       {"Content-Type": "application/json",
                                        "traceparent": TRACEPARENT})
            assert status == 200

    spans = serve_and_collect(tmp_path, calls, "--http-workers", "2")
    requests = [s for s in spans if s["name"] == "POST /v2/models/chatty/infer"]
    assert len(requests) == 3  # one per request: the front end's, not again the server's
    for request in requests:
        assert (request["trace_id"], request["parent"]) == (TRACE_ID, PARENT_ID)
        check_pool_children(spans, request)
