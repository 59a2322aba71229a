"""Model lifecycle in `workerpool serve`: the repository extension, versions, SIGHUP, --watch.

Real server processes on 127.0.0.1, called with tritonclient.http; the models are torch
state-dict files whose outputs name the version that produced them (serve_models.py).
"""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serve_models import save_version, version_of
from test_serve import Server
from testkit import Traffic, is_running, wait_until

ONES = np.ones((1, 4), dtype=np.float32)
BUILDER = "serve_models:linear"


def infer(client, model="lin", version=""):
    request = triton.InferInput("input_0", [1, 4], "FP32")
    request.set_data_from_numpy(ONES, binary_data=True)
    result = client.infer(model, [request], model_version=version)
    return version_of(result.as_numpy("output_0")), result.get_response()["model_version"]


def model_files(directory, versions):
    paths = {}
    for version in versions:
        paths[version] = directory / f"v{version}.pt"
        save_version(paths[version], version)
    return paths


@pytest.fixture
def client_of():
    clients = []

    def make(server):
        client = triton.InferenceServerClient(server.address, network_timeout=120,
                                              connection_timeout=120)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_ten_hot_swaps_under_tritonclient_traffic_fail_nothing(tmp_path, client_of):
    paths = model_files(tmp_path, range(1, 12))
    server = Server(["--model", f"lin={paths[1]}", "--builder", BUILDER, "--workers", "1",
                     "--allow-source", str(tmp_path), "--spare-zygote"])
    try:
        server.wait_ready()
        control = client_of(server)
        clients = [client_of(server) for _ in range(4)]
        with Traffic(lambda i: infer(clients[i])[0], 4, floor=1) as traffic:
            for version in range(2, 12):
                time.sleep(0.2)
                control.load_model("lin", config=json.dumps({"source": str(paths[version])}))
                traffic.floor = version
            time.sleep(0.2)
        answers, failures = traffic.answers, traffic.failures
        assert not failures, failures[:3]
        assert {answered for _, answered in answers} == set(range(1, 12))
        assert all(answered >= at_least for at_least, answered in answers), \
            "a request sent after a swap was answered by the old version"
        index = control.get_model_repository_index()
        assert [(m["name"], m["version"], m["state"]) for m in index] == [("lin", "1", "READY")]
        status = json.loads(server.get("/status")[2])
        assert status["models"][0]["swaps"] == 10
    finally:
        assert server.stop() == 0


def test_versions_unload_and_load_through_the_repository_api(tmp_path, client_of):
    paths = model_files(tmp_path, (1, 2, 3))
    elsewhere = tmp_path / "private"
    elsewhere.mkdir()
    save_version(elsewhere / "v9.pt", 9)
    server = Server(["--model", f"lin={paths[1]}@1", "--model", f"lin={paths[2]}@2",
                     "--builder", BUILDER, "--workers", "1",
                     "--allow-source", str(paths[3]), "--max-models", "3"])
    try:
        server.wait_ready()
        client = client_of(server)
        assert infer(client) == (2, "2")  # the plain route: the newest version
        assert infer(client, version="1") == (1, "1")
        assert client.get_model_metadata("lin")["versions"] == ["1", "2"]
        assert sorted((m["version"], m["state"]) for m in client.get_model_repository_index()) \
            == [("1", "READY"), ("2", "READY")]

        status, _, body = server.post("/v2/repository/models/lin/unload",
                                      json.dumps({"parameters": {"version": "2"}}).encode())
        assert status == 200 and json.loads(body)["unloaded"] == ["2"]
        assert infer(client) == (1, "1")  # newest *ready* version now
        with pytest.raises(InferenceServerException, match="unloaded"):
            infer(client, version="2")
        assert client.is_server_ready()  # an unloaded version is not a missing one

        # a new version from the allow-list; then it is the newest
        status, _, body = server.post(
            "/v2/repository/models/lin/load",
            json.dumps({"parameters": {"version": "3", "source": str(paths[3])}}).encode())
        assert status == 200, body
        assert infer(client) == (3, "3")
        client.load_model("lin", config=json.dumps({"version": "2"}))  # back from unloaded
        assert infer(client, version="2") == (2, "2")
        # three versions loaded, --max-models 3: a fourth pool is refused until one goes
        status, _, body = server.post(
            "/v2/repository/models/lin/load",
            json.dumps({"parameters": {"version": "4", "source": str(paths[3])}}).encode())
        assert status == 409 and "--max-models 3" in json.loads(body)["error"], body
        assert [m["version"] for m in client.get_model_repository_index()] == ["1", "2", "3"]

        refused = [
            ({"parameters": {"source": str(elsewhere / "v9.pt")}}, 400, "allow-list"),
            ({"parameters": {"source": "os:system"}}, 400, "allow-list"),
            ({"parameters": {"file:1/model.pt": "AAAA"}}, 400, "does not take model files"),
            ({"parameters": {"version": "../x"}}, 400, "model version"),
            ({"parameters": {"colour": "red"}}, 400, "unknown parameters"),
        ]
        for body, want_status, want_text in refused:
            status, _, answer = server.post("/v2/repository/models/lin/load",
                                            json.dumps(body).encode())
            assert (status, want_text in json.loads(answer)["error"]) == (want_status, True), \
                answer
        assert server.post("/v2/repository/models/lin/load", b"{not json")[0] == 400
        assert server.post("/v2/repository/models/nope/load", b"")[0] == 404
        assert server.post("/v2/repository/models/nope/unload", b"")[0] == 404
        assert infer(client) == (3, "3")

        client.unload_model("lin")  # every version
        assert {m["state"] for m in client.get_model_repository_index()} == {"UNAVAILABLE"}
        with pytest.raises(InferenceServerException, match="unloaded"):
            infer(client)
    finally:
        assert server.stop() == 0


def test_a_failed_swap_keeps_the_old_version_serving(tmp_path, client_of):
    paths = model_files(tmp_path, (1,))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a checkpoint")
    server = Server(["--model", f"lin={paths[1]}", "--builder", BUILDER, "--workers", "1",
                     "--allow-source", str(tmp_path)])
    try:
        server.wait_ready()
        client = client_of(server)
        status, _, body = server.post(
            "/v2/repository/models/lin/load",
            json.dumps({"parameters": {"source": str(broken)}}).encode())
        assert status == 500 and "reload failed" in json.loads(body)["error"], body
        assert infer(client) == (1, "1")
        assert client.is_model_ready("lin")
    finally:
        assert server.stop() == 0


def test_unload_drains_requests_in_flight(client_of):
    server = Server(["--model", "sleepy=serve_models:numbers", "--predict",
                     "serve_models:sleep_then_echo", "--workers", "1"])
    try:
        server.wait_ready()
        results = []

        def slow_call():
            x = np.full((1, 1), 1.0, dtype=np.float32)
            request = triton.InferInput("input_0", [1, 1], "FP32")
            request.set_data_from_numpy(x)
            results.append(client_of(server).infer("sleepy", [request]).as_numpy("output_0"))

        callers = [threading.Thread(target=slow_call) for _ in range(2)]
        for thread in callers:
            thread.start()
        time.sleep(0.5)  # both accepted: one running, one queued
        status, _, body = server.post("/v2/repository/models/sleepy/unload", b"")
        assert status == 200, body
        for thread in callers:
            thread.join()
        assert len(results) == 2 and all(r.tolist() == [[1.0]] for r in results)
        status, _, _ = server.post("/v2/models/sleepy/infer", json.dumps(
            {"inputs": [{"name": "input_0", "datatype": "FP32", "shape": [1, 1],
                         "data": [0.0]}]}).encode())
        assert status == 503
    finally:
        assert server.stop() == 0


CONFIG = textwrap.dedent("""
    [server]
    allow_sources = []

    [models.kept]
    source = "{kept}"
    builder = "serve_models:linear"
    workers = 1

    [models.changed]
    source = "{changed}"
    builder = "serve_models:linear"
    workers = 1
    {extra}
""")


def test_sighup_applies_the_edited_config(tmp_path, client_of):
    paths = model_files(tmp_path, (1, 2, 3, 4))
    config = tmp_path / "serve.toml"
    config.write_text(CONFIG.format(kept=paths[1], changed=paths[2], extra=""))
    server = Server(["--config", str(config)])
    try:
        server.wait_ready()
        client = client_of(server)
        assert infer(client, "kept")[0] == 1 and infer(client, "changed")[0] == 2
        kept_pids = [w["pid"] for w in json.loads(server.get("/status")[2])["models"][0]
                     ["workers"]]
        config.write_text(CONFIG.format(kept=paths[1], changed=paths[3], extra=textwrap.dedent(
            f"""
            [models.added]
            versions = {{"1" = "{paths[4]}", "2" = "{paths[1]}"}}
            builder = "serve_models:linear"
            workers = 1
            """)).replace(f'[models.kept]\nsource = "{paths[1]}"', "[models.gone]\nsource = "
                          f'"{paths[1]}"'))
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: sorted((m["name"], m["version"], m["state"]) for m in
                                         client.get_model_repository_index())
                          == [("added", "1", "READY"), ("added", "2", "READY"),
                              ("changed", "1", "READY"), ("gone", "1", "READY")], 120), \
            client.get_model_repository_index()
        assert infer(client, "changed")[0] == 3
        assert infer(client, "added") == (1, "2") and infer(client, "added", "1") == (4, "1")
        assert infer(client, "gone")[0] == 1
        with pytest.raises(InferenceServerException,
                           match="Request for unknown model: 'kept' is not found"):
            infer(client, "kept")
        assert wait_until(lambda: not any(is_running(pid) for pid in kept_pids))
        # a broken edit changes nothing
        config.write_text("[models.x]\nsauce = 1\n")
        server.process.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert infer(client, "changed")[0] == 3
        assert "the config cannot be used" in server.stderr()
    finally:
        assert server.stop() == 0


def test_watch_swaps_in_a_renamed_in_file(tmp_path, client_of):
    path = tmp_path / "model.pt"
    save_version(path, 1)
    server = Server([f"{path}", "--name", "lin", "--builder", BUILDER, "--workers", "1",
                     "--watch", "--watch-interval", "0.2"])
    try:
        server.wait_ready()
        client = client_of(server)
        assert infer(client) == (1, "1")
        busy_client = client_of(server)
        with Traffic(lambda _: infer(busy_client), 1) as traffic:
            save_version(path, 2)  # written beside it, renamed over it
            assert wait_until(lambda: infer(client)[0] == 2, 60)
        failures = traffic.failures
        assert not failures, failures[:3]
    finally:
        assert server.stop() == 0
