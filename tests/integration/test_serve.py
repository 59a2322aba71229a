"""`workerpool serve` as users meet it: a real server process on 127.0.0.1, real clients.

One server (module scope) holds a torch model, a Keras model and two misbehaving ones, each
its own pool; it is called with tritonclient.http (binary and JSON), urllib and raw sockets,
and every case ends by checking that it still serves. Start-up, shutdown and broken states
get servers of their own.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

import modelzoo
from serve_models import version_of
from testkit import Traffic, is_running, wait_until

pytestmark = pytest.mark.module_pool
# Triton's words for a model the server does not have (serving/errors.py)
UNKNOWN_NOPE = "Request for unknown model: 'nope' is not found"

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1024 * 1024

CONFIG = textwrap.dedent("""
    [server]
    max_request_bytes = 1048576
    drain_timeout = 20

    [models.mlp]
    source = "modelzoo:mlp"
    workers = 1
    warmup = "{warmup}"

    [models.keras]
    source = "test_tensorflow:dense_mlp"
    workers = 1
    inputs = [{{name = "x", datatype = "FP32", shape = [-1, 32]}}]

    [models.sleepy]
    source = "serve_models:numbers"
    predict = "serve_models:sleep_then_echo"
    workers = 1
    max_queue = 1
    timeout = 1.5

    [models.faulty]
    source = "serve_models:numbers"
    predict = "serve_models:fail"
    workers = 1

    [models.words]
    source = "serve_models:numbers"
    predict = "serve_models:texts"
    workers = 1
""")


class Server:
    """A `workerpool serve` process; ``url`` once it listens."""

    def __init__(self, args: list[str], env: dict | None = None, grpc_lines: int = 0,
                 metrics_line: bool = False, cafile: str | None = None):
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [TESTS, os.path.join(TESTS, "integration"), os.environ.get("PYTHONPATH", "")]))
        environment.update(env or {})
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill and block it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workerpool", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=environment)
        line = self.process.stdout.readline()
        assert line.startswith(("workerpool serve: http://", "workerpool serve: https://")), \
            line + self.stderr()
        self.url = line.split()[2]
        self.address = self.url.split("://", 1)[1]
        # (with --tls-cert: the certificate's authority, which get/post trust)
        self.context = ssl.create_default_context(cafile=cafile) if cafile else None
        self.host, self.port = self.address.rsplit(":", 1)
        self.port = int(self.port)
        self.grpc = {}  # what it speaks ("KServe v2", "TensorFlow Serving") -> address
        for _ in range(grpc_lines):  # "workerpool serve: grpc://HOST:PORT (WHAT)"
            line = self.process.stdout.readline()
            assert line.startswith(("workerpool serve: grpc://", "workerpool serve: grpcs://")), \
                line + self.stderr()
            address, what = line.split(None, 3)[2:]
            self.grpc[what.strip().strip("()")] = address.split("://", 1)[1]
        self.metrics_url = None  # "workerpool serve: metrics http://HOST:PORT/metrics"
        if metrics_line:
            line = self.process.stdout.readline()
            assert line.startswith(("workerpool serve: metrics http://",
                                    "workerpool serve: metrics https://")), line + self.stderr()
            self.metrics_url = line.split()[3]

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return request("GET", self.url + path, headers=headers, context=self.context)

    def post(self, path: str, body: bytes, headers: dict | None = None):
        return request("POST", self.url + path, body, headers, context=self.context)

    def wait_ready(self, timeout: float = 120) -> None:
        assert wait_until(lambda: self.get("/v2/health/ready")[0] == 200, timeout), \
            self.get("/status")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.process.stdout.close()
            self.log.close()

    def kill(self) -> None:
        self.process.kill()
        self.stop()


def ready_server(args: list[str], **options) -> Server:
    """A Server (``options`` as Server takes them) once it is ready; killed if it never is."""
    server = Server(args, **options)
    try:
        server.wait_ready()
    except BaseException:
        server.kill()
        raise
    return server


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
            context: ssl.SSLContext | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve")
    np.savez(directory / "warmup.npz", x=np.ones((1, 32), dtype=np.float32))
    (directory / "serve.toml").write_text(CONFIG.format(warmup=directory / "warmup.npz"))
    server = Server(["--config", str(directory / "serve.toml")])
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(server.address)
    yield client
    client.close()


def infer(client, model: str, x: np.ndarray, binary: bool, name: str = "x",
          outputs: list[str] | None = None):
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    requested = [triton.InferRequestedOutput(o, binary_data=binary) for o in outputs or []]
    return client.infer(model, [tensor], outputs=requested or None)


def assert_still_serves(client):
    x = np.random.default_rng(7).standard_normal((2, 32)).astype(np.float32)
    got = infer(client, "mlp", x, binary=True).as_numpy("output_0")
    want = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, torch.from_numpy(x))
    assert np.array_equal(got, want.numpy())


# -- outputs equal the in-process model ------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_torch_model_equals_in_process(client, binary):
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    result = infer(client, "mlp", x, binary, outputs=["output_0"] if not binary else None)
    want = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, torch.from_numpy(x))
    assert np.array_equal(result.as_numpy("output_0"), want.numpy())
    output = result.get_output("output_0")
    assert ("binary_data_size" in output.get("parameters", {})) is binary


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_keras_model_equals_in_process(client, binary):
    import test_tensorflow  # the Keras model, with the workers' thread settings

    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    got = infer(client, "keras", x, binary, outputs=["output_0"]).as_numpy("output_0")
    test_tensorflow.assert_same(got, test_tensorflow.keras_reference(
        test_tensorflow.dense_mlp, x))


def test_the_server_process_imports_no_framework(server, client):
    # it serves a torch and a Keras model, loaded by loader processes (--load-in's default);
    # the modules their specs name (modelzoo, test_tensorflow) import torch and TensorFlow
    assert_still_serves(client)
    with open(f"/proc/{server.process.pid}/maps") as maps:
        libraries = {line.split()[-1] for line in maps if ".so" in line}
    assert not [path for path in libraries if "libtorch" in path or "tensorflow" in path]


def test_raw_json_with_nested_data_over_urllib(server):
    x = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    body = {"id": "req-1", "inputs": [{"name": "x", "shape": [2, 32], "datatype": "FP32",
                                       "data": x.tolist()}],  # nested rows
            "parameters": {"unknown_parameter": 1}}  # ignored
    status, headers, raw = server.post("/v2/models/mlp/versions/1/infer",
                                       json.dumps(body).encode())
    assert status == 200 and headers["content-type"] == "application/json"
    reply = json.loads(raw)
    assert reply["id"] == "req-1" and reply["model_name"] == "mlp"
    (output,) = reply["outputs"]
    want = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, torch.from_numpy(x))
    assert output["shape"] == [2, 8] and output["datatype"] == "FP32"
    assert np.array_equal(np.array(output["data"], dtype=np.float32).reshape(2, 8), want)


def test_bytes_tensors_both_ways(client):
    words = np.array([b"alpha", b"be", "\u03b3".encode()], dtype=np.object_)
    for binary in (True, False):
        tensor = triton.InferInput("text", [3], "BYTES")
        tensor.set_data_from_numpy(words, binary_data=binary)
        requested = [triton.InferRequestedOutput(n, binary_data=binary)
                     for n in ("upper", "length")]
        result = client.infer("words", [tensor], outputs=requested)
        # bytes.upper() leaves non-ASCII bytes alone; UTF-8 survives both ways (from
        # JSON, tritonclient hands BYTES back as str, as it does with Triton)
        upper = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("upper")]
        assert upper == [b"ALPHA", b"BE", "\u03b3".encode()]
        assert result.as_numpy("length").tolist() == [5, 2, 2]


def test_requested_outputs_are_honoured(server):
    x = np.ones((1, 32), np.float32)
    body = {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32",
                        "data": x.ravel().tolist()}], "outputs": [{"name": "nope"}]}
    status, _, raw = server.post("/v2/models/mlp/infer", json.dumps(body).encode())
    assert status == 400 and "no outputs ['nope']" in json.loads(raw)["error"]


# -- what the server says about itself and its models ------------------------------------
def test_server_and_model_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "workerpool"
    mlp = client.get_model_metadata("mlp")  # inferred from the warm-up call
    assert mlp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 32]}]
    assert mlp["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 8]}]
    keras = client.get_model_metadata("keras", "1")  # declared
    assert keras["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 32]}]
    for model in ("mlp", "keras", "sleepy", "faulty", "words"):
        assert client.is_model_ready(model)


# -- every bad request gets its status, and the server goes on ----------------------------
def binary_body(header: dict, *buffers: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(buffers), {"Inference-Header-Content-Length": str(len(head))}


X = np.ones((1, 32), np.float32)
ERRORS = [
    # id, path, body, headers, status, what the error must say
    ("malformed JSON", "/v2/models/mlp/infer", b"{not json", {}, 400, "not valid JSON"),
    ("header length past the body", "/v2/models/mlp/infer", b"{}",
     {"Inference-Header-Content-Length": "99"}, 400, "does not fit"),
    ("no inputs", "/v2/models/mlp/infer", b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    ("unknown datatype", "/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]}).encode(), {}, 400,
     "datatype 'FP8'"),
    ("wrong dtype for the model", "/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1, 32], "datatype": "INT64", "data": [1] * 32}]}).encode(),
     {}, 400, "must be FP32, got INT64"),
    ("wrong shape for the model", "/v2/models/keras/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(),
     {}, 400, "must have shape"),
    ("shape vs data length", "/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1, 32], "datatype": "FP32", "data": [1.0] * 31}]}).encode(),
     {}, 400, "needs 32 values, data has 31"),
    ("ragged nested data", "/v2/models/mlp/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1.0], [2.0, 3.0]]}]
    }).encode(), {}, 400, "needs 4 values"),
    ("wrong input name", "/v2/models/keras/infer", json.dumps({"inputs": [
        {"name": "y", "shape": [1, 32], "datatype": "FP32", "data": [1.0] * 32}]}).encode(),
     {}, 400, r"takes inputs \['x'\]"),
    ("binary sizes that do not add up", "/v2/models/mlp/infer", *binary_body(
        {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32",
                     "parameters": {"binary_data_size": 128}}]}, X.tobytes() + b"extra"),
     400, "declare 128 bytes in all but 133"),
    ("binary size vs shape", "/v2/models/mlp/infer", *binary_body(
        {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32",
                     "parameters": {"binary_data_size": 64}}]}, X.tobytes()[:64]),
     400, "needs 128 bytes"),
    ("unknown model", "/v2/models/nope/infer", b"{}", {}, 404, UNKNOWN_NOPE),
    ("unknown version", "/v2/models/mlp/versions/7/infer", b"{}", {}, 404,
     "version 7 is not found"),
    ("unknown model metadata", "/v2/models/nope", None, {}, 404, UNKNOWN_NOPE),
    ("unknown route", "/v3/anything", None, {}, 404, "no route"),
    ("model raised", "/v2/models/faulty/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode(), {}, 500,
     "^ValueError: the model refuses this input$"),
    ("request timeout", "/v2/models/sleepy/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [5.0]}]}).encode(), {}, 504,
     "timeout of 1.5 s"),
]


@pytest.mark.parametrize("path, body, headers, status, match", [c[1:] for c in ERRORS],
                         ids=[c[0] for c in ERRORS])
def test_error_table(server, client, path, body, headers, status, match):
    import re

    if body is None:
        got, response_headers, raw = server.get(path, headers)
    else:
        got, response_headers, raw = server.post(path, body, headers)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert re.search(match, error), error
    assert "Traceback" not in error and '.py"' not in error  # no internals without --debug
    assert_still_serves(client)


def test_oversize_body_is_refused_before_it_is_read(server, client):
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")  # and never a byte of the body
        response = b""
        while b"\r\n\r\n" not in response or not response.endswith(b"}"):
            chunk = sock.recv(65536)  # the headers and the body may come in two segments
            if not chunk:
                break
            response += chunk
        response = response.decode()
    assert response.startswith("HTTP/1.1 413") and "max-request-bytes" in response
    assert_still_serves(client)


def test_queue_full_is_503_with_retry_after(server, client):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                   "data": [0.2]}]}).encode()
    results = []
    # the error table's timeout case aborted sleepy's worker: wait for its replacement,
    # or the 503s below would be "not ready" ones
    assert wait_until(lambda: server.get("/v2/models/sleepy/ready")[0] == 200, 60)

    def call():
        results.append(server.post("/v2/models/sleepy/infer", body))

    threads = [threading.Thread(target=call) for _ in range(10)]  # 2 in the worker, 1 queued
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(status for status, _, _ in results)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in results if r[0] == 503)
    assert refused[1]["retry-after"] == "1" and "max_queue" in json.loads(refused[2])["error"]
    assert_still_serves(client)


# -- metrics ---------------------------------------------------------------------------------
def test_prometheus_metrics_parse_and_count(server, client):
    before = metric_samples(server)
    server.post("/v2/models/nope/infer", b"{}")  # not a model: not counted per model
    assert server.post("/v2/models/mlp/infer", b"{bad")[0] == 400
    assert_still_serves(client)
    after = metric_samples(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("workerpool_requests_total", model="mlp", outcome="bad_request",
                 protocol="kserve_http") == 1
    assert delta("workerpool_requests_total", model="mlp", outcome="success",
                 protocol="kserve_http") == 1
    assert delta("workerpool_request_duration_seconds_count", model="mlp",
                 protocol="kserve_http") == 2
    assert delta("workerpool_compute_duration_seconds_count", model="mlp", version="1") == 1
    mlp_1 = (("model", "mlp"), ("version", "1"))
    assert after[("workerpool_live_workers", mlp_1)] == 1
    assert after[("workerpool_model_ready", (("model", "keras"), ("version", "1")))] == 1
    status = json.loads(server.get("/status")[2])
    mlp = next(m for m in status["models"] if m["name"] == "mlp")
    assert after[("workerpool_weights_shared_bytes", mlp_1)] == mlp["model_bytes"]
    (pid,) = [w["pid"] for w in mlp["workers"]]
    pss = after[("workerpool_worker_pss_bytes", tuple(sorted((*mlp_1, ("pid", str(pid))))))]
    assert 0 < pss < 1024 * MIB
    # the one successful request: one predict call of 2 rows
    assert delta("workerpool_batch_size_count", model="mlp", version="1") == 1
    assert delta("workerpool_batch_size_sum", model="mlp", version="1") == 2
    assert delta("workerpool_batch_size_bucket", model="mlp", version="1", le="1.0") == 0
    assert delta("workerpool_batch_size_bucket", model="mlp", version="1", le="2.0") == 1


def metric_samples(server) -> dict:
    status, headers, raw = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# -- start-up, security, broken pools and shutdown: servers of their own ---------------------
def test_live_at_once_ready_when_loaded_then_503_when_broken(tmp_path):
    marker = tmp_path / "armed"
    server = Server(["serve_models:slow_numbers", "--predict", "serve_models:sleep_then_echo",
                     "--name", "slow", "--workers", "1"],
                    env={"SLOW_LOAD_S": "4", "UNATTACHABLE_ONCE": str(marker)})

    def zygote_pid():  # (the page also works while a new zygote's workers start)
        return json.loads(server.get("/status")[2])["models"][0]["zygote_pid"]

    try:
        assert server.get("/v2/health/live")[0] == 200  # at once
        assert server.get("/v2/health/ready")[0] == 503
        assert server.get("/v2/models/slow/ready")[0] == 503
        body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                       "data": [0.0]}]}).encode()
        status, headers, raw = server.post("/v2/models/slow/infer", body)
        assert status == 503 and "loading" in json.loads(raw)["error"] and \
            "retry-after" in headers
        server.wait_ready()
        assert server.post("/v2/models/slow/infer", body)[0] == 200
        first = zygote_pid()
        os.kill(first, signal.SIGKILL)  # a new zygote takes its place
        assert wait_until(lambda: zygote_pid() not in (first, None) and
                          server.post("/v2/models/slow/infer", body)[0] == 200, 30)
        marker.touch()
        os.kill(zygote_pid(), signal.SIGKILL)  # and now no new one can attach the model
        assert wait_until(lambda: server.get("/v2/models/slow/ready")[0] == 503, 30)
        assert server.get("/v2/health/ready")[0] == 503

        def broken():  # after its tries at a new zygote (503 "no ready worker" meanwhile)
            status, _, raw = server.post("/v2/models/slow/infer", body)
            assert status == 503
            return "broken" in json.loads(raw)["error"] and json.loads(raw)["error"]
        assert wait_until(broken, 30)
        assert "zygote died and 3 new ones failed to start" in broken()
        assert server.get("/v2/models/slow/ready")[0] == 503
        assert server.get("/v2/health/live")[0] == 200
    finally:
        assert server.stop() == 0


def test_api_key_guards_everything_but_health():
    server = Server(["--api-key", "s3cret", "--workers", "1", "--metrics-port", "0"],
                    metrics_line=True)  # the built-in demo model
    try:
        server.wait_ready()
        assert server.get("/v2/health/live")[0] == 200
        assert server.get("/v2/models/demo")[0] == 401
        assert server.get("/metrics")[0] == 401
        # --metrics-port: its bound port printed, the key asked there too, nothing else served
        assert request("GET", server.metrics_url)[0] == 401
        status, _, raw = request("GET", server.metrics_url, headers={"X-API-Key": "s3cret"})
        assert status == 200 and b"workerpool_requests_total" in raw
        metrics_root = server.metrics_url.removesuffix("/metrics")
        assert request("GET", metrics_root + "/v2/health/live")[0] == 200
        assert request("GET", metrics_root + "/v2/models/demo",
                       headers={"X-API-Key": "s3cret"})[0] == 404
        assert server.get("/status", {"Authorization": "Bearer wrong"})[0] == 401
        assert server.get("/v2/models/demo", {"Authorization": "Bearer s3cret"})[0] == 200
        assert server.get("/v2/models/demo", {"X-API-Key": "s3cret"})[0] == 200
        client = triton.InferenceServerClient(server.address)
        tensor = triton.InferInput("features", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        with pytest.raises(InferenceServerException, match="API key"):
            client.infer("demo", [tensor])
        result = client.infer("demo", [tensor], headers={"Authorization": "Bearer s3cret"})
        assert result.as_numpy("probabilities").shape == (1, 10)
        client.close()
    finally:
        assert server.stop() == 0


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0():
    server = Server(["serve_models:numbers", "--predict", "serve_models:sleep_then_echo",
                     "--name", "numbers", "--workers", "2", "--drain-timeout", "30"])
    server.wait_ready()
    status_report = json.loads(server.get("/status")[2])
    pids = [server.process.pid, status_report["models"][0]["zygote_pid"],
            *[w["pid"] for w in status_report["models"][0]["workers"]]]
    assert_sigterm_drains_under_load(server, pids)


def assert_sigterm_drains_under_load(server, pids: list[int]) -> None:
    """8 clients call the ``numbers`` model (0.3 s each) on new connections; SIGTERM once
    they are answered: every accepted request must be answered (200), the server exit 0,
    and every process of ``pids`` end."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                   "data": [0.3]}]}).encode()
    answered, stop = [], threading.Event()

    def client_loop():
        while not stop.is_set():
            connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
            try:
                connection.request("POST", "/v2/models/numbers/infer", body)
                response = connection.getresponse()
                answered.append((response.status, response.read()))
            except (ConnectionError, OSError):
                pass  # not accepted: the server had stopped listening
            finally:
                connection.close()

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(answered) >= 8, 60)
    server.process.send_signal(signal.SIGTERM)
    code = server.stop()
    stop.set()
    for thread in threads:
        thread.join()
    assert code == 0
    assert answered and all(status == 200 for status, _ in answered), \
        [a for a in answered if a[0] != 200][:3]
    assert wait_until(lambda: not any(is_running(pid) for pid in pids), 10)


def test_sigterm_while_a_model_loads_exits_0_and_leaves_nothing():
    server = Server(["serve_models:slow_numbers", "--predict", "serve_models:sleep_then_echo",
                     "--workers", "1"], env={"SLOW_LOAD_S": "2"})
    assert server.get("/v2/health/ready")[0] == 503
    assert server.stop() == 0


def assert_swaps_under_traffic_fail_nothing(server, files, model: str = "lin") -> None:
    """Three callers of ``model`` (serve_models.save_version's weights) while the
    repository swaps it to files/v2.pt, then v3.pt: no request fails, and none sent after
    a swap's answer is answered by an older version."""
    clients = [triton.InferenceServerClient(server.address, network_timeout=120)
               for _ in range(3)]

    def call(i):
        tensor = triton.InferInput("input_0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        return version_of(clients[i].infer(model, [tensor]).as_numpy("output_0"))

    try:
        with Traffic(call, 3, floor=1) as traffic:
            for version in (2, 3):
                time.sleep(0.3)
                status, _, raw = server.post(
                    f"/v2/repository/models/{model}/load",
                    json.dumps({"parameters": {"source": str(files / f"v{version}.pt")}})
                    .encode())
                assert status == 200, raw
                traffic.floor = version
            time.sleep(0.3)
        assert not traffic.failures, traffic.failures[:3]
        assert all(answer >= floor for floor, answer in traffic.answers), \
            "a request sent after a swap was answered by the old version"
        assert 3 in {answer for _, answer in traffic.answers}
    finally:
        for client in clients:
            client.close()
