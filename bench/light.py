"""A light model at full speed: `workerpool serve` against gunicorn + FastAPI, in one run.

The model (bench/light_model.py): logistic regression, 64 -> 10, numpy; compute is a few
microseconds, so each server's own cost per request decides. Both get ``--workers`` worker
processes on this machine's cores:

- ``workerpool serve``: one front-end process, the model in ``--workers`` pool workers;
  KServe v2 JSON and binary-tensor bodies over HTTP, and KServe v2 gRPC (raw tensor
  contents; bench/grpc_load.py, grpc.aio, concurrent calls on one channel);
- ``gunicorn -w N`` with uvicorn workers (httptools, uvloop) and a FastAPI app holding the
  model in each HTTP worker (bench/peers/light; its own venv, bench/.venvs/light): the
  same KServe v2 JSON body, the same JSON answer.

Each is called by bench/http_load.py (its own process) at 32 connections and at 1, for
``--rounds`` interleaved rounds (medians). CPU per request is the CPU time of each server's
process tree during the trial over its requests; for workerpool, the front-end process's
share is said apart (the issue's target: <= 80 us JSON, <= 60 us binary). Every server's
answers (gRPC's too) are checked against the model called here before the run.

Prints JSON and writes bench/results/light.md.

    .venv/bin/python bench/light.py [--rounds 3] [--requests 8000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import psutil

import light_model
from common import emit, log, markdown_table
from reporting import venvs
from protocols import KSERVE_INFER, kserve_infer, kserve_request
from serve import run_load

HERE = pathlib.Path(__file__).resolve().parent
PATH = "/v2/models/light/infer"


def bodies(directory: pathlib.Path) -> dict[str, tuple[pathlib.Path, dict]]:
    x = light_model.example(1)
    tensor = {"name": "features", "shape": [1, light_model.FEATURES], "datatype": "FP32"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    (directory / "binary.body").write_bytes(header + x.tobytes())
    (directory / "json.body").write_text(json.dumps(
        {"inputs": [{**tensor, "data": x.ravel().tolist()}]}))
    (directory / "grpc.body").write_bytes(kserve_request(x, "light").SerializeToString())
    return {"json": (directory / "json.body", {"Content-Type": "application/json"}),
            "binary": (directory / "binary.body",
                       {"Inference-Header-Content-Length": str(len(header))}),
            "grpc": (directory / "grpc.body", None)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1:``port``, stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], port: int, cwd=None,
                 grpc_port: int | None = None):
        self.name, self.port, self.grpc_port = name, port, grpc_port
        env = dict(os.environ, PYTHONPATH=str(HERE))
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while self.answer(light_model.example(1)) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)

    def answer(self, x: np.ndarray) -> np.ndarray | None:
        body = json.dumps({"inputs": [{"name": "features", "shape": list(x.shape),
                                       "datatype": "FP32", "data": x.ravel().tolist()}]})
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{PATH}",
                                         data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                out = json.loads(response.read())["outputs"][0]
        except OSError:
            return None
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far of (this server's first process, all its descendants)."""
        def cpu(p):
            try:
                t = p.cpu_times()
                return t.user + t.system
            except psutil.NoSuchProcess:
                return 0.0

        root = psutil.Process(self.process.pid)
        return cpu(root), sum(cpu(p) for p in root.children(recursive=True))

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_workerpool(workers: int, directory: pathlib.Path) -> Server:
    config = directory / "serve.toml"
    config.write_text('[models.light]\nsource = "light_model:load"\n'
                      'predict = "light_model:predict"\n'
                      'inputs = [{name = "features", datatype = "FP32", shape = [-1, 64]}]\n')
    port, grpc_port = free_port(), free_port()
    return Server("workerpool serve", [sys.executable, "-m", "workerpool", "serve", "--port",
                                       str(port), "--grpc-port", str(grpc_port), "--config",
                                       str(config), "--workers", str(workers)], port,
                  grpc_port=grpc_port)


def start_gunicorn(workers: int) -> Server:
    python = venvs.build("light", sys.stderr)
    port = free_port()
    return Server(f"gunicorn -w {workers} + FastAPI",
                  [python, "-m", "gunicorn", "app:app", "--workers", str(workers),
                   "--worker-class", "uvicorn.workers.UvicornWorker",
                   "--bind", f"127.0.0.1:{port}"], port, cwd=HERE / "peers" / "light")


def trial(server: Server, body: tuple, connections: int, requests: int) -> dict:
    path, headers = body
    front0, rest0 = server.cpu_seconds()
    if headers is None:  # gRPC
        result = run_load("grpc_load.py", [f"127.0.0.1:{server.grpc_port}", KSERVE_INFER,
                                           str(path)], connections, requests)
    else:
        result = run_load("http_load.py", ["127.0.0.1", str(server.port), PATH, str(path),
                                           "--headers-json", json.dumps(headers)],
                          connections, requests)
    front1, rest1 = server.cpu_seconds()
    # the load generator's warm-up requests ran in the same window
    served = result["requests"] + min(requests // 10, 500)
    result["cpu_us_per_request"] = 1e6 * (front1 - front0 + rest1 - rest0) / served
    result["front_cpu_us_per_request"] = 1e6 * (front1 - front0) / served
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8000,
                        help="per trial at 32 clients (a quarter of it at 1 client)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-light-"))
    request_bodies = bodies(directory)
    x = light_model.example(3)
    expected = light_model.predict(light_model.load(), x)["probabilities"]
    servers = []
    trials: dict[tuple, list[dict]] = {}
    try:
        servers = [start_gunicorn(args.workers), start_workerpool(args.workers, directory)]
        for server in servers:
            answers = {"HTTP JSON": server.answer(x)}
            if server.grpc_port is not None:
                answers["gRPC"] = kserve_infer(
                    f"127.0.0.1:{server.grpc_port}",
                    kserve_request(x, "light").SerializeToString())["probabilities"]
            for how, got in answers.items():
                if got is None or not np.allclose(got, expected, rtol=1e-6, atol=1e-7):
                    raise RuntimeError(f"{server.name} ({how}) answered {got}, expected "
                                       f"{expected}")
        for round_ in range(args.rounds):
            for connections in (32, 1):
                requests = args.requests if connections > 1 else args.requests // 4
                for server in servers:
                    kinds = ["json"] if server.name.startswith("gunicorn") else \
                        list(request_bodies)
                    for kind in kinds:
                        key = (server.name, kind, connections)
                        result = trial(server, request_bodies[kind], connections, requests)
                        trials.setdefault(key, []).append(result)
                        log(key, f"{result['requests_per_s']:.0f} req/s, p50 "
                                 f"{result['p50_ms']:.3f} ms, "
                                 f"{result['cpu_us_per_request']:.0f} us CPU/request")
            log(f"round {round_ + 1}/{args.rounds} done")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    rows = []
    baseline = {c: statistics.median(t["requests_per_s"] for t in trials[(s, "json", c)])
                for (s, _, c) in trials if s.startswith("gunicorn")}
    base_p50 = {c: statistics.median(t["p50_ms"] for t in trials[(s, "json", c)])
                for (s, _, c) in trials if s.startswith("gunicorn")}
    for (name, kind, connections), results in trials.items():
        row = {"server": name, "body": kind, "clients": connections}
        for field in ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request",
                      "front_cpu_us_per_request"):
            row[field] = round(statistics.median(t[field] for t in results), 3)
        row["rps_vs_gunicorn"] = round(row["requests_per_s"] / baseline[connections], 2)
        row["p50_vs_gunicorn"] = round(row["p50_ms"] / base_p50[connections], 2)
        rows.append(row)
    binary = {r["clients"]: r["requests_per_s"] for r in rows if r["body"] == "binary"}
    grpc_vs_binary = {r["clients"]: round(r["requests_per_s"] / binary[r["clients"]], 2)
                      for r in rows if r["body"] == "grpc"}
    columns = ["server", "body", "clients", "requests_per_s", "p50_ms", "p99_ms",
               "rps_vs_gunicorn", "p50_vs_gunicorn", "cpu_us_per_request",
               "front_cpu_us_per_request"]
    markdown = (f"# A light model (logistic regression, 64 -> 10), {args.workers} workers, "
                f"{os.cpu_count()} CPUs, medians of {args.rounds} rounds\n\n"
                f"`{' '.join(['bench/light.py', *sys.argv[1:]])}`\n\n"
                "front_cpu_us_per_request: the server's first process (workerpool's front end; "
                "gunicorn's master, which serves nothing). body grpc: KServe v2 gRPC, "
                "raw tensor contents.\n\n"
                + markdown_table(rows, columns)
                + "\nKServe v2 gRPC req/s against HTTP binary (target >= 0.9x): "
                + ", ".join(f"{ratio}x at {c} clients" for c, ratio in grpc_vs_binary.items())
                + "\n")
    emit({"rounds": args.rounds, "workers": args.workers, "rows": rows,
          "grpc_vs_binary": grpc_vs_binary}, "light", markdown)
    print(markdown, file=sys.stderr)


if __name__ == "__main__":
    main()
