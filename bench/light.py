"""A light model at full speed: `workerpool serve` against gunicorn + FastAPI and LitServe,
in one run.

The model (bench/light_model.py): logistic regression, 64 -> 10, numpy; compute is a few
microseconds, so each server's own cost per request decides. Both get ``--workers`` worker
processes on this machine's cores:

- ``workerpool serve``: one front-end process, the model in ``--workers`` pool workers;
  KServe v2 JSON and binary-tensor bodies over HTTP, and KServe v2 gRPC (raw tensor
  contents; bench/grpc_load.py, grpc.aio, concurrent calls on one channel);
- ``workerpool serve --http-workers N`` for each N of ``--http-workers`` past 1: N HTTP
  front-end processes relaying to the server's process (JSON and binary);
- ``workerpool serve`` with the model ``inline = true``: called in the server's own
  process, no worker (serving/inline.py); JSON, binary and gRPC; with ``--http-workers N``
  each front end calls its own copy (serve/inline_fronts.py);
- ``gunicorn -w N`` with uvicorn workers (httptools, uvloop) and a FastAPI app holding the
  model in each HTTP worker (bench/peers/light; its own venv, bench/.venvs/light): the
  same KServe v2 JSON body, the same JSON answer;
- LitServe with ``workers_per_device=N`` inference workers (bench/peers/litserve/light_app.py;
  its own venv, bench/.venvs/litserve): a LitAPI at the same path, the same JSON body and
  answer, no batching;
- the transport floor (bench/floor_server.py): the uvicorn + grpc.aio stack workerpool
  serve runs on, one process, answering every body with a fixed answer (JSON parsed, no
  model): what HTTP and gRPC cost before our code, and so how near gRPC can come to HTTP.

Bodies: one row as JSON, as binary tensors and over gRPC; and 256 rows as JSON (~330 KB,
``json_256rows``, a twentieth of the requests), where decoding JSON costs the front end
milliseconds and front ends in parallel pay off even on two cores. Binary and gRPC rows are
compared with gunicorn's answer to the one-row JSON body. gunicorn and LitServe get the JSON
bodies only.

Each is called by bench/http_load.py (its own process) at 32 connections and at 1, for
``--rounds`` interleaved rounds (medians). CPU per request is the CPU time of each server's
process tree during the trial over its requests; for workerpool, the front-end process's
share is said apart: the server's own process and its HTTP front ends (the issue's target:
<= 80 us JSON, <= 60 us binary), and with --http-workers the server's process alone (what
bounds it on a machine with more cores: 1 / that CPU is its ceiling in req/s), and above the
floor's (what our code adds to the stack). Every server's answers (gRPC's too) are checked
against the model called here before the run (the floor's are fixed).

Prints JSON and writes bench/results/light.md.

    .venv/bin/python bench/light.py [--rounds 3] [--requests 8000] [--workers 2]
        [--http-workers 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import psutil

import light_model
from common import emit, free_port, log, markdown_table, stop_group
from reporting import venvs
from protocols import KSERVE_INFER, kserve_infer, kserve_request
from serve import run_load

HERE = pathlib.Path(__file__).resolve().parent
PATH = "/v2/models/light/infer"
BIG_ROWS = 256  # the big JSON body's rows (~330 KB)


def bodies(directory: pathlib.Path) -> dict[str, tuple[pathlib.Path, dict]]:
    x = light_model.example(1)
    tensor = {"name": "features", "shape": [1, light_model.FEATURES], "datatype": "FP32"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    (directory / "binary.body").write_bytes(header + x.tobytes())
    (directory / "json.body").write_text(json.dumps(
        {"inputs": [{**tensor, "data": x.ravel().tolist()}]}))
    (directory / "grpc.body").write_bytes(kserve_request(x, "light").SerializeToString())
    rows = light_model.example(BIG_ROWS)  # where parsing JSON, not the server, costs most
    (directory / "json_rows.body").write_text(json.dumps(
        {"inputs": [{**tensor, "shape": list(rows.shape), "data": rows.tolist()}]}))
    return {"json": (directory / "json.body", {"Content-Type": "application/json"}),
            f"json_{BIG_ROWS}rows": (directory / "json_rows.body",
                                     {"Content-Type": "application/json"}),
            "binary": (directory / "binary.body",
                       {"Inference-Header-Content-Length": str(len(header))}),
            "grpc": (directory / "grpc.body", None)}


class Server:
    """A server process on 127.0.0.1:``port``, stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], port: int, cwd=None,
                 grpc_port: int | None = None, env: dict | None = None,
                 json_only: bool = False):
        self.name, self.port, self.grpc_port = name, port, grpc_port
        self.json_only = json_only  # a peer: KServe v2 JSON bodies only
        env = {**os.environ, "PYTHONPATH": str(HERE), **(env or {})}
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

    def cpu_seconds(self) -> tuple[float, float, float]:
        """CPU time so far of (this server's first process, its HTTP front-end processes,
        every other descendant)."""
        def cpu(p):
            try:
                t = p.cpu_times()
                return t.user + t.system
            except psutil.NoSuchProcess:
                return 0.0

        def is_front_end(p):
            try:
                return "workerpool.serve.http.front_end" in p.cmdline()
            except psutil.NoSuchProcess:
                return False

        root = psutil.Process(self.process.pid)
        children = root.children(recursive=True)
        fronts = [p for p in children if is_front_end(p)]
        return (cpu(root), sum(cpu(p) for p in fronts),
                sum(cpu(p) for p in children if p not in fronts))

    def stop(self) -> None:
        stop_group(self.process)


def start_workerpool(workers: int, directory: pathlib.Path, http_workers: int,
                     inline: bool = False, env: dict | None = None) -> Server:
    """``env``: variables for the server's processes (a PYTHONPATH replaces bench/'s)."""
    config = directory / ("serve-inline.toml" if inline else "serve.toml")
    config.write_text('[models.light]\nsource = "light_model:load"\n'
                      'predict = "light_model:predict"\n'
                      f'inline = {"true" if inline else "false"}\n'
                      'inputs = [{name = "features", datatype = "FP32", shape = [-1, 64]}]\n')
    port = free_port()
    command = [sys.executable, "-m", "workerpool", "serve", "--port", str(port), "--config",
               str(config), "--workers", str(workers)]
    name = "workerpool serve" + (", inline" if inline else "")
    if http_workers > 1:  # gRPC is served by the server's own process either way
        return Server(f"{name} --http-workers {http_workers}",
                      [*command, "--http-workers", str(http_workers)], port, env=env)
    grpc_port = free_port()
    return Server(name, [*command, "--grpc-port", str(grpc_port)], port, grpc_port=grpc_port,
                  env=env)


FLOOR = "floor: uvicorn + grpc.aio, fixed answer"


def start_floor() -> Server:
    port, grpc_port = free_port(), free_port()
    return Server(FLOOR,
                  [sys.executable, str(HERE / "floor_server.py"), str(port), str(grpc_port)],
                  port, grpc_port=grpc_port)


def start_gunicorn(workers: int) -> Server:
    python = venvs.build("light", sys.stderr)
    port = free_port()
    return Server(f"gunicorn -w {workers} + FastAPI",
                  [python, "-m", "gunicorn", "app:app", "--workers", str(workers),
                   "--worker-class", "uvicorn.workers.UvicornWorker",
                   "--bind", f"127.0.0.1:{port}"], port, cwd=HERE / "peers" / "light",
                  json_only=True)


def start_litserve(workers: int) -> Server:
    python = venvs.build("litserve", sys.stderr)
    port = free_port()
    app = HERE / "peers" / "litserve" / "light_app.py"
    return Server(f"LitServe, workers_per_device={workers}",
                  [python, str(app), str(port), str(workers)], port,
                  env={"PYTHONPATH": f"{HERE}{os.pathsep}{HERE / 'peers'}"}, json_only=True)


def trial(server: Server, body: tuple, connections: int, requests: int) -> dict:
    path, headers = body
    own0, fronts0, rest0 = server.cpu_seconds()
    if headers is None:  # gRPC
        result = run_load("grpc_load.py", [f"127.0.0.1:{server.grpc_port}", KSERVE_INFER,
                                           str(path)], connections, requests)
    else:
        result = run_load("http_load.py", ["127.0.0.1", str(server.port), PATH, str(path),
                                           "--headers-json", json.dumps(headers)],
                          connections, requests)
    own1, fronts1, rest1 = server.cpu_seconds()
    # the load generator's warm-up requests ran in the same window
    served = result["requests"] + min(requests // 10, 500)
    own, fronts, rest = own1 - own0, fronts1 - fronts0, rest1 - rest0
    result["cpu_us_per_request"] = 1e6 * (own + fronts + rest) / served
    result["front_cpu_us_per_request"] = 1e6 * (own + fronts) / served
    result["server_process_cpu_us_per_request"] = 1e6 * own / served
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8000,
                        help="per trial at 32 clients (a quarter of it at 1 client)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--http-workers", default="1,2",
                        help="workerpool servers to run, one per number of HTTP front ends")
    args = parser.parse_args()
    http_workers = [int(n) for n in args.http_workers.split(",")]

    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-light-"))
    request_bodies = bodies(directory)
    x = light_model.example(3)
    expected = light_model.predict(light_model.load(), x)["probabilities"]
    servers = []
    trials: dict[tuple, list[dict]] = {}
    try:
        servers = [start_gunicorn(args.workers), start_litserve(args.workers),
                   *(start_workerpool(args.workers, directory, n, inline)
                     for inline in (False, True) for n in http_workers),
                   start_floor()]
        for server in servers:
            if server.name == FLOOR:  # (its answer is fixed)
                continue
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
                    kinds = [k for k in request_bodies if k.startswith("json")] \
                        if server.json_only else \
                        [k for k in request_bodies if k != "grpc" or server.grpc_port]
                    for kind in kinds:
                        key = (server.name, kind, connections)
                        # the big body takes ~40x as long to answer
                        n = requests // 20 if kind.startswith("json_") else requests
                        result = trial(server, request_bodies[kind], connections, n)
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
    # against gunicorn's answer to the same request (binary and gRPC: to the small JSON one)
    baseline = {(b, c): statistics.median(t["requests_per_s"] for t in trials[(s, b, c)])
                for (s, b, c) in trials if s.startswith("gunicorn")}
    base_p50 = {(b, c): statistics.median(t["p50_ms"] for t in trials[(s, b, c)])
                for (s, b, c) in trials if s.startswith("gunicorn")}
    for (name, kind, connections), results in trials.items():
        row = {"server": name, "body": kind, "clients": connections}
        for field in ("requests_per_s", "p50_ms", "p99_ms", "cpu_us_per_request",
                      "front_cpu_us_per_request", "server_process_cpu_us_per_request"):
            row[field] = round(statistics.median(t[field] for t in results), 3)
        same = (kind if kind.startswith("json") else "json", connections)
        row["rps_vs_gunicorn"] = round(row["requests_per_s"] / baseline[same], 2)
        row["p50_vs_gunicorn"] = round(row["p50_ms"] / base_p50[same], 2)
        rows.append(row)
    binary = {(r["server"], r["clients"]): r["requests_per_s"] for r in rows
              if r["body"] == "binary"}
    grpc_vs_binary = {f'{r["server"]}, {r["clients"]} clients':
                      round(r["requests_per_s"] / binary[(r["server"], r["clients"])], 2)
                      for r in rows if r["body"] == "grpc"}
    cpu = {(r["server"], r["body"], r["clients"]): r["front_cpu_us_per_request"]
           for r in rows}
    above_floor = {f'{name}, {body}, {clients} clients':
                   round(us - cpu[(FLOOR, body, clients)], 1)
                   for (name, body, clients), us in cpu.items()
                   if name.startswith("workerpool") and (FLOOR, body, clients) in cpu}
    columns = ["server", "body", "clients", "requests_per_s", "p50_ms", "p99_ms",
               "rps_vs_gunicorn", "p50_vs_gunicorn", "cpu_us_per_request",
               "front_cpu_us_per_request", "server_process_cpu_us_per_request"]
    markdown = (f"# A light model (logistic regression, 64 -> 10), {args.workers} workers, "
                f"{os.cpu_count()} CPUs, medians of {args.rounds} rounds\n\n"
                f"`{' '.join(['bench/light.py', *sys.argv[1:]])}`\n\n"
                "front_cpu_us_per_request: the serving processes (workerpool's own process "
                "and its HTTP front ends; gunicorn's master, which serves nothing; "
                "LitServe's main process, which serves nothing either); "
                "server_process_cpu_us_per_request: the first process alone (with "
                "--http-workers, what every request costs the one process that holds the "
                "pools). body grpc: KServe v2 gRPC, raw tensor contents.\n\n"
                + markdown_table(rows, columns)
                + "\nKServe v2 gRPC req/s against HTTP binary (target >= 0.9x): "
                + ", ".join(f"{ratio}x ({c})" for c, ratio in grpc_vs_binary.items())
                + " (the floor's: gRPC on grpcio against HTTP on uvicorn with nothing "
                  "of ours)\n\nFront-end CPU per request above the floor's (us; what our "
                  "serving code adds to the same stack): "
                + ", ".join(f"{us} ({c})" for c, us in above_floor.items())
                + "\n")
    emit({"rounds": args.rounds, "workers": args.workers, "rows": rows,
          "grpc_vs_binary": grpc_vs_binary, "front_cpu_above_floor_us": above_floor},
         "light", markdown)
    print(markdown, file=sys.stderr)


if __name__ == "__main__":
    main()
