"""Shared helpers of the benchmarks: a fp32 MLP of a target size, PSS/USS of processes,
the model functions the pools run, a raw ZeroMQ echo peer and a p50 timer for the overhead
benchmarks, and JSON + markdown output.

torch is imported inside the torch helpers, not here, so a benchmark of another framework
(bench/tf_memory.py) can use the rest without loading torch into its processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    import torch
    from torch import nn

MIB = 1024 * 1024
MAX_WIDTH = 4096
BATCH = 8
# bench/report.py points this elsewhere when it runs a benchmark as one of its parts.
RESULTS = pathlib.Path(os.environ.get("WORKERPOOL_BENCH_RESULTS")
                       or pathlib.Path(__file__).resolve().parent / "results")


# -- the model ---------------------------------------------------------------------------
def mlp_shape(mib: int) -> tuple[int, int]:
    """(width, layers) of square Linear layers holding about ``mib`` MiB of fp32 weights."""
    width = min(MAX_WIDTH, int((mib * MIB / 4) ** 0.5) // 64 * 64)
    return width, max(1, round(mib * MIB / (4 * width * width)))


def mlp_skeleton(width: int, layers: int) -> nn.Sequential:
    from torch import nn

    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*modules).eval()


def build_mlp(mib: int) -> nn.Sequential:
    """The benchmark model: ``mib`` MiB of fp32 weights, seeded."""
    import torch

    torch.manual_seed(0)
    return mlp_skeleton(*mlp_shape(mib))


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_input(mib: int) -> torch.Tensor:
    import torch

    return torch.ones(BATCH, mlp_shape(mib)[0])


def predict(model, x):
    """What the workers run: one forward pass; returns the worker's pid and a checksum."""
    return os.getpid(), float(model(x).sum())


def predict_named(model, x):
    """``predict`` for a model whose one output comes back by name (a SavedModel)."""
    (y,) = model(x).values()
    return os.getpid(), float(y.sum())


# -- memory ------------------------------------------------------------------------------
def memory_of(pids) -> dict[int, dict]:
    """{pid: {"pss", "uss"}} in bytes for each live pid (psutil memory_full_info)."""
    out = {}
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.NoSuchProcess:
            continue
        out[pid] = {"pss": info.pss, "uss": info.uss}
    return out


def tree_pids(root: int | None = None) -> list[int]:
    """``root`` (default: this process) and all its descendants."""
    proc = psutil.Process(root)
    return [proc.pid] + [c.pid for c in proc.children(recursive=True)]


def memfd_mappings(pid: int | None = None) -> int:
    """How many mappings of a workerpool weight memfd ``pid`` still has (leak check)."""
    with open(f"/proc/{pid or os.getpid()}/maps") as maps:
        return sum("memfd:workerpool-weights" in line for line in maps)


def mib(nbytes: float) -> float:
    return round(nbytes / MIB, 1)


# -- output ------------------------------------------------------------------------------
def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def emit(result, name: str, markdown: str) -> None:
    """JSON on stdout, markdown into bench/results/<name>.md."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    print(f"wrote {RESULTS / f'{name}.md'}", file=sys.stderr)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def sizes_and_workers(description: str, default_sizes: str = "256,1024",
                      default_workers: str = "1,2,4", methods: tuple[str, ...] = ()):
    """The --sizes and --workers options of the memory benchmarks (and --methods, a
    comma-separated subset of ``methods``, when given: then a third list is returned)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default=default_sizes,
                        help="model sizes in MiB, comma-separated")
    parser.add_argument("--workers", default=default_workers, help="worker counts, comma-separated")
    if methods:
        parser.add_argument("--methods", default=",".join(methods),
                            help=f"comma-separated subset of {','.join(methods)}")
    args = parser.parse_args()
    sizes, counts = [int(s) for s in args.sizes.split(",")], [int(n) for n in args.workers.split(",")]
    if not methods:
        return sizes, counts
    chosen = args.methods.split(",")
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        parser.error(f"unknown methods {unknown}")
    return sizes, counts, chosen


# -- raw ZeroMQ: the baseline link of the overhead benchmarks -------------------------------
def zmq_echo(endpoint: str) -> None:
    """A DEALER that sends back every message it gets, frames untouched (zero-copy)."""
    import zmq

    context = zmq.Context(io_threads=1)
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"ready")
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[0].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    sock.close()
    context.term()


class ZmqEcho:
    """A ROUTER here (``router``, the peer's ``identity``), an echo DEALER in a spawned
    process, over ipc:// like the pool's own link."""

    def __init__(self):
        import zmq

        self.directory = tempfile.TemporaryDirectory(prefix="wp-echo-")
        endpoint = f"ipc://{self.directory.name}/echo"
        self.context = zmq.Context(io_threads=1)
        self.router = self.context.socket(zmq.ROUTER)
        self.router.bind(endpoint)
        self.process = multiprocessing.get_context("spawn").Process(
            target=zmq_echo, args=(endpoint,), daemon=True)
        self.process.start()
        self.identity, _ = self.router.recv_multipart()

    def round_trip(self, frames: list) -> list:
        self.router.send_multipart([self.identity, *frames], copy=False)
        return self.router.recv_multipart(copy=False)[1:]

    def close(self) -> None:
        self.router.send_multipart([self.identity, b"stop"])
        self.process.join(10)
        self.router.close(linger=0)
        self.context.term()
        self.directory.cleanup()


def p50_us(call, n: int) -> float:
    """Median wall time of ``n`` calls of ``call()``, in microseconds."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process) -> None:
    """SIGTERM to a server started with ``start_new_session=True`` and its whole process
    group, SIGKILL after 60 s."""
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
