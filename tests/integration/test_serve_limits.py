"""One client must not stall or bloat `workerpool serve`: each case here once did.

A real server (module scope) speaks HTTP, KServe v2 gRPC and TF Serving gRPC with small
function models; it is probed the way a hostile client on 127.0.0.1 would: endless or
countless headers, a head sent too slowly, a 44-byte TF Serving request filled to 1 GiB,
absurd shapes, JSON nested past any parser, undecodable protobuf, errors a megabyte long,
outputs the server cannot send. Each case checks the answer the client gets and that the
server went on serving everyone else (and, where it once grew, that its memory did not).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import textwrap
import threading

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import serve_models
from test_serve import Server, metric_samples
from testkit import wait_until

pytestmark = pytest.mark.module_pool

MIB = 1024 * 1024
HEADER_TIMEOUT_S = 2
CONFIG = textwrap.dedent(f"""
    [server]
    max_request_bytes = {MIB}
    header_timeout = {HEADER_TIMEOUT_S}
    grpc_port = 0
    tf_serving_port = 0

    [models.echo]
    source = "serve_models:numbers"
    predict = "serve_models:echo"
    workers = 1
    inputs = [{{name = "x", datatype = "FP32", shape = [-1]}}]

    [models.outputs]
    source = "serve_models:numbers"
    predict = "serve_models:misbehaving_output"
    workers = 1
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("limits")
    (directory / "serve.toml").write_text(CONFIG)
    server = Server(["--config", str(directory / "serve.toml")], grpc_lines=2)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0


def json_infer(name: str, shape: list, data, datatype: str = "FP32") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                   "data": data}]}).encode()


def assert_serves_http(server) -> None:
    status, _, raw = server.post("/v2/models/echo/infer", json_infer("x", [2], [1.5, 2.5]))
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [1.5, 2.5], raw


def assert_serves(server) -> None:
    """An honest client still gets its answer, over HTTP and gRPC."""
    assert_serves_http(server)
    with triton_grpc.InferenceServerClient(server.grpc["KServe v2"]) as client:
        tensor = triton_grpc.InferInput("x", [2], "FP32")
        tensor.set_data_from_numpy(np.array([1.5, 2.5], np.float32))
        assert client.infer("echo", [tensor]).as_numpy("output_0").tolist() == [1.5, 2.5]


def server_rss(server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def read_response(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (or 30 s pass)."""
    sock.settimeout(30)
    response = b""
    try:
        while chunk := sock.recv(65536):
            response += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return response


# -- the request head: bytes, lines, time ----------------------------------------------------
def test_an_endless_header_is_refused_with_431_before_it_is_read(server):
    """A 64 MiB header line once held the loop at 100% CPU for ~10 s: now the server
    answers 431 and closes the connection after the first 64 KiB, and the client cannot
    even send the rest."""
    sent, answered = 0, []
    sock = socket.create_connection((server.host, server.port))
    checker = threading.Thread(target=lambda: answered.append(
        server.get("/v2/health/ready")[0]))
    try:
        sock.sendall(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 65536
        checker.start()
        while sent < 64 * MIB:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = read_response(sock)
    sock.close()
    checker.join()
    assert sent < 64 * MIB, "the server read the whole 64 MiB header"
    assert response.startswith(b"HTTP/1.1 431"), response[:200]
    assert b"--max-header-bytes" in response
    assert answered == [200]
    assert_serves(server)


@pytest.mark.parametrize("lines, status", [(98, 200), (99, 431)])
def test_at_most_100_header_lines(server, lines, status):
    """100,000 header lines were once accepted; 100 in all (Host and Connection
    included) still are."""
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Line-%d: 1\r\n" % i for i in range(lines)) + b"Connection: close\r\n\r\n"
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(head)
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 %d" % status), response[:200]
    assert_serves(server)


def test_a_head_sent_too_slowly_gets_408_and_the_connection_closes(server):
    with socket.create_connection((server.host, server.port)) as slow, \
            socket.create_connection((server.host, server.port)) as idle:
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never ends
        response = read_response(slow)
        assert response.startswith(b"HTTP/1.1 408"), response[:200]
        assert b"--header-timeout" in response
        assert read_response(idle).startswith(b"HTTP/1.1 408")  # opened, never a byte sent
    assert_serves(server)


def test_a_later_head_sent_too_slowly_on_a_kept_alive_connection_gets_408(server):
    """The timer of a head that did not come whole in one read starts with that read (a
    connection's first head is timed from the connection's start)."""
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(30)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # (one write: cork.py)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never ends
        second = read_response(sock)
        assert second.startswith(b"HTTP/1.1 408"), second[:200]
    assert_serves(server)


def test_a_keep_alive_connection_is_not_timed_out_between_requests(server):
    """The head timer runs from a request's first byte, not while a kept-alive connection
    waits for the client's next request."""
    import http.client
    import time

    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.request("GET", "/v2/health/live")
        assert connection.getresponse().read() == b'{"live": true}'
        time.sleep(HEADER_TIMEOUT_S + 0.5)  # idle, kept alive, past the head timeout
        connection.request("GET", "/v2/health/live")  # on the same connection
        assert connection.getresponse().read() == b'{"live": true}'
    finally:
        connection.close()


# -- tensors that ask for more than they send ------------------------------------------------
def tf_request(dims: list[int], dtype: str, values: list | None = None):
    from tensorflow.core.framework import types_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "echo"
    tensor = request.inputs["x"]
    tensor.dtype = getattr(types_pb2, dtype)
    for size in dims:
        tensor.tensor_shape.dim.add(size=size)
    if values:
        field = "string_val" if dtype == "DT_STRING" else "float_val"
        getattr(tensor, field).extend(values)
    return request


FILLS = [
    # id, dims, dtype, values, what the message must say
    ("1 GiB of floats from one float_val", [1, 268435456], "DT_FLOAT", [1.0],
     "one value would fill shape [1, 268435456], 1073741824 bytes"),
    ("30M strings from one string_val", [30000000], "DT_STRING", [b"a"],
     "one value would fill shape [30000000]"),
    ("dims [1e9, 1e9]", [10**9, 10**9], "DT_FLOAT", [1.0], "one value would fill"),
    ("an empty shape of 2**63-1", [0, 2**63 - 1], "DT_FLOAT", None, "is empty but"),
]


@pytest.mark.parametrize("dims, dtype, values, message", [c[1:] for c in FILLS],
                         ids=[c[0] for c in FILLS])
def test_tf_serving_fills_are_bounded_before_anything_is_allocated(server, dims, dtype, values,
                                                                   message):
    """A 44-byte Predict request once made the server allocate 1 GiB on its event loop."""
    before = server_rss(server)
    with grpc.insecure_channel(server.grpc["TensorFlow Serving"]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                tf_request(dims, dtype, values), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert message in caught.value.details() and "--max-request-bytes" in \
        caught.value.details()
    assert server_rss(server) - before < 64 * MIB
    assert_serves(server)


def test_a_fill_an_honest_client_could_have_sent_whole_still_works(server):
    """tf.make_tensor_proto(1.0, shape=[4]) sends one float_val for four values."""
    with grpc.insecure_channel(server.grpc["TensorFlow Serving"]) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            tf_request([4], "DT_FLOAT", [1.0]), timeout=30)
    (output,) = reply.outputs.values()
    assert np.frombuffer(output.tensor_content, np.float32).tolist() == [1.0] * 4


ABSURD_SHAPES = [
    ("[0, 10**30]", [0, 10**30], "is empty but"),
    ("[0, 2**63-1]", [0, 2**63 - 1], "is empty but"),
    ("33 dimensions", [1] * 33, "at most 32"),
]


@pytest.mark.parametrize("shape, message", [c[1:] for c in ABSURD_SHAPES],
                         ids=[c[0] for c in ABSURD_SHAPES])
def test_absurd_shapes_are_client_errors_over_http_and_grpc(server, shape, message):
    """These were answered 500 / INTERNAL ("array is too big")."""
    data = [] if math.prod(shape) == 0 else [1.0]
    status, _, raw = server.post("/v2/models/echo/infer", json_infer("x", shape, data))
    assert status == 400 and message in json.loads(raw)["error"], raw
    if max(shape) < 2**63:  # protobuf's int64 dims cannot even carry 10**30
        request = service_pb2.ModelInferRequest(model_name="echo")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=shape)
        tensor.contents.fp32_contents.extend(data)
        with grpc.insecure_channel(server.grpc["KServe v2"]) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request,
                                                                              timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
    assert_serves(server)


# -- JSON and protobuf that no decoder can follow --------------------------------------------
NESTED = 100_000
MALFORMED = [
    # id, path, body, what the message must say
    ("KServe JSON nested 100k deep", "/v2/models/echo/infer",
     b'{"inputs": ' + b"[" * NESTED + b"]" * NESTED + b"}", "too deeply"),
    ("KServe data nested 40 deep", "/v2/models/echo/infer",
     json_infer("x", [1], json.loads("[" * 40 + "1.0" + "]" * 40)), "deeper than 32"),
    ("TF REST JSON nested 100k deep", "/v1/models/echo:predict",
     b'{"instances": ' + b"[" * NESTED + b"]" * NESTED + b"}", "too deeply"),
    ("TF REST instances nested 600 deep", "/v1/models/echo:predict",
     b'{"instances": ' + b"[" * 600 + b"1.0" + b"]" * 600 + b"}", "deeper than 32"),
    ("repository JSON nested 100k deep", "/v2/repository/index",
     b"[" * NESTED + b"]" * NESTED, "too deeply"),
]


@pytest.mark.parametrize("path, body, message", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_json_nested_past_any_parser_is_400(server, path, body, message):
    """These were 500s: RecursionError in json.loads or in the TF REST decoder."""
    status, _, raw = server.post(path, body)
    assert status == 400 and message in json.loads(raw)["error"], raw
    assert_serves(server)


def test_undecodable_protobuf_is_invalid_argument(server):
    """It was UNKNOWN: grpcio's own deserializer failed before our handler ran."""
    with grpc.insecure_channel(server.grpc["KServe v2"]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff\xff not a message", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in caught.value.details()
    assert_serves(server)


def test_an_error_naming_thousands_of_inputs_is_clipped(server):
    """Unknown input names once all came back (100,000: a ~1 MB message); over gRPC such a
    message overflows the metadata limit and the client saw RESOURCE_EXHAUSTED."""
    names = [f"unknown_input_{i:05d}" for i in range(10_000)]
    body = json.dumps({"inputs": [{"name": n, "shape": [1], "datatype": "FP32",
                                   "data": [1.0]} for n in names]}).encode()
    status, _, raw = server.post("/v2/models/echo/infer", body)
    error = json.loads(raw)["error"]
    assert status == 400 and len(raw) < 4096 and "unknown_input_00000" in error
    request = service_pb2.ModelInferRequest(model_name="echo")
    for name in names:
        request.inputs.add(name=name, datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    with grpc.insecure_channel(server.grpc["KServe v2"]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()[:200]
    assert len(caught.value.details()) < 4096
    assert_serves(server)


# -- outputs the server cannot send are the model's fault ------------------------------------
BAD_OUTPUTS = [
    # id, x's first value (serve_models.misbehaving_output), what the message must say
    ("a lambda", 1, "function"),
    ("a lock", 2, "lock"),
    ("an object array", 3, "object"),
    ("None", 4, "predict returned None"),
    ("a dict with non-string keys", 5, "keys [1, (2, 3)] are not strings"),
]


@pytest.mark.parametrize("choice, message", [c[1:] for c in BAD_OUTPUTS],
                         ids=[c[0] for c in BAD_OUTPUTS])
def test_an_output_that_cannot_be_sent_is_500_and_counted_as_an_error(server, choice,
                                                                        message):
    """These were 400s, counted bad_request: the client's fault."""
    before = metric_samples(server)
    status, _, raw = server.post("/v2/models/outputs/infer", json_infer("x", [1], [choice]))
    assert status == 500 and message in json.loads(raw)["error"], raw
    with triton_grpc.InferenceServerClient(server.grpc["KServe v2"]) as client:
        tensor = triton_grpc.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.array([choice], np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("outputs", [tensor])
    assert caught.value.status() == "StatusCode.INTERNAL" and message in caught.value.message()
    after = metric_samples(server)
    for protocol in ("kserve_http", "kserve_grpc"):
        key = ("workerpool_requests_total", (("model", "outputs"), ("outcome", "error"),
                                             ("protocol", protocol)))
        assert after.get(key, 0) - before.get(key, 0) == 1
    assert_serves(server)


# -- smaller things a client meets -----------------------------------------------------------
def test_content_encoding_is_compared_without_case(server):
    status, _, raw = server.post("/v2/models/echo/infer", json_infer("x", [1], [2.0]),
                                 {"Content-Encoding": "Identity"})
    assert status == 200, raw
    status, _, raw = server.post("/v2/models/echo/infer", json_infer("x", [1], [2.0]),
                                 {"Content-Encoding": "gzip"})
    assert status == 400 and "uncompressed" in json.loads(raw)["error"]


def strict_json(raw: bytes):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


def test_non_finite_floats_are_strict_json_in_kserve_and_bare_in_tf_serving_rest(server):
    """KServe v2 JSON writes NaN and infinities as "NaN", "Infinity", "-Infinity" (strict
    parsers refused the bare tokens) and reads both; TF Serving's REST API writes and reads
    bare NaN and Infinity, as TF Serving documents."""
    status, _, raw = server.post("/v2/models/outputs/infer", json_infer("x", [1], [6.0]))
    assert status == 200
    assert strict_json(raw)["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
    with triton_http.InferenceServerClient(server.address) as client:
        for model, value, expected in (("outputs", 6.0, [np.nan, np.inf, -np.inf, 1.5]),
                                       ("echo", np.nan, [np.nan])):  # a NaN it sends bare
            tensor = triton_http.InferInput("x", [1], "FP32")
            tensor.set_data_from_numpy(np.array([value], np.float32), binary_data=False)
            wanted = triton_http.InferRequestedOutput("output_0", binary_data=False)
            got = client.infer(model, [tensor], outputs=[wanted]).as_numpy("output_0")
            np.testing.assert_array_equal(got, np.array(expected, np.float32))
    status, _, raw = server.post("/v2/models/echo/infer",
                                 json_infer("x", [3], ["NaN", "Infinity", "-Infinity"]))
    assert strict_json(raw)["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity"]
    status, _, raw = server.post("/v1/models/outputs:predict", b'{"instances": [6.0]}')
    assert status == 200 and raw.replace(b" ", b"") == \
        b'{"predictions":[NaN,Infinity,-Infinity,1.5]}'


# -- readiness while no worker can answer ----------------------------------------------------
def test_ready_is_503_from_the_death_of_every_worker_until_a_replacement_is_warm(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    np.savez(tmp_path / "warmup.npz", x=np.full(1, serve_models.WARM_UP_VALUE, np.float32))
    server = Server(["serve_models:numbers", "--predict", "serve_models:slow_warm_up",
                     "--name", "warm", "--workers", "2", "--warmup",
                     str(tmp_path / "warmup.npz")],
                    env={"WARM_MARKERS": str(markers), "WARM_UP_S": "2"})
    try:
        server.wait_ready()
        workers = json.loads(server.get("/status")[2])["models"][0]["workers"]
        killed = {w["pid"] for w in workers}
        assert len(killed) == 2
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: server.get("/v2/health/ready")[0] == 503, 30)
        status, headers, raw = server.post("/v2/models/warm/infer", json_infer("x", [1], [1.0]))
        assert status == 503 and headers["retry-after"] == "1", raw  # a restart: retry soon
        assert "being replaced" in json.loads(raw)["error"]
        seen = []

        def ready_again() -> bool:
            seen.append((server.get("/v2/health/ready")[0],
                         server.get("/v2/models/warm/ready")[0]))
            return seen[-1] == (200, 200)

        assert wait_until(ready_again, 60)
        warm = {int(name.removeprefix("warm-")) for name in os.listdir(markers)}
        assert warm - killed, "ready said 200 before any replacement finished its warm-up"
        assert (503, 503) in seen, seen
    finally:
        assert server.stop() == 0


def test_the_h11_parser_bounds_the_head_too():
    """``--http h11``: h11 refuses a head over --max-header-bytes itself (400); the guard
    adds the head timeout."""
    server = Server(["serve_models:numbers", "--predict", "serve_models:echo", "--name",
                     "echo", "--workers", "1", "--http", "h11", "--header-timeout", "2"])
    try:
        server.wait_ready()
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (
                128 * 1024))
            assert read_response(sock).startswith(b"HTTP/1.1 400")
        with socket.create_connection((server.host, server.port)) as slow:
            slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            assert read_response(slow).startswith(b"HTTP/1.1 408")
        assert_serves_http(server)
    finally:
        assert server.stop() == 0
