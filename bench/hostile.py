"""One hostile client against everyone else: what other clients' latency and the server's
memory do while an attacker streams endless headers or sends TF Serving's 1 GiB fill, against
the same server with no attacker, in one run.

Server: ``workerpool serve`` with its demo model (2 workers) and ``--tf-serving-port 0``.
Other clients: bench/http_load.py (its own process) on 4 keep-alive connections, KServe v2
JSON, one row per request. Attackers (a process of this file each, in a loop until stopped):

- ``header``: a connection that streams a 64 MiB header line (then the next connection);
- ``fill``: TF Serving Predict requests of 44 bytes whose one float_val fills dims
  [1, 268435456] (1 GiB of float32), over gRPC;
- ``none``: no attacker (the baseline).

Per phase: the other clients' requests/s, p50 and p99, errors; the server's peak RSS above
its RSS before the phase (sampled every 20 ms); what the attacker managed. Phases are
interleaved over ``--rounds``; medians are reported. Targets (issue "Hardening workerpool
serve"): other clients' p99 under 100 ms while attacked, server memory flat.

    .venv/bin/python bench/hostile.py [--rounds 3] [--requests 3000] [--attacks none,fill]

To measure an older build, put its src/ first: ``PYTHONPATH=/path/to/old/src``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil

from common import emit, log, markdown_table

HERE = pathlib.Path(__file__).resolve().parent
MIB = 1024 * 1024
ATTACKS = ("none", "header", "fill")


def attack_header(host: str, port: int, stop: threading.Event) -> dict:
    """64 MiB header lines, one connection after another."""
    tries = refused = 0
    chunk = b"a" * 65536
    print("attacking", flush=True)
    while not stop.is_set():
        tries += 1
        try:
            with socket.create_connection((host, port), timeout=60) as sock:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(64 * MIB // len(chunk)):
                    if stop.is_set():
                        break
                    sock.sendall(chunk)
                sock.sendall(b"\r\n\r\n")
                refused += sock.recv(64).startswith(b"HTTP/1.1 431")
        except OSError:
            refused += 1  # reset by the server before all of it was sent
    return {"connections": tries, "refused": refused}


def attack_fill(host: str, port: int, stop: threading.Event) -> dict:
    """TF Serving Predict requests whose one value fills 1 GiB of float32."""
    import grpc
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "demo"
    tensor = request.inputs["features"]
    tensor.dtype = types_pb2.DT_FLOAT
    for size in (1, 268435456):
        tensor.tensor_shape.dim.add(size=size)
    tensor.float_val.append(1.0)
    sent, codes = 0, {}
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        print("attacking", flush=True)
        while not stop.is_set():
            sent += 1
            try:
                predict(request, timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1
    return {"requests": sent, "request_bytes": request.ByteSize(), "codes": codes}


def run_attacker(kind: str, host: str, port: int) -> None:
    """This file's attacker mode: attack until SIGTERM, then print what it managed."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps((attack_header if kind == "header" else attack_fill)(host, port, stop)),
          flush=True)


class Server:
    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workerpool", "serve", "--port", "0", "--workers", "2",
             "--tf-serving-port", "0"], stdout=subprocess.PIPE, text=True)
        self.port = int(re.search(r"http://[\w.]+:(\d+)", self.process.stdout.readline())[1])
        self.tf_port = int(re.search(r"grpc://[\w.]+:(\d+)",
                                     self.process.stdout.readline())[1])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready",
                                            timeout=5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


class PeakRss(threading.Thread):
    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.peak, self.done = server, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.server.rss())
            time.sleep(0.02)


def phase(server: Server, kind: str, body: pathlib.Path, requests: int) -> dict:
    before = server.rss()
    attacker = None
    if kind != "none":
        port = server.port if kind == "header" else server.tf_port
        attacker = subprocess.Popen([sys.executable, __file__, "--attack", kind,
                                     "127.0.0.1", str(port)], stdout=subprocess.PIPE, text=True)
        assert attacker.stdout.readline().strip() == "attacking"  # its imports done
        time.sleep(1.0)  # the attack under way before the others measure
    try:
        return measure(server, kind, body, requests, before, attacker)
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()


def measure(server: Server, kind: str, body: pathlib.Path, requests: int, before: int,
            attacker: subprocess.Popen | None) -> dict:
    sampler = PeakRss(server)
    sampler.start()
    load = subprocess.run(
        [sys.executable, str(HERE / "http_load.py"), "127.0.0.1", str(server.port),
         "/v2/models/demo/infer", str(body), "--headers-json",
         json.dumps({"Content-Type": "application/json"}), "--connections", "4",
         "--requests", str(requests), "--warmup", "100"],
        capture_output=True, text=True)
    sampler.done.set()
    sampler.join()
    managed = None
    if attacker is not None:
        attacker.send_signal(signal.SIGTERM)
        out, _ = attacker.communicate(timeout=120)
        managed = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    if load.returncode != 0:  # the others could not even finish: say why
        log(f"{kind}: the other clients failed: {load.stderr.strip().splitlines()[-1:]}")
        return {"attack": kind, "req_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"),
                "errors": failure_of(load), "rss_before_mib": before / MIB,
                "rss_peak_above_mib": (sampler.peak - before) / MIB, "attacker": managed}
    others = json.loads(load.stdout)
    return {"attack": kind, "req_s": others["requests_per_s"], "p50_ms": others["p50_ms"],
            "p99_ms": others["p99_ms"], "errors": others["errors"],
            "rss_before_mib": before / MIB, "rss_peak_above_mib": (sampler.peak - before) / MIB,
            "attacker": managed}


def failure_of(load: subprocess.CompletedProcess) -> str:
    return f"failed: {load.stderr.strip().splitlines()[-1] if load.stderr.strip() else '?'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help="which phases, comma-separated (none must be one: the baseline)")
    parser.add_argument("--attack", nargs=3, metavar=("KIND", "HOST", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    if "none" not in attacks or not set(attacks) <= set(ATTACKS):
        parser.error(f"--attacks: a comma-separated subset of {ATTACKS} with none in it")
    if args.attack:
        run_attacker(args.attack[0], args.attack[1], int(args.attack[2]))
        return
    sys.path.insert(0, str(HERE.parent / "src"))
    from workerpool.serve import demo_model

    x = demo_model.example(1)
    with tempfile.TemporaryDirectory() as directory:
        body = pathlib.Path(directory) / "json.body"
        body.write_text(json.dumps({"inputs": [{"name": "features", "shape": [1, 64],
                                                "datatype": "FP32",
                                                "data": x.ravel().tolist()}]}))
        server = Server()
        trials = []
        try:
            for round_ in range(args.rounds):
                for kind in attacks:
                    trial = phase(server, kind, body, args.requests)
                    log(f"round {round_ + 1} {kind}: p99 {trial['p99_ms']:.1f} ms, "
                        f"{trial['req_s']:.0f} req/s, RSS +{trial['rss_peak_above_mib']:.1f} "
                        f"MiB, attacker {trial['attacker']}")
                    trials.append(trial)
        finally:
            server.stop()
    rows = []
    for kind in attacks:
        mine = [t for t in trials if t["attack"] == kind]
        rows.append({"attack": kind, **{key: statistics.median(t[key] for t in mine) for key in
                                        ("req_s", "p50_ms", "p99_ms", "rss_peak_above_mib")},
                     "errors": sum(t["errors"] for t in mine) if all(
                         isinstance(t["errors"], int) for t in mine) else
                     "; ".join(str(t["errors"]) for t in mine),
                     "attacker (last round)": json.dumps(mine[-1]["attacker"])})
    base = next(row["p99_ms"] for row in rows if row["attack"] == "none")
    for row in rows:
        row["p99 vs none"] = row["p99_ms"] / base
    source = os.environ.get("PYTHONPATH", "") or "this checkout"
    markdown = "\n".join([
        "# Hostile clients: other clients' latency and server memory under attack", "",
        f"`bench/hostile.py --rounds {args.rounds} --requests {args.requests} --attacks "
        f"{args.attacks}` (workerpool "
        f"from {source}); medians over rounds, 4 other clients on keep-alive connections.",
        "", markdown_table(rows, ["attack", "req_s", "p50_ms", "p99_ms", "p99 vs none",
                                  "rss_peak_above_mib", "errors", "attacker (last round)"])])
    emit({"rows": rows, "trials": trials}, "hostile", markdown)


if __name__ == "__main__":
    main()
