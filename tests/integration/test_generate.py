"""Streaming over the network and cancellation when the client leaves: a real
`workerpool serve`, Triton's generate extension read by a real server-sent events client
(sseclient over requests), raw sockets that hang up, and tritonclient.grpc deadlines.

What ran in the workers is seen from inside them: the traced models (tests/serve_models.py)
leave a file per call or per item in $TRACE_DIR, and one when a generator got GeneratorExit.
"""

from __future__ import annotations

import http.client
import json
import os
import textwrap
import threading
import time

import numpy as np
import pytest
import requests
import sseclient
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from test_serve import Server
from testkit import wait_until
from workerpool.pool.streams import WINDOW
from workerpool.serve import demo_generator

pytestmark = pytest.mark.module_pool

TEXT_SPECS = """
inputs = [{name = "text_input", datatype = "BYTES", shape = [1]},
          {name = "max_tokens", datatype = "INT32", shape = [1]}]
outputs = [{name = "text_output", datatype = "BYTES", shape = [1]}]
"""
CONFIG = textwrap.dedent("""
    [server]
    grpc_port = 0

    [models.textgen]
    source = "workerpool.serve.demo_generator:load"
    predict = "workerpool.serve.demo_generator:predict"
    workers = 1
    {specs}

    [models.slowtext]
    source = "workerpool.serve.demo_generator:load"
    predict = "serve_models:traced_characters"
    workers = 1
    {specs}

    [models.sleepy]
    source = "serve_models:numbers"
    predict = "serve_models:traced_sleep"
    workers = 1
""").format(specs=TEXT_SPECS.strip())


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trace")


@pytest.fixture
def trace(trace_dir, server):
    """The server's $TRACE_DIR, emptied of earlier tests' traces."""
    for name in os.listdir(trace_dir):
        os.remove(trace_dir / name)
    return trace_dir


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-front-ends"])
def server(request, tmp_path_factory, trace_dir):
    """The server in one process, then with two HTTP front ends (--http-workers 2: the
    streams and the cancellations cross the relay)."""
    config = tmp_path_factory.mktemp("generate") / "serve.toml"
    config.write_text(CONFIG)
    server = Server(["--config", str(config), "--http-workers", str(request.param)],
                    env={"TRACE_DIR": str(trace_dir)}, grpc_lines=1)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.stderr()


def generate_body(prompt: str, max_tokens: int) -> dict:
    return {"text_input": prompt, "max_tokens": max_tokens}


def read_stream(server, model: str, body: dict) -> list[dict]:
    response = requests.post(f"{server.url}/v2/models/{model}/generate_stream", json=body,
                             stream=True, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream"
    return [json.loads(event.data) for event in sseclient.SSEClient(response).events()]


def test_generate_stream_over_sse_equals_the_generator_in_process(server):
    events = read_stream(server, "textgen", generate_body("Once upon", 60))
    assert len(events) == 60
    assert all(e["model_name"] == "textgen" and e["model_version"] == "1" for e in events)
    assert "".join(e["text_output"] for e in events) == demo_generator.complete("Once upon", 60)


def test_generate_answers_once_and_versions_route(server):
    response = requests.post(f"{server.url}/v2/models/textgen/versions/1/generate",
                             json=generate_body("hello", 1), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == {"model_name": "textgen", "model_version": "1",
                               "text_output": demo_generator.complete("hello", 1)}
    response = requests.post(f"{server.url}/v2/models/textgen/generate",
                             json=generate_body("hello", 3), timeout=60)
    assert response.status_code == 400
    assert "generate_stream" in response.json()["error"]


@pytest.mark.parametrize("body, status, says", [
    (b'{"text_input": "x"}', 400, "max_tokens"),
    (b'{"text_input": "x", "max_tokens": "many"}', 400, "max_tokens"),
    (b'{"text_input": ', 400, "JSON"),
    (b'["x", 3]', 400, "JSON object"),
    (json.dumps(generate_body("x", 5000)).encode(), 500, "max_tokens must be"),
])
def test_generate_stream_errors_before_the_first_item_are_plain_answers(server, body, status,
                                                                        says):
    code, headers, answer = server.post("/v2/models/textgen/generate_stream", body,
                                        {"Content-Type": "application/json"})
    assert code == status, answer
    assert {k.lower(): v for k, v in headers.items()}["content-type"] == "application/json"
    assert says in json.loads(answer)["error"]
    assert server.post("/v2/models/nothere/generate_stream", body)[0] == 404
    assert len(read_stream(server, "textgen", generate_body("ok", 3))) == 3


def test_an_sse_client_that_hangs_up_stops_the_generator_in_its_worker(server, trace):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.request("POST", "/v2/models/slowtext/generate_stream",
                       json.dumps(generate_body("gone", 4000)),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    events = 0
    while events < 3:
        if response.fp.readline().startswith(b"data: "):
            events += 1
    connection.close()  # the client goes away mid-stream
    assert wait_until(lambda: (trace / "exit-gone").exists(), 30), server.stderr()
    made = sum(name.startswith("item-gone-") for name in os.listdir(trace))
    assert made < 3 + WINDOW + 5  # stopped within a few items, not 4000 (80 s of them)
    # its worker (the model's only one) is free for the next stream
    events = read_stream(server, "slowtext", generate_body("next", 5))
    assert len(events) == 5


def infer_body(seconds: float, tag: int) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                   "data": [seconds, tag]}]}).encode()


def run_in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    return thread, result


def test_an_http_client_that_hangs_up_while_queued_is_never_run(server, trace):
    busy, answer = run_in_thread(lambda: server.post("/v2/models/sleepy/infer",
                                                     infer_body(1.5, 101)))
    assert wait_until(lambda: (trace / "call-101").exists(), 30)
    # the worker's second credit: this one waits in the worker, the next in the server
    behind, _ = run_in_thread(lambda: server.post("/v2/models/sleepy/infer",
                                                  infer_body(0, 104)))
    time.sleep(0.2)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.request("POST", "/v2/models/sleepy/infer", infer_body(0, 102),
                       {"Content-Type": "application/json"})
    time.sleep(0.3)  # queued behind call 101 in the server
    connection.close()  # the client goes away before its answer
    busy.join(60)
    behind.join(60)
    assert answer["value"][0] == 200
    assert (trace / "call-104").exists()
    assert server.post("/v2/models/sleepy/infer", infer_body(0, 103))[0] == 200
    assert (trace / "call-103").exists()
    assert not (trace / "call-102").exists()  # never sent to the worker


def test_a_grpc_call_whose_deadline_passes_while_queued_is_never_run(server, trace):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])

    def call(seconds, tag, timeout=None):
        tensor = triton_grpc.InferInput("x", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.array([[seconds, tag]], np.float32))
        return client.infer("sleepy", [tensor], client_timeout=timeout)

    busy, answer = run_in_thread(lambda: call(1.5, 201))
    assert wait_until(lambda: (trace / "call-201").exists(), 30)
    behind, _ = run_in_thread(lambda: call(0, 204))  # waits in the worker
    time.sleep(0.2)
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        call(0, 202, timeout=0.3)
    busy.join(60)
    behind.join(60)
    assert (trace / "call-204").exists()
    assert answer["value"].as_numpy("output_0").reshape(-1)[1] == 201
    assert call(0, 203).as_numpy("output_0").reshape(-1)[1] == 203
    assert not (trace / "call-202").exists()  # never sent to the worker
    client.close()


# -- gRPC: Triton's ModelStreamInfer through tritonclient.grpc's stream --------------------
def text_inputs(prompt: str, max_tokens: int) -> list:
    text = triton_grpc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    count = triton_grpc.InferInput("max_tokens", [1], "INT32")
    count.set_data_from_numpy(np.array([max_tokens], np.int32))
    return [text, count]


def test_tritonclient_grpc_stream_equals_the_generator_in_process(server):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
    results, done = [], threading.Event()

    def callback(result, error):
        results.append((result, error))
        if error is not None or result.get_response().parameters[
                "triton_final_response"].bool_param:
            done.set()

    client.start_stream(callback)
    try:
        client.async_stream_infer("textgen", text_inputs("Once upon", 40), request_id="a",
                                  enable_empty_final_response=True)
        assert done.wait(60)
        done.clear()
        client.async_stream_infer("textgen", text_inputs("x", 5000), request_id="b")
        assert done.wait(60)
    finally:
        client.stop_stream()
        client.close()
    first = [r for r, e in results if r is not None and r.get_response().id == "a"]
    text = "".join(r.as_numpy("text_output")[0].decode() for r in first[:-1])
    assert text == demo_generator.complete("Once upon", 40)
    assert first[-1].get_response().parameters["triton_final_response"].bool_param
    assert first[-1].as_numpy("text_output") is None  # the empty final response
    errors = [e for r, e in results if e is not None]
    assert len(errors) == 1 and "max_tokens must be" in str(errors[0])


def test_a_grpc_stream_the_client_cancels_stops_the_generator(server, trace):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
    got = []
    client.start_stream(lambda result, error: got.append((result, error)))
    try:
        client.async_stream_infer("slowtext", text_inputs("grpcgone", 4000))
        assert wait_until(lambda: len(got) >= 3, 30)
    finally:
        client.stop_stream(cancel_requests=True)  # the client ends the call mid-stream
        client.close()
    assert wait_until(lambda: (trace / "exit-grpcgone").exists(), 30), server.stderr()
    made = sum(name.startswith("item-grpcgone-") for name in os.listdir(trace))
    assert made < len(got) + WINDOW + 5


def test_grpc_repository_index_unload_and_load(server):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
    try:
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index["textgen"] == "READY"
        client.unload_model("sleepy")
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        assert index["sleepy"] == "UNAVAILABLE"
        assert not client.is_model_ready("sleepy")
        client.load_model("sleepy")
        assert client.is_model_ready("sleepy")
        with pytest.raises(InferenceServerException, match="NOT_FOUND|no model"):
            client.load_model("nothere")
    finally:
        client.close()
