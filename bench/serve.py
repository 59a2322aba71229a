"""HTTP serving against the pool it serves from: requests/s and latency, in one run.

The model: ``workerpool serve``'s built-in demo (a numpy MLP, 64 features in, 10 classes
out, ~4.3 MiB), 2 workers, no batching; each request is one row. Measured, as ratios in
the same run (medians over ``--rounds`` interleaved rounds; the machine is shared and noisy):

- in-process: a Pool of the same model and options in this process; 1 client is sequential
  ``submit(x).result()``; 32 clients are 32 coroutines awaiting ``submit_async(x)``.
- HTTP binary / JSON: ``workerpool serve`` in its own process, called by bench/http_load.py
  (another process: raw asyncio keep-alive connections) with a Triton binary-tensor body or
  a JSON body; 1 and 32 connections.
- ``--stacks``: which HTTP server runs the app: uvicorn with httptools on uvloop (what
  ``workerpool serve`` uses), uvicorn with h11 on asyncio, granian (Rust, embedded in the
  same event loop). The choice of server was made with ``--stacks all``.

Targets (issue "workerpool serve"): at 32 clients HTTP binary >= 0.6 x in-process requests/s;
at 1 client HTTP adds <= 0.5 ms to the p50. Prints JSON, writes bench/results/serve.md.

    .venv/bin/python bench/serve.py [--rounds 3] [--requests 4000] [--stacks all]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import emit, log, markdown_table

HERE = pathlib.Path(__file__).resolve().parent
STACKS = {
    "uvicorn-httptools-uvloop": ["--http", "httptools", "--loop", "uvloop"],
    "uvicorn-h11-asyncio": ["--http", "h11", "--loop", "asyncio"],
    "granian": None,  # launched by this file (--granian PORT)
}
CONNECTIONS = (1, 32)


def bodies(directory: pathlib.Path) -> dict[str, tuple[pathlib.Path, dict]]:
    """The two request bodies (one row of the demo's input) and their extra headers."""
    from workerpool.serve import demo_model

    x = demo_model.example(1)
    binary_header = json.dumps({"inputs": [{"name": "features", "shape": [1, 64],
                                            "datatype": "FP32",
                                            "parameters": {"binary_data_size": x.nbytes}}],
                                "parameters": {"binary_data_output": True}}).encode()
    json_body = json.dumps({"inputs": [{"name": "features", "shape": [1, 64],
                                        "datatype": "FP32", "data": x.ravel().tolist()}]})
    (directory / "binary.body").write_bytes(binary_header + x.tobytes())
    (directory / "json.body").write_text(json_body)
    return {"binary": (directory / "binary.body",
                       {"Inference-Header-Content-Length": str(len(binary_header))}),
            "json": (directory / "json.body", {"Content-Type": "application/json"})}


class Server:
    def __init__(self, stack: str, workers: int):
        if STACKS[stack] is None:
            command = [sys.executable, __file__, "--granian", str(workers)]
        else:
            command = [sys.executable, "-m", "workerpool", "serve", "--port", "0",
                       "--workers", str(workers), *STACKS[stack]]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        self.port = int(re.search(r"http://[\w.]+:(\d+)", line)[1])
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the server is not ready after 120 s")
            time.sleep(0.1)

    def ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready",
                                        timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.process.stdout.close()


def http_load(port: int, body: tuple, connections: int, requests: int) -> dict:
    path, headers = body
    return run_load("http_load.py", ["127.0.0.1", str(port), "/v2/models/demo/infer",
                                     str(path), "--headers-json", json.dumps(headers)],
                    connections, requests)


def run_load(script: str, arguments: list[str], connections: int, requests: int) -> dict:
    """One trial of a load generator of bench/ in its own process; its JSON result."""
    done = subprocess.run(
        [sys.executable, str(HERE / script), *arguments,
         "--connections", str(connections), "--requests", str(requests),
         "--warmup", str(min(requests // 10, 500))],
        capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} requests failed")
    return result


def in_process(pool, x, connections: int, requests: int) -> dict:
    latencies: list[float] = []
    if connections == 1:
        for _ in range(min(requests // 10, 500)):
            pool.submit(x).result()
        started = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            pool.submit(x).result()
            latencies.append(time.perf_counter() - t)
    else:
        async def client(count):
            for _ in range(count):
                t = time.perf_counter()
                await pool.submit_async(x)
                latencies.append(time.perf_counter() - t)

        async def all_clients(count):
            await asyncio.gather(*[client(count) for _ in range(connections)])

        asyncio.run(all_clients(max(1, min(requests // 10, 500) // connections)))
        latencies.clear()
        started = time.perf_counter()
        asyncio.run(all_clients(requests // connections))
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "seconds": seconds,
            "requests_per_s": len(latencies) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def median_of(trials: list[dict]) -> dict:
    return {key: statistics.median(t[key] for t in trials)
            for key in ("requests_per_s", "p50_ms", "p99_ms")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000, help="per trial at 32 clients "
                        "(a quarter of it at 1 client)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stacks", default="uvicorn-httptools-uvloop",
                        help=f"comma-separated of {list(STACKS)}, or all")
    parser.add_argument("--granian", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.granian is not None:
        run_granian(args.granian)
        return
    stacks = list(STACKS) if args.stacks == "all" else args.stacks.split(",")

    import workerpool as wp
    from workerpool.serve import demo_model

    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-serve-"))
    request_bodies = bodies(directory)
    x = demo_model.example(1)
    trials: dict[tuple, list[dict]] = {}
    servers: dict[str, Server] = {}
    pool = wp.Pool(demo_model.load, demo_model.predict, workers=args.workers,
                   warmup=[x])
    try:
        for stack in stacks:
            servers[stack] = Server(stack, args.workers)
        for round_ in range(args.rounds):
            for connections in CONNECTIONS:
                requests = args.requests if connections > 1 else args.requests // 4
                key = ("in-process", "-", connections)
                trials.setdefault(key, []).append(in_process(pool, x, connections, requests))
                log(key, _brief(trials[key][-1]))
                for stack, server in servers.items():
                    for kind, body in request_bodies.items():
                        key = (stack, kind, connections)
                        trials.setdefault(key, []).append(
                            http_load(server.port, body, connections, requests))
                        log(key, _brief(trials[key][-1]))
                log(f"round {round_ + 1}/{args.rounds}, {connections} client(s) done")
    finally:
        pool.close()
        for server in servers.values():
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    rows = []
    for (stack, kind, connections), results in trials.items():
        base = median_of(trials[("in-process", "-", connections)])
        row = {"server": stack, "body": kind, "clients": connections, **median_of(results)}
        row["rps_vs_in_process"] = row["requests_per_s"] / base["requests_per_s"]
        row["p50_added_ms"] = row["p50_ms"] - base["p50_ms"]
        rows.append(row)
    columns = ["server", "body", "clients", "requests_per_s", "p50_ms", "p99_ms",
               "rps_vs_in_process", "p50_added_ms"]
    markdown = (f"# Serving over HTTP vs the pool in-process (demo model, {args.workers} "
                f"workers, medians of {args.rounds} rounds)\n\n"
                f"`{' '.join(['bench/serve.py', *sys.argv[1:]])}`\n\n"
                + markdown_table(rows, columns))
    emit({"rounds": args.rounds, "workers": args.workers, "rows": rows}, "serve", markdown)
    print(markdown, file=sys.stderr)


def _brief(trial: dict) -> str:
    return (f"{trial['requests_per_s']:.0f} req/s, p50 {trial['p50_ms']:.3f} ms, "
            f"{trial['seconds']:.1f} s")


def run_granian(workers: int) -> None:
    """A server like `workerpool serve` on granian (embedded): for --stacks only."""
    from granian.constants import Interfaces
    from granian.server.embed import Server as Granian

    from workerpool.serve.http.app import App
    from workerpool.serve.main import demo_spec
    from workerpool.serve.registry import Registry
    from workerpool.serve.server import bind

    registry = Registry([demo_spec("demo", {"workers": workers})])
    app = App(registry)
    port = bind("127.0.0.1", 0).getsockname()[1]  # a free port; granian binds it itself

    async def serve():
        registry.start_loading()
        server = Granian(app, address="127.0.0.1", port=port, interface=Interfaces.ASGINL,
                         log_enabled=False)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.stop)
        print(f"granian serve: http://127.0.0.1:{port}", flush=True)
        await server.serve()
        await asyncio.to_thread(registry.close, 10)

    import uvloop

    uvloop.run(serve())
    os._exit(0)


if __name__ == "__main__":
    main()
