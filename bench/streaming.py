"""Streaming: time to the first item, and what each further item costs, in one run.

The model (bench/stream_model.py) is a generator with no compute of its own, yielding small
arrays (16 float32), so each path's own cost per item is what is measured:

- in process: the generator called and iterated here (the baseline);
- ``Pool.stream`` (one worker): the items cross the pool's link as the worker yields them;
- ``workerpool serve`` (one worker, one process): Triton's generate_stream, server-sent
  events, read by an HTTP client in this process;
- LitServe (its own venv, bench/.venvs/litserve): a LitAPI with ``stream=True``, one
  inference worker (bench/peers/litserve/stream_app.py), lines of JSON over HTTP.

For each, ``--rounds`` rounds of: 20 streams of one item back to back (time to the first
item, request sent to item read: their median), and a stream of ``--items`` items (per
item: the time after the first item over the items after it); medians over the rounds.
``Pool.submit`` is the reference for the first item: one plain answer of the same model,
the same way. Every path's items are checked against the model run here. Prints JSON and
writes bench/results/streaming.md.

    .venv/bin/python bench/streaming.py [--rounds 5] [--items 2000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import stream_model
from common import emit, free_port, log, markdown_table, stop_group
from reporting import venvs

import workerpool as wp

HERE = pathlib.Path(__file__).resolve().parent


def expected(n: int) -> list[np.ndarray]:
    return list(stream_model.predict(stream_model.load(), n))


def check(items: list, n: int, what: str) -> None:
    want = expected(n)
    if len(items) != n or not all(np.allclose(a, b) for a, b in zip(items, want)):
        raise RuntimeError(f"{what}: {len(items)} items, not the {n} the model yields")


def timed(stream_items) -> tuple[float, float, list]:
    """(seconds to the first item, seconds per item after it, items) of a call that
    returns an iterator of items (each read as it comes)."""
    started = time.perf_counter()
    iterator = stream_items()
    items = [next(iterator)]
    first = time.perf_counter()
    items.extend(iterator)
    done = time.perf_counter()
    return first - started, (done - first) / max(1, len(items) - 1), items


# -- the paths ---------------------------------------------------------------------------------
def in_process(n: int):
    model = stream_model.load()
    return lambda: stream_model.predict(model, n)


def through_pool(pool, n: int):
    return lambda: iter(pool.stream(np.array([n])))


def http_lines(port: int, path: str, body: dict, parse):
    """An HTTP streaming call read line by line; ``parse(line)`` is an item or None."""
    def call():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {response.read()[:200]!r}")
        try:
            while line := response.readline():
                item = parse(line)
                if item is not None:
                    yield item
        finally:
            connection.close()
    return call


def sse_item(line: bytes):
    if line.startswith(b"data: "):
        return np.asarray(json.loads(line[6:])["output_0"], np.float32)
    return None


def json_line_item(line: bytes):
    line = line.strip()
    return np.asarray(json.loads(line)["output_0"], np.float32) if line else None


class Process:
    def __init__(self, command: list[str], port: int, ready_path: str, cwd=None, env=None):
        self.port = port
        self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 180
        while not self.answers(ready_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command[:3]} did not start")
            time.sleep(0.3)

    def answers(self, path: str) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            connection.request("GET", path)
            return connection.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        stop_group(self.process)


def start_workerpool(directory: pathlib.Path) -> Process:
    config = directory / "serve.toml"
    config.write_text('[models.stream]\nsource = "stream_model:load"\n'
                      'predict = "stream_model:predict"\nworkers = 1\n')
    port = free_port()
    return Process([sys.executable, "-m", "workerpool", "serve", "--port", str(port),
                    "--config", str(config)], port, "/v2/health/ready",
                   env={"PYTHONPATH": str(HERE)})


def start_litserve() -> Process:
    python = venvs.build("litserve", sys.stderr)
    port = free_port()
    return Process([python, str(HERE / "peers" / "litserve" / "stream_app.py"), str(port)],
                   port, "/health", env={"PYTHONPATH": str(HERE)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    n = args.items
    results = {name: {"first": [], "per_item": []} for name in (
        "in process", "Pool.submit (one answer)", "Pool.stream", "workerpool serve",
        "LitServe")}
    with tempfile.TemporaryDirectory() as tmp, \
            wp.Pool(stream_model.load, stream_model.predict, workers=1) as pool, \
            wp.Pool(stream_model.load, stream_model.first, workers=1) as unary:
        servers = {"workerpool serve": start_workerpool(pathlib.Path(tmp))}
        try:
            servers["LitServe"] = start_litserve()
        except (venvs.Unavailable, RuntimeError) as exc:
            log(f"LitServe left out: {exc}")
        try:
            paths = {
                "in process": lambda k: in_process(k),
                "Pool.stream": lambda k: through_pool(pool, k),
                "workerpool serve": lambda k: http_lines(
                    servers["workerpool serve"].port, "/v2/models/stream/generate_stream",
                    {"n": k}, sse_item),
            }
            if "LitServe" in servers:
                paths["LitServe"] = lambda k: http_lines(servers["LitServe"].port,
                                                         "/predict", {"n": k}, json_line_item)
            for name, path in paths.items():  # warm each, and check its items
                _, _, items = timed(path(n))
                check(items, n, name)
            for round_ in range(args.rounds):
                firsts = []
                for _ in range(20):
                    started = time.perf_counter()
                    unary.submit(np.array([1])).result()
                    firsts.append(time.perf_counter() - started)
                results["Pool.submit (one answer)"]["first"].append(statistics.median(firsts))
                for name, path in paths.items():
                    firsts = []
                    for _ in range(20):
                        first, _, items = timed(path(1))
                        check(items, 1, name)
                        firsts.append(first)
                    first = statistics.median(firsts)
                    _, per_item, items = timed(path(n))
                    check(items, n, name)
                    results[name]["first"].append(first)
                    results[name]["per_item"].append(per_item)
                log(f"round {round_ + 1}: " + ", ".join(
                    f"{k} {1e3 * v['first'][-1]:.2f} ms first, "
                    f"{1e6 * v['per_item'][-1]:.1f} us/item" for k, v in results.items()
                    if v["per_item"]))
        finally:
            for server in servers.values():
                server.stop()
    rows = []
    base = statistics.median(results["in process"]["per_item"])
    for name, values in results.items():
        if not values["first"]:
            continue
        first = statistics.median(values["first"])
        row = {"path": name, "first item ms": 1e3 * first}
        if values["per_item"]:
            per_item = statistics.median(values["per_item"])
            row.update({"per item us": 1e6 * per_item, "items/s": 1 / per_item,
                        "per item vs in process": per_item / base})
        rows.append(row)
    ours = next(r for r in rows if r["path"] == "workerpool serve")
    peer = next((r for r in rows if r["path"] == "LitServe"), None)
    if peer is not None:
        ours["per item vs LitServe"] = ours["per item us"] / peer["per item us"]
        ours["first item vs LitServe"] = ours["first item ms"] / peer["first item ms"]
    columns = ["path", "first item ms", "per item us", "items/s", "per item vs in process",
               "per item vs LitServe", "first item vs LitServe"]
    markdown = (f"# Streaming: first item and per-item cost\n\n`bench/streaming.py --rounds "
                f"{args.rounds} --items {n}`: medians of {args.rounds} rounds; items are 16 "
                "float32, the generator computes nothing.\n\n" + markdown_table(rows, columns))
    emit({"rows": rows, "rounds": args.rounds, "items": n, "raw": results}, "streaming",
         markdown)


if __name__ == "__main__":
    main()
