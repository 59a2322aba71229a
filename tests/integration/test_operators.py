"""What operators read: the access log (``--access-log json|text``: a line per request, HTTP
and gRPC, with the model and version that answered, the status, the duration and the
request id) and X-Request-ID (the client's, or one the server makes), which comes back on
every answer and in error bodies, and prefixes the lines the worker's predict printed or
logged for that request; through ``--http-workers`` front ends too (logged once, by the
front end that answered)."""

from __future__ import annotations

import json
import textwrap
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from test_serve import Server, ready_server, wait_until

pytestmark = pytest.mark.module_pool

CONFIG = textwrap.dedent("""
    [server]
    grpc_port = 0
    access_log = "json"

    [models.chatty]
    source = "serve_models:numbers"
    predict = "serve_models:chatty"
    workers = 1
    inputs = [{name = "x", datatype = "FP32", shape = [-1, 4]}]
""")

BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                               "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}).encode()
JSON_HEADERS = {"Content-Type": "application/json"}


def start(directory, *args) -> Server:
    (directory / "serve.toml").write_text(CONFIG)
    return ready_server(["--config", str(directory / "serve.toml"), *args], grpc_lines=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("operators"))
    yield server
    assert server.stop() == 0, server.stderr()


def access_lines(server, request_id: str) -> list[dict]:
    lines = []
    for line in server.stderr().splitlines():
        if line.startswith("{") and f'"request_id": "{request_id}"' in line:
            lines.append(json.loads(line))
    return lines


def logged(server, request_id: str, count: int = 1) -> list[dict]:
    """The access log's lines for ``request_id`` once ``count`` are there."""
    assert wait_until(lambda: len(access_lines(server, request_id)) >= count, 10), \
        server.stderr()[-3000:]
    return access_lines(server, request_id)


def test_a_clients_request_id_comes_back_and_tags_the_workers_lines(server):
    status, headers, body = server.post("/v2/models/chatty/infer", BODY,
                                        dict(JSON_HEADERS, **{"X-Request-ID": "trace-7f3a"}))
    assert status == 200, body
    assert headers["x-request-id"] == "trace-7f3a"
    (line,) = logged(server, "trace-7f3a")
    assert {k: line[k] for k in ("protocol", "method", "path", "model", "version", "status")} \
        == {"protocol": "kserve_http", "method": "POST", "path": "/v2/models/chatty/infer",
            "model": "chatty", "version": "1", "status": 200}
    assert line["client"].startswith("127.0.0.1:") and line["duration_ms"] > 0
    assert line["time"].endswith("Z")
    assert wait_until(lambda: "[request trace-7f3a] chatty predict saw [2, 4]"
                      in server.stderr(), 10), server.stderr()[-3000:]
    assert "[request trace-7f3a] chatty logged 8 values" in server.stderr()


def test_without_an_id_the_server_makes_one_and_errors_carry_it(server):
    status, headers, body = server.post("/v2/models/nobody/infer", BODY, JSON_HEADERS)
    assert status == 404
    request_id = headers["x-request-id"]
    assert json.loads(body)["request_id"] == request_id
    (line,) = logged(server, request_id)
    assert line["status"] == 404 and line["model"] is None and line["protocol"] == "http"
    status, headers, _ = server.post("/v2/models/chatty/infer", BODY, JSON_HEADERS)
    assert status == 200 and headers["x-request-id"] != request_id  # a new one each time


def test_behind_a_proxy_on_this_host_the_log_names_the_client_it_forwarded(server):
    status, _, body = server.post("/v2/models/chatty/infer", BODY, dict(
        JSON_HEADERS, **{"X-Request-ID": "proxied-1", "X-Forwarded-For": "203.0.113.7"}))
    assert status == 200, body
    (line,) = logged(server, "proxied-1")
    assert line["client"].startswith("203.0.113.7")


@pytest.mark.parametrize("given", ["has space", "x" * 129, "caf\u00e9"])
def test_an_unusable_request_id_is_replaced(server, given):
    request = urllib.request.Request(server.url + "/v2/health/ready",
                                     headers={"X-Request-ID": given.encode().decode("latin-1")})
    with urllib.request.urlopen(request, timeout=30) as answer:
        made = answer.headers["x-request-id"]
    assert made and made != given and " " not in made


def test_grpc_calls_are_logged_and_carry_the_id(server):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
    try:
        x = triton_grpc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer("chatty", [x], headers={"x-request-id": "grpc-call-1"})
        (line,) = logged(server, "grpc-call-1")
        assert (line["protocol"], line["model"], line["status"], line["path"]) == \
            ("kserve_grpc", "chatty", "OK", "/ModelInfer")
        assert wait_until(lambda: "[request grpc-call-1] chatty predict saw [1, 4]"
                          in server.stderr(), 10)
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("nobody", [x], headers={"x-request-id": "grpc-call-2"})
        (line,) = logged(server, "grpc-call-2")
        assert line["status"] == "NOT_FOUND" and line["model"] is None
    finally:
        client.close()


def test_grpc_answers_carry_the_id_in_trailing_metadata(server):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server.grpc["KServe v2"]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest(),
                                            metadata=(("x-request-id", "live-1"),))
        assert ("x-request-id", "live-1") in tuple(call.trailing_metadata())
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelReady(service_pb2.ModelReadyRequest(name="nobody"))
        made = dict(failed.value.trailing_metadata())["x-request-id"]
        assert made and logged(server, made)[0]["status"] == "NOT_FOUND"


def test_front_ends_log_each_request_once(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("operators_fronts"), "--http-workers", "2")
    try:
        for index in range(4):
            request_id = f"front-{index}"
            status, headers, _ = server.post("/v2/models/chatty/infer", BODY,
                                             dict(JSON_HEADERS, **{"X-Request-ID": request_id}))
            assert status == 200 and headers["x-request-id"] == request_id
            (line,) = logged(server, request_id)  # once: the front end's, not the server's
            assert (line["model"], line["status"]) == ("chatty", 200)
            assert wait_until(lambda: f"[request {request_id}] chatty predict saw"
                              in server.stderr(), 10)
        # a request a front end relays whole (metadata): its id reaches the server's app
        status, headers, _ = server.get("/v2/models/chatty", {"X-Request-ID": "meta-1"})
        assert status == 200 and headers["x-request-id"] == "meta-1"
        assert len(logged(server, "meta-1")) == 1
    finally:
        assert server.stop() == 0, server.stderr()
