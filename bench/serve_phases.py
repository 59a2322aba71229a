"""Where one sequential request to `workerpool serve` spends its time, server and workers
together: bench/light.py's light model (64 -> 10, numpy), 2 workers, one-row KServe v2
JSON, one client on a keep-alive connection, requests back to back.

The server is started as bench/light.py starts it (its gRPC port idle), with
bench/serve_probe/ first on its PYTHONPATH: its sitecustomize wraps
a few of workerpool's functions in every process of the server (the server's and each
worker's; perf_counter is one clock for all of them) and notes when each starts, and this
script notes when it sent each request and when the whole answer was in. Sorted by time,
a request's notes make a sequence; the most common sequence is the one measured, each step
(from one note to the next) by its p50 and mean over the requests that took it:

    client:sent -> server:data_received     the kernel's loopback, the loop's wake, the read
    server:data_received -> ..._done    httptools parsing (uvicorn's callbacks, guard.py's)
    server:data_received_done -> server:asgi    uvicorn's task for the request started
    server:asgi -> server:parse_infer   our ASGI app: request id, route, model, body read
    server:parse_infer -> server:parsed_infer   the KServe JSON body decoded
    server:parsed_infer -> server:run   the call's data plane entered
    server:run -> server:encode         the data plane's checks, Pool.submit_async
    server:encode -> server:encoded     the call encoded for the link (ipc/codec.py)
    server:encoded -> server:turn       the loop driver's turn, queued on the event loop
    server:turn -> server:send          the scheduler: worker picked, TASK frames
    server:send -> worker:recv          ZeroMQ: the server's I/O thread, the worker's, a wake
    worker:recv -> worker:call          head read, items split
    worker:call ... worker:called       decode_call, predict (decoded_call -> called)
    worker:encode -> worker:encoded     the result encoded
    worker:send -> server:router_readable   ZeroMQ back, and the event loop's wake
    server:recv -> server:settle        the answer read: head, scheduler, decode
    server:settle -> server:ran         the request's coroutine resumed, outputs chosen
    server:ran -> server:responded      the JSON answer encoded and written
    server:responded -> server:asgi_done    the access log, the ASGI call's end
    ... -> client:answered              the answer read here (it may arrive first)

With ``--inline`` the model is served ``inline = true`` (no worker). The probes cost about
a microsecond each; the p50 of the same requests to a server without them is measured
beside it in the same run (``unprobed p50``: it differs from the probed one by more than
that on this noisy machine, either way).
Prints JSON and writes bench/results/serve_phases.md (serve_phases_inline.md).

    .venv/bin/python bench/serve_phases.py [--requests 3000] [--inline]
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import shutil
import socket
import statistics
import sys
import tempfile
import time

from common import emit, log, markdown_table
from http_load import request_bytes
from light import PATH, bodies, start_workerpool

HERE = pathlib.Path(__file__).resolve().parent
WARMUP = 500


def call(connection: socket.socket, request: bytes) -> None:
    """One request; returns once its whole answer is read (a 200, or RuntimeError)."""
    connection.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the server answered {head[:40]!r}")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += connection.recv(65536)


def run_requests(directory: pathlib.Path, inline: bool, request: bytes, requests: int,
                 probes: pathlib.Path | None) -> list[tuple[int, int]]:
    """(sent, answered) perf_counter_ns of each timed request to a fresh server."""
    env = None if probes is None else {
        "PYTHONPATH": os.pathsep.join([str(HERE / "serve_probe"), str(HERE)]),
        "PROBE_OUT": str(probes)}
    server = start_workerpool(2, directory, 1, inline, env=env)  # (ready once started)
    try:
        connection = socket.create_connection(("127.0.0.1", server.port))
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(WARMUP):
            call(connection, request)
        times = []
        for _ in range(requests):
            sent = time.perf_counter_ns()
            call(connection, request)
            times.append((sent, time.perf_counter_ns()))
        connection.close()
    finally:
        server.stop()  # SIGTERM: each process writes its last notes as it exits
    return times


def sequences(probes: pathlib.Path, times: list[tuple[int, int]]) -> list[list[tuple]]:
    """Each timed request's notes in time order, as (ns, "process:tag")."""
    notes = []
    counts: collections.Counter = collections.Counter()
    for path in probes.glob("*.txt"):
        pid_notes = [(int(t), tag) for t, tag in (line.split() for line in path.open())]
        counts[path.stem] = sum(tag == "run" for _, tag in pid_notes)
        notes.append((path.stem, pid_notes))
    server = counts.most_common(1)[0][0]  # the process where every request's run began
    merged = sorted((t, f"{'server' if pid == server else 'worker'}:{tag}")
                    for pid, pid_notes in notes for t, tag in pid_notes)
    result, at = [], 0
    for sent, answered in times:
        while at < len(merged) and merged[at][0] < sent:
            at += 1
        inside = []
        while at < len(merged) and merged[at][0] <= answered:
            inside.append(merged[at])
            at += 1
        result.append([(sent, "client:sent"), *inside, (answered, "client:answered")])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--inline", action="store_true")
    args = parser.parse_args()
    directory = pathlib.Path(tempfile.mkdtemp(prefix="bench-serve-phases-"))
    try:
        probes = directory / "probes"
        probes.mkdir()
        body, headers = bodies(directory)["json"]
        request = request_bytes("127.0.0.1", PATH, body.read_bytes(), headers)
        unprobed = run_requests(directory, args.inline, request, args.requests, None)
        probed = run_requests(directory, args.inline, request, args.requests, probes)
        time.sleep(0.5)  # (the workers' last notes)
        requests = sequences(probes, probed)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    shapes = collections.Counter(tuple(tag for _, tag in r) for r in requests)
    shape, count = shapes.most_common(1)[0]
    taken = [r for r in requests if tuple(tag for _, tag in r) == shape]
    rows = []
    for step in range(1, len(shape)):
        spans = [(r[step][0] - r[step - 1][0]) / 1000 for r in taken]
        rows.append({"from": shape[step - 1], "to": shape[step],
                     "p50_us": round(statistics.median(spans), 1),
                     "mean_us": round(statistics.mean(spans), 1)})
    total = statistics.median((r[-1][0] - r[0][0]) / 1000 for r in taken)
    plain = statistics.median((b - a) / 1000 for a, b in unprobed)
    summary = {"requests": args.requests, "inline": args.inline, "measured": count,
               "probed_p50_us": round(total, 1), "unprobed_p50_us": round(plain, 1),
               "steps": rows}
    how = "inline = true" if args.inline else "2 workers"
    markdown = (f"# One sequential request to workerpool serve, step by step ({how}, "
                f"{os.cpu_count()} CPUs)\n\n"
                f"`{' '.join(['bench/serve_phases.py', *sys.argv[1:]])}`\n\n"
                f"{count} of {len(requests)} requests took the sequence below; p50 of a "
                f"whole probed request {total:.1f} us, of an unprobed one "
                f"{plain:.1f} us (the same requests to a server without the probes).\n\n"
                + markdown_table(rows, ["from", "to", "p50_us", "mean_us"]))
    log(markdown)
    emit(summary, "serve_phases_inline" if args.inline else "serve_phases", markdown)


if __name__ == "__main__":
    main()
