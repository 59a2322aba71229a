"""`inline = true` (serving/inline.py): a light model called in the server's own process.

Real server processes on 127.0.0.1, called with tritonclient (HTTP JSON and binary, gRPC)
and urllib. What must hold: answers equal the in-process model and come from the server's
process, with no worker, zygote or runtime started; a model that raises or returns what
cannot be sent is a 500 and the server goes on; bad inputs are 400s; hot swaps under
traffic lose nothing and no request sent after a swap sees the old version; metrics and the
status page count it; with --http-workers the front ends relay to the process that calls
it; and an inline model asked to batch is refused at start with a message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
import requests
import sseclient
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import serve_models
from serve_models import save_version, version_of
from test_serve import Server, assert_swaps_under_traffic_fail_nothing, infer, metric_samples
from test_http_workers import front_ends
from test_serve_limits import BAD_OUTPUTS, json_infer
from testkit import wait_until
from workerpool.serve import demo_generator

pytestmark = pytest.mark.module_pool

CONFIG = textwrap.dedent("""
    [server]
    {server}

    [models.light]
    source = "serve_models:numbers"
    predict = "serve_models:scaled_with_pid"
    inline = true
    inputs = [{{name = "x", datatype = "FP32", shape = [-1, 4]}}]

    [models.lin]
    source = "{lin}"
    builder = "serve_models:linear"
    inline = true

    [models.refuses]
    source = "serve_models:numbers"
    predict = "serve_models:fail"
    inline = true

    [models.outputs]
    source = "serve_models:numbers"
    predict = "serve_models:misbehaving_output"
    inline = true

    [models.textgen]
    source = "workerpool.serve.demo_generator:load"
    predict = "workerpool.serve.demo_generator:predict"
    inline = true
    inputs = [{{name = "text_input", datatype = "BYTES", shape = [1]}},
              {{name = "max_tokens", datatype = "INT32", shape = [1]}}]
    outputs = [{{name = "text_output", datatype = "BYTES", shape = [1]}}]
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("inline")
    for version in (1, 2, 3):
        save_version(directory / f"v{version}.pt", version)
    return directory


def start(files, server_settings: str, *extra) -> Server:
    config = files / f"serve-{len(server_settings)}.toml"
    config.write_text(CONFIG.format(server=server_settings, lin=files / "v1.pt"))
    server = Server(["--config", str(config), "--allow-source", str(files), *extra],
                    grpc_lines=1 if "--grpc-port" in extra else 0)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(files):
    server = start(files, "", "--grpc-port", "0")
    yield server
    assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def fronted(files):
    server = start(files, "http_workers = 2")
    yield server
    assert server.stop() == 0, server.stderr()


def expected(x):
    return x * serve_models.numbers()["scale"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_answers_equal_the_model_computed_in_the_servers_own_process(server, binary):
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    with triton.InferenceServerClient(server.address) as client:
        answer = infer(client, "light", x, binary=binary)
    assert np.array_equal(answer.as_numpy("y"), expected(x))
    assert answer.as_numpy("pid").tolist() == [server.process.pid]
    with triton_grpc.InferenceServerClient(server.grpc["KServe v2"]) as client:
        tensor = triton_grpc.InferInput("x", [3, 4], "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer("light", [tensor])
    assert np.array_equal(answer.as_numpy("y"), expected(x))
    assert answer.as_numpy("pid").tolist() == [server.process.pid]
    # four models, none with a worker, a zygote, a loader or a runtime behind it
    assert psutil.Process(server.process.pid).children(recursive=True) == []


def test_a_torch_model_inline_answers_its_weights(server):
    with triton.InferenceServerClient(server.address) as client:
        tensor = triton.InferInput("input_0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert version_of(client.infer("lin", [tensor]).as_numpy("output_0")) == 1


def test_bad_inputs_are_400_and_the_model_is_not_called(server):
    before = metric_samples(server)
    for body in (json_infer("x", [1, 3], [1.0, 2.0, 3.0]),  # wrong shape
                 json_infer("x", [1, 4], [1, 2, 3, 4], "INT32"),  # wrong datatype
                 b'{"inputs": [{"name": "x", "shape": [1, 4]'):  # malformed JSON
        status, _, raw = server.post("/v2/models/light/infer", body)
        assert status == 400, raw
        assert json.loads(raw)["error"]
    after = metric_samples(server)
    calls = ("workerpool_compute_duration_seconds_count", (("model", "light"), ("version", "1")))
    assert after[calls] == before[calls]


def test_a_model_that_raises_is_a_500_with_its_message_and_the_server_goes_on(server):
    status, _, raw = server.post("/v2/models/refuses/infer", json_infer("x", [1], [1.0]))
    assert status == 500 and "the model refuses this input" in json.loads(raw)["error"], raw
    status, _, raw = server.post("/v2/models/light/infer",
                                 json_infer("x", [1, 4], [1.0, 1.0, 1.0, 1.0]))
    assert status == 200, raw


@pytest.mark.parametrize("choice, message", [c[1:] for c in BAD_OUTPUTS],
                         ids=[c[0] for c in BAD_OUTPUTS])
def test_an_output_that_cannot_be_sent_is_500_and_the_server_goes_on(server, choice, message):
    status, _, raw = server.post("/v2/models/outputs/infer", json_infer("x", [1], [choice]))
    assert status == 500 and message in json.loads(raw)["error"], raw
    with triton.InferenceServerClient(server.address) as client:
        tensor = triton.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.array([choice], np.float32), binary_data=True)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("outputs", [tensor])
    assert "500" in str(caught.value.status()) and message in caught.value.message()
    status, _, raw = server.post("/v2/models/outputs/infer", json_infer("x", [1], [7.0]))
    assert status == 200 and json.loads(raw)["outputs"][0]["data"] == [7.0], raw


@pytest.mark.parametrize("which", ["one process", "http workers"])
def test_a_generator_inline_streams_what_it_yields(request, which):
    server = request.getfixturevalue("server" if which == "one process" else "fronted")
    response = requests.post(f"{server.url}/v2/models/textgen/generate_stream",
                             json={"text_input": "Once upon", "max_tokens": 40}, stream=True,
                             timeout=60)
    assert response.status_code == 200, response.text
    events = [json.loads(event.data) for event in sseclient.SSEClient(response).events()]
    assert "".join(e["text_output"] for e in events) == demo_generator.complete("Once upon", 40)
    status, _, raw = server.post("/v2/models/textgen/infer", json.dumps({"inputs": [
        {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
        {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [3]}]}).encode())
    assert status == 500 and "generate_stream" in json.loads(raw)["error"], raw


def test_metrics_and_the_status_page_count_an_inline_model(server):
    before = metric_samples(server)
    x = np.ones((2, 4), np.float32)
    with triton.InferenceServerClient(server.address) as client:
        for _ in range(5):
            infer(client, "light", x, binary=True)
    after = metric_samples(server)
    calls = ("workerpool_compute_duration_seconds_count", (("model", "light"), ("version", "1")))
    assert after[calls] - before.get(calls, 0) == 5
    ok = ("workerpool_requests_total", (("model", "light"), ("outcome", "success"),
                                        ("protocol", "kserve_http")))
    assert after[ok] - before.get(ok, 0) == 5
    status, _, raw = server.get("/status")
    assert status == 200
    light = next(m for m in json.loads(raw)["models"] if m["name"] == "light")
    assert light["ready"] and light["workers_state"].startswith("inline") and \
        light["workers"] == [], light


@pytest.mark.parametrize("which", ["one process", "http workers"])
def test_hot_swaps_under_traffic_fail_nothing(request, files, which):
    server = request.getfixturevalue("server" if which == "one process" else "fronted")
    try:
        assert_swaps_under_traffic_fail_nothing(server, files)
    finally:
        status, _, raw = server.post(  # version 1 again, for the tests that follow
            "/v2/repository/models/lin/load",
            json.dumps({"parameters": {"source": str(files / "v1.pt")}}).encode())
        assert status == 200, raw


def light_answers_from(server, x, connections: int = 20) -> set[int]:
    """The pids that computed ``connections`` answers, each on a new connection (which the
    kernel spreads over the front ends); every answer checked."""
    pids = set()
    for _ in range(connections):
        with triton.InferenceServerClient(server.address) as client:
            answer = infer(client, "light", x, binary=True)
        assert np.array_equal(answer.as_numpy("y"), expected(x))
        pids.update(answer.as_numpy("pid").tolist())
    return pids


def test_through_http_workers_each_front_end_calls_its_own_copy(fronted):
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    fronts = set(front_ends(fronted))
    assert len(fronts) == 2
    pids = light_answers_from(fronted, x)
    assert pids <= fronts and fronted.process.pid not in pids, (pids, fronts)
    with triton.InferenceServerClient(fronted.address) as client:  # JSON too
        answer = infer(client, "light", x, binary=False)
    assert np.array_equal(answer.as_numpy("y"), expected(x))
    assert answer.as_numpy("pid").tolist()[0] in fronts


def settled_samples(server) -> dict:
    """The metrics once the front ends' tallies of earlier requests have arrived (two
    readings 0.3 s apart agree)."""
    samples = metric_samples(server)
    while True:
        time.sleep(0.3)
        again = metric_samples(server)
        counts = {k: v for k, v in again.items() if k[0] == "workerpool_requests_total"}
        if counts == {k: v for k, v in samples.items() if k[0] == "workerpool_requests_total"}:
            return again
        samples = again


def test_front_ends_requests_are_counted_by_the_server(fronted):
    before = settled_samples(fronted)
    x = np.ones((2, 4), np.float32)
    with triton.InferenceServerClient(fronted.address) as client:
        for _ in range(7):
            answer = infer(client, "light", x, binary=True)
    assert answer.as_numpy("pid").tolist()[0] != fronted.process.pid
    status, _, _ = fronted.post("/v2/models/refuses/infer", json_infer("x", [1], [1.0]))
    assert status == 500
    ok = ("workerpool_requests_total", (("model", "light"), ("outcome", "success"),
                                        ("protocol", "kserve_http")))
    failed = ("workerpool_requests_total", (("model", "refuses"), ("outcome", "error"),
                                            ("protocol", "kserve_http")))
    calls = ("workerpool_compute_duration_seconds_count", (("model", "light"),
                                                           ("version", "1")))

    def counted():
        after = metric_samples(fronted)
        return (after.get(ok, 0) - before.get(ok, 0), after.get(failed, 0)
                - before.get(failed, 0), after.get(calls, 0) - before.get(calls, 0))

    assert wait_until(lambda: counted() == (7, 1, 7), 10), counted()
    status, _, raw = fronted.get("/v2/models/light/versions/1/stats")
    assert status == 200
    stats = json.loads(raw)["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 7


def test_a_killed_front_end_is_replaced_and_its_replacement_holds_the_model(fronted):
    x = np.ones((1, 4), np.float32)
    old = set(front_ends(fronted))
    victim = min(old)
    os.kill(victim, signal.SIGKILL)
    # (until it is reaped, a connection hashed to its socket is reset: test_http_workers)
    assert wait_until(lambda: not psutil.pid_exists(victim), 10)
    assert wait_until(lambda: len(set(front_ends(fronted))) == 2 and
                      victim not in set(front_ends(fronted)), 60)
    new = set(front_ends(fronted)) - old
    assert len(new) == 1
    assert wait_until(lambda: new <= light_answers_from(fronted, x, 10), 60)


def test_front_ends_warm_up_their_copies_before_they_answer(tmp_path):
    # slow_warm_up leaves warm-PID in WARM_MARKERS when called on the warm-up input, which
    # no request here sends: each front end's copy is warmed as the server's own is
    np.savez(tmp_path / "warmup.npz", x=np.full((1, 4), serve_models.WARM_UP_VALUE, np.float32))
    markers = tmp_path / "markers"
    markers.mkdir()
    server = Server(["serve_models:numbers", "--predict", "serve_models:slow_warm_up",
                     "--name", "warm", "--inline", "--warmup", str(tmp_path / "warmup.npz"),
                     "--http-workers", "2"],
                    env={"WARM_MARKERS": str(markers), "WARM_UP_S": "0"})
    try:
        server.wait_ready()
        assert wait_until(lambda: len(set(front_ends(server))) == 2, 60)
        fronts = set(front_ends(server))
        x = np.ones((1, 4), np.float32)
        with triton.InferenceServerClient(server.address) as client:
            for _ in range(4):  # (answered by the front ends, from their warmed copies)
                assert np.array_equal(infer(client, "warm", x, binary=False).as_numpy(
                    "output_0"), x)
        warmed = {int(name.split("-")[1]) for name in os.listdir(markers)}
        assert warmed == fronts | {server.process.pid}, (warmed, fronts)
    finally:
        assert server.stop() == 0, server.stderr()


def test_an_inline_model_asked_to_batch_is_refused_at_start(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(textwrap.dedent("""
        [models.light]
        source = "serve_models:numbers"
        predict = "serve_models:scaled_with_pid"
        inline = true
        max_batch_size = 8
    """))
    done = subprocess.run([sys.executable, "-m", "workerpool", "serve", "--port", "0",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "an inline model" in done.stderr and "cannot batch" in done.stderr, done.stderr
