"""`workerpool serve --http-workers N`: several HTTP front-end processes, one set of pools.

Real server processes on 127.0.0.1 called with tritonclient.http, urllib and raw sockets.
The module's server runs two front ends; each test says what must hold with them as with
one process: outputs equal to the in-process model, dynamic batching, deadlines, metrics
(errors met in a front end included), the status page, hot swaps and worker kills under
traffic without a failed request, a killed front end replaced, the API key, and a clean
stop (SIGTERM drains; SIGKILL of the server leaves no front end and no relay directory:
conftest's leak check).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
import torch
import tritonclient.http as triton

import modelzoo
from serve_models import save_version
from test_serve import (Server, assert_sigterm_drains_under_load,
                        assert_swaps_under_traffic_fail_nothing, infer, metric_samples)
from testkit import Traffic, is_running, wait_until

pytestmark = pytest.mark.module_pool

CONFIG = textwrap.dedent("""
    [server]
    http_workers = 2
    max_request_bytes = 1048576
    drain_timeout = 20

    [models.mlp]
    source = "modelzoo:mlp"
    workers = 2
    max_batch_size = 4

    [models.lin]
    source = "{lin}"
    builder = "serve_models:linear"
    workers = 1

    [models.sleepy]
    source = "serve_models:numbers"
    predict = "serve_models:sleep_then_echo"
    workers = 1
    timeout = 1.0

    [models.words]
    source = "serve_models:numbers"
    predict = "serve_models:texts"
    workers = 1
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("http-workers")
    for version in (1, 2, 3):
        save_version(directory / f"v{version}.pt", version)
    (directory / "serve.toml").write_text(CONFIG.format(lin=directory / "v1.pt"))
    return directory


@pytest.fixture(scope="module")
def server(files):
    server = Server(["--config", str(files / "serve.toml"), "--allow-source", str(files)])
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0


def front_ends(server) -> list[int]:
    return json.loads(server.get("/status")[2])["server"]["http_workers"]["pids"]


def connections_of(pids: list[int], port: int) -> dict[int, int]:
    """Established connections to ``port`` each process holds."""
    return {pid: sum(1 for c in psutil.Process(pid).net_connections("tcp")
                     if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            for pid in pids}


def reference(x: np.ndarray) -> np.ndarray:
    return modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict,
                              torch.from_numpy(x)).numpy()


def test_two_front_ends_accept_on_the_one_port_and_answer_as_the_model_does(server):
    pids = front_ends(server)
    assert len(pids) == 2
    assert all(psutil.Process(pid).ppid() == server.process.pid for pid in pids)
    assert not connections_of([server.process.pid], server.port)[server.process.pid]
    # connections land on both front ends (SO_REUSEPORT: the kernel spreads them)
    clients = []
    try:
        while not all(connections_of(pids, server.port).values()):
            assert len(clients) < 64, connections_of(pids, server.port)
            client = triton.InferenceServerClient(server.address)
            clients.append(client)
            x = np.random.default_rng(len(clients)).standard_normal((2, 32)).astype(np.float32)
            binary = len(clients) % 2 == 0
            got = infer(client, "mlp", x, binary).as_numpy("output_0")
            assert np.array_equal(got, reference(x))
        # and right when callers are concurrent: the one pool batches rows of requests from
        # both front ends (a batch's matmul may round differently in the last bits)
        failures: list = []

        def calls(cases):
            client = triton.InferenceServerClient(server.address)  # (one per thread: gevent)
            try:
                for i, (x, want) in enumerate(cases):
                    got = infer(client, "mlp", x, binary=i % 2 == 0).as_numpy("output_0")
                    if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                        failures.append(("wrong answer", x, got, want))
            except Exception as exc:  # noqa: BLE001 - the test's to report
                failures.append(exc)
            finally:
                client.close()

        # (references made here: modelzoo.mlp() seeds torch's global generator, not
        # something to race in threads)
        rng = np.random.default_rng(100)
        inputs = [[rng.standard_normal((1 + i % 3, 32)).astype(np.float32) for i in range(10)]
                  for _ in range(8)]
        cases = [[(x, reference(x)) for x in thread_inputs] for thread_inputs in inputs]
        threads = [threading.Thread(target=calls, args=(c,)) for c in cases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]
    finally:
        for client in clients:
            client.close()


def test_bytes_tensors_and_tf_serving_rest_through_a_front_end(server):
    client = triton.InferenceServerClient(server.address)
    try:
        words = np.array([b"alpha", "\u03b3".encode()], dtype=np.object_)
        tensor = triton.InferInput("text", [2], "BYTES")
        tensor.set_data_from_numpy(words, binary_data=True)
        result = client.infer("words", [tensor], outputs=[
            triton.InferRequestedOutput("upper", binary_data=True),
            triton.InferRequestedOutput("length", binary_data=False)])
        assert result.as_numpy("upper").tolist() == [b"ALPHA", "\u03b3".encode()]
        assert result.as_numpy("length").tolist() == [5, 2]
    finally:
        client.close()
    # TF Serving's REST API is relayed whole to the server's own process
    x = np.random.default_rng(5).standard_normal((2, 32)).astype(np.float32)
    status, _, raw = server.post("/v1/models/mlp:predict",
                                 json.dumps({"instances": x.tolist()}).encode())
    assert status == 200
    assert np.allclose(np.array(json.loads(raw)["predictions"], np.float32), reference(x),
                       rtol=1e-6, atol=1e-6)


def test_errors_reach_the_caller_and_the_metrics_count_them(server):
    def count(outcome: str) -> float:
        return metric_samples(server).get(
            ("workerpool_requests_total", (("model", "mlp"), ("outcome", outcome),
                                           ("protocol", "kserve_http"))), 0.0)

    before = {o: count(o) for o in ("success", "bad_request", "not_found")}
    # decoded in a front end: malformed JSON, a wrong datatype
    status, _, raw = server.post("/v2/models/mlp/infer", b"{not json")
    assert status == 400 and b"not valid JSON" in raw
    wrong = {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32",
                         "data": ["a"] * 32}]}
    status, _, raw = server.post("/v2/models/mlp/infer", json.dumps(wrong).encode())
    assert status == 400, raw
    # met in the server: the model's own error (a shape it cannot take), an unknown model,
    # an unknown output
    bad_shape = {"inputs": [{"name": "x", "shape": [1, 31], "datatype": "FP32",
                             "data": [0.0] * 31}]}
    status, _, raw = server.post("/v2/models/mlp/infer", json.dumps(bad_shape).encode())
    assert status == 500 and b"cannot be multiplied" in raw, raw
    status, _, raw = server.post("/v2/models/nope/infer", json.dumps(bad_shape).encode())
    assert status == 404 and b"nope" in raw
    # an unknown model (or version) is a 404 whatever its body, as in the server's process
    status, _, raw = server.post("/v2/models/nope/infer", b"{not json")
    assert status == 404 and b"nope" in raw, raw
    status, _, raw = server.post("/v2/models/mlp/versions/9/infer", b"{not json")
    assert status == 404, raw
    good = {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32",
                        "data": [0.5] * 32}]}
    status, _, raw = server.post("/v2/models/mlp/infer", json.dumps(good).encode())
    assert status == 200
    unknown_output = {**good, "outputs": [{"name": "nothing"}]}
    status, _, raw = server.post("/v2/models/mlp/infer", json.dumps(unknown_output).encode())
    assert status == 400 and b"nothing" in raw
    # the counts are the server's (the front end's own errors sent to it, no answer
    # awaited): read until they arrived
    assert wait_until(lambda: count("bad_request") - before["bad_request"] == 3, 10), \
        count("bad_request") - before["bad_request"]
    assert count("success") - before["success"] == 1


def test_a_deadline_holds_through_a_front_end(server):
    body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [3.0]}]}
    started = time.monotonic()
    status, _, raw = server.post("/v2/models/sleepy/infer", json.dumps(body).encode())
    assert status == 504, raw
    assert time.monotonic() - started < 3.0  # answered at the model's timeout, not after
    # the overrunning worker was aborted; its replacement answers
    body["inputs"][0]["data"] = [0.0]
    assert wait_until(lambda: server.post("/v2/models/sleepy/infer",
                                          json.dumps(body).encode())[0] == 200, 30)


def test_status_page_metadata_and_health_are_the_server_s(server):
    status, headers, page = server.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/status" in page
    report = json.loads(server.get("/status")[2])
    assert report["server"]["pid"] == server.process.pid
    assert {m["name"] for m in report["models"]} == {"mlp", "lin", "sleepy", "words"}
    status, _, raw = server.get("/v2/models/words")
    assert status == 200 and json.loads(raw)["name"] == "words"
    assert server.get("/v2/health/ready")[0] == 200
    assert server.get("/v2/models/nope")[0] == 404


def test_worker_kills_under_traffic_fail_no_request(server):
    clients = [triton.InferenceServerClient(server.address, network_timeout=120)
               for _ in range(4)]
    x = np.random.default_rng(9).standard_normal((1, 32)).astype(np.float32)
    want = reference(x)

    def call(i):  # (batched with the other callers' rows: the last bits may differ)
        return np.allclose(infer(clients[i], "mlp", x, binary=True).as_numpy("output_0"),
                           want, rtol=1e-5, atol=1e-6)

    def workers():
        report = json.loads(server.get("/status")[2])
        mlp = next(m for m in report["models"] if m["name"] == "mlp")
        return [w["pid"] for w in mlp["workers"] if w["state"] != "starting"]

    try:
        with Traffic(call, 4) as traffic:
            for _ in range(3):
                assert wait_until(lambda: len(traffic.answers) > 20, 60)
                victim = workers()[0]
                os.kill(victim, signal.SIGKILL)
                assert wait_until(lambda: victim not in workers() and len(workers()) == 2, 60)
                traffic.answers.clear()
            assert wait_until(lambda: len(traffic.answers) > 20, 60)
        assert not traffic.failures, traffic.failures[:3]
        assert all(ok for _, ok in traffic.answers)
    finally:
        for client in clients:
            client.close()


def test_hot_swaps_under_traffic_through_front_ends_fail_nothing(server, files):
    # the repository calls are relayed to the server's own process
    assert_swaps_under_traffic_fail_nothing(server, files)


def test_a_killed_front_end_is_replaced_and_its_replacement_serves(server):
    before = front_ends(server)
    os.kill(before[0], signal.SIGKILL)
    # Until it is reaped, a connection the kernel hashed to its socket is reset with it:
    # its first thread is a zombie while the others still exit and hold its fds open
    # (measured: resets 3-11 ms after the zombie state, none after reaping)
    assert wait_until(lambda: not psutil.pid_exists(before[0]), 10)
    assert wait_until(lambda: len(front_ends(server)) == 2 and before[0] not in
                      front_ends(server), 30), front_ends(server)
    after = front_ends(server)
    assert json.loads(server.get("/status")[2])["server"]["http_workers"]["restarts"] >= 1
    # the new one answers: open connections until one lands on it
    replacement = (set(after) - set(before)).pop()
    connections = []
    try:
        while not connections_of([replacement], server.port)[replacement]:
            assert len(connections) < 64
            connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
            connection.request("GET", "/v2/health/ready")
            assert connection.getresponse().read() == b'{"ready": true}'
            connections.append(connection)
    finally:
        for connection in connections:
            connection.close()


# -- servers of their own --------------------------------------------------------------------
NUMBERS = ["serve_models:numbers", "--predict", "serve_models:sleep_then_echo", "--name",
           "numbers", "--workers", "2", "--http-workers", "2"]


def relay_socket_of(pid: int) -> str:
    (path,) = {c.laddr for c in psutil.Process(pid).net_connections("unix")
               if c.laddr.endswith("relay.sock")}  # (the listener and its accepted ends)
    return path


def test_the_api_key_is_asked_by_the_front_ends_and_by_what_they_relay():
    server = Server([*NUMBERS, "--api-key", "s3cret"])
    try:
        server.wait_ready()
        body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                       "data": [0.0]}]}).encode()
        assert server.post("/v2/models/numbers/infer", body)[0] == 401
        assert server.get("/status")[0] == 401
        assert server.get("/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        assert server.get("/v2/health/live")[0] == 200
        key = {"X-API-Key": "s3cret"}
        status, _, raw = server.post("/v2/models/numbers/infer", body, key)
        assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [0.0]
        assert server.get("/status", {"Authorization": "Bearer s3cret"})[0] == 200
        # refused before the body is read, on infer and on what is relayed: a client
        # without the key cannot make a front end take --max-request-bytes
        for path in ("/v2/models/numbers/infer", "/v2/repository/index"):
            with socket.create_connection((server.host, server.port), timeout=30) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                             "Content-Length: 60000000\r\n\r\n".encode())  # no body
                assert sock.recv(65536).startswith(b"HTTP/1.1 401"), path
    finally:
        assert server.stop() == 0


def test_sigterm_under_load_answers_every_accepted_request_and_reaps_the_front_ends():
    server = Server([*NUMBERS, "--drain-timeout", "30"])
    server.wait_ready()
    report = json.loads(server.get("/status")[2])
    pids = [server.process.pid, *report["server"]["http_workers"]["pids"],
            report["models"][0]["zygote_pid"],
            *[w["pid"] for w in report["models"][0]["workers"]]]
    relay_dir = os.path.dirname(relay_socket_of(server.process.pid))
    assert_sigterm_drains_under_load(server, pids)
    assert not os.path.exists(relay_dir)


def test_a_killed_server_takes_its_front_ends_and_relay_directory_with_it():
    server = Server(NUMBERS)
    server.wait_ready()
    fronts = json.loads(server.get("/status")[2])["server"]["http_workers"]["pids"]
    relay_dir = os.path.dirname(relay_socket_of(server.process.pid))
    server.kill()
    assert wait_until(lambda: not any(is_running(pid) for pid in fronts), 10)
    assert wait_until(lambda: not os.path.exists(relay_dir), 10)


def test_http_workers_must_be_a_positive_number():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "workerpool", "serve", "--http-workers",
                           "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "http_workers must be a positive integer" in done.stderr
