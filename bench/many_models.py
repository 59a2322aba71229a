"""Many models in one server: memory against one plain process, waking from zero, and a
hundred models called round robin.

``--models`` torch MLPs of ``--size`` MiB of fp32 weights each (bench/server_models.py's
``torch_mlp``: each model loads and publishes its own copy) in one ``workerpool serve
--config``; every answer is checked against the model called in a helper process, and
every load() is counted (a wake must not load again). Three measurements:

- memory: ``--workers`` workers each, every model called; the server tree's total PSS
  (server, runtime, zygotes, workers; and per kind) against one plain Python process that
  builds all the models and calls each once (target: <= 1.25x);
- wake: the same models with ``--min-workers 0 --idle-timeout 0.5``; once all have scaled
  to zero, each is called (fork + attach + answer) and called again at once (a warm
  worker), ``--wake-rounds`` times (target: wake p50 <= 50 ms, loads == models);
- many: ``--many`` models of ``--many-size`` MiB, ``--min-workers 0 --idle-timeout 5``,
  called round robin ``--cycles`` times: total PSS and latency.

Prints JSON and writes bench/results/many_models.md.

    .venv/bin/python bench/many_models.py [--models 8] [--size 32] [--many 100]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

from common import emit, log, markdown_table, memory_of, mib, mlp_shape, tree_pids
from server_memory import get, infer, reference, start_server

HERE = pathlib.Path(__file__).resolve().parent

PLAIN_PROCESS = """
import sys, numpy as np, psutil, torch, server_models
torch.set_num_threads(1)
models = [server_models.torch_mlp() for _ in range(int(sys.argv[1]))]
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.inference_mode():
    for model in models:
        model(x)
print(psutil.Process().memory_full_info().pss)
"""


def plain_process_pss(models: int, size: int, x: np.ndarray) -> int:
    """PSS of one process holding every model, each called once (what a user might run)."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/x.npy", x)
        out = subprocess.run([sys.executable, "-c", PLAIN_PROCESS, str(models),
                              f"{tmp}/x.npy"], check=True, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(HERE),
                                      WORKERPOOL_BENCH_MIB=str(size)))
    return int(out.stdout.split()[-1])


def kind_of(process: psutil.Process, server_pid: int) -> str:
    command = " ".join(process.cmdline())
    if process.pid == server_pid:
        return "server"
    if "workerpool.workers.runtime" in command:
        parent = process.parent()
        if parent is not None and parent.pid == server_pid:
            return "runtime"
        # the runtime forks a zygote only for a model loaded as it attaches (TorchScript);
        # the others' workers are its children
        grandparent = parent.parent() if parent is not None else None
        return "zygote" if grandparent is not None and grandparent.pid == server_pid \
            and process.children() else "worker"
    if "workerpool.workers.zygote" in command:
        return "zygote"
    return "worker"


class ServedModels:
    """``workerpool serve`` with ``models`` copies of the torch MLP named m0, m1, ...; every
    load() call noted in a file (``loads``)."""

    def __init__(self, models: int, size: int, workers: int, extra: list[str]):
        self.names = [f"m{i}" for i in range(models)]
        self.tmp = tempfile.TemporaryDirectory(prefix="wp-many-models-")
        config = pathlib.Path(self.tmp.name) / "serve.toml"
        config.write_text("".join(f'[models.{name}]\nsource = "server_models:torch_mlp_counted"\n'
                                  for name in self.names))
        self.loads_file = pathlib.Path(self.tmp.name) / "loads"
        os.environ["WORKERPOOL_BENCH_MIB"] = str(size)
        os.environ["WORKERPOOL_BENCH_LOADS"] = str(self.loads_file)
        start = time.perf_counter()
        self.process, self.port = start_server(config, "loader", workers, extra)
        deadline = time.monotonic() + 1800
        while get(self.port, "/v2/health/ready")[0] != 200:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the server never became ready")
            time.sleep(0.5)
        self.ready_s = time.perf_counter() - start

    @property
    def loads(self) -> int:
        return len(self.loads_file.read_text().split()) if self.loads_file.exists() else 0

    def status(self) -> list[dict]:
        return get(self.port, "/status")[1]["models"]

    def timed_infer(self, name: str, x: np.ndarray) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        y = infer(self.port, name, x)
        return time.perf_counter() - started, y

    def memory(self) -> tuple[dict, dict[str, list[int]]]:
        memory = memory_of(tree_pids(self.process.pid))
        kinds: dict[str, list[int]] = {}
        for pid in memory:
            try:
                kinds.setdefault(kind_of(psutil.Process(pid), self.process.pid), []).append(pid)
            except psutil.NoSuchProcess:
                pass
        return memory, kinds

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(300)
        self.process.stdout.close()
        self.tmp.cleanup()


def memory_row(memory: dict, kinds: dict[str, list[int]]) -> dict:
    row = {"tree_pss_mib": mib(sum(m["pss"] for m in memory.values())),
           "processes": len(memory)}
    for kind in ("server", "runtime", "zygote", "worker"):
        pids = [p for p in kinds.get(kind, []) if p in memory]
        row[f"{kind}s"] = len(pids)
        for field in ("pss", "uss"):
            row[f"{kind}_{field}_mib_each"] = \
                mib(sum(memory[p][field] for p in pids) / len(pids)) if pids else None
    return row


def measure_memory(models: int, size: int, workers: int, x: np.ndarray,
                   expected: np.ndarray) -> dict:
    """Every model called (three times each), then the whole tree measured."""
    served = ServedModels(models, size, workers, [])
    try:
        outputs_equal = all(np.array_equal(served.timed_infer(name, x)[1], expected)
                            for name in served.names for _ in range(3))
        row = {"models": models, "model_mib_each": size, "workers_each": workers,
               **memory_row(*served.memory()), "ready_s": round(served.ready_s, 1),
               "outputs_equal": outputs_equal, "loads": served.loads}
    finally:
        served.close()
    return row


def all_asleep(served: ServedModels) -> bool:
    return all(m.get("workers_state", "").startswith("scaled to zero")
               for m in served.status())


def measure_wake(models: int, size: int, rounds: int, x: np.ndarray,
                 expected: np.ndarray) -> dict:
    """Each model scaled to zero, then called: the wake (fork + attach + answer) against a
    call to the same model right after (a warm worker), ``rounds`` times each."""
    served = ServedModels(models, size, 1, ["--min-workers", "0", "--idle-timeout", "0.5"])
    wakes, warm, equal = [], [], True
    try:
        for _ in range(rounds):
            deadline = time.monotonic() + 120
            while not all_asleep(served):
                if time.monotonic() > deadline:
                    raise RuntimeError("the models never scaled to zero")
                time.sleep(0.2)
            for name in served.names:
                seconds, y = served.timed_infer(name, x)
                wakes.append(seconds)
                equal &= np.array_equal(y, expected)
                seconds, y = served.timed_infer(name, x)
                warm.append(seconds)
                equal &= np.array_equal(y, expected)
        loads = served.loads
    finally:
        served.close()
    return {"models": models, "model_mib_each": size, "wakes": len(wakes),
            "wake_p50_ms": round(1000 * float(np.median(wakes)), 1),
            "wake_p90_ms": round(1000 * float(np.percentile(wakes, 90)), 1),
            "warm_p50_ms": round(1000 * float(np.median(warm)), 1),
            "loads": loads, "outputs_equal": bool(equal)}


def measure_many(models: int, size: int, cycles: int, idle_timeout: float, x: np.ndarray,
                 expected: np.ndarray) -> dict:
    """``models`` models that scale to zero after ``idle_timeout``, called round robin
    ``cycles`` times. PSS counts a weight page only while a live process maps it: the
    weights published in memory (``weights_mib``) are said beside it."""
    served = ServedModels(models, size, 1,
                          ["--min-workers", "0", "--idle-timeout", str(idle_timeout)])
    latencies, equal = [], True
    try:
        ready_s = served.ready_s
        for _ in range(cycles):
            for name in served.names:
                seconds, y = served.timed_infer(name, x)
                latencies.append(seconds)
                equal &= np.array_equal(y, expected)
        memory, kinds = served.memory()
        status = served.status()
        loads = served.loads
    finally:
        served.close()
    return {"models": models, "model_mib_each": size, "idle_timeout_s": idle_timeout,
            "calls": len(latencies), "ready_s": round(ready_s, 1),
            "p50_ms": round(1000 * float(np.median(latencies)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
            "weights_mib": mib(sum(m.get("model_bytes", 0) for m in status)),
            "asleep": sum(m.get("workers_state", "").startswith("scaled to zero")
                          for m in status),
            **memory_row(memory, kinds), "loads": loads, "outputs_equal": bool(equal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="MiB of weights per model")
    parser.add_argument("--workers", type=int, default=1, help="workers per model")
    parser.add_argument("--wake-rounds", type=int, default=3)
    parser.add_argument("--many", type=int, default=100, help="models of the round robin")
    parser.add_argument("--many-size", type=int, default=16)
    parser.add_argument("--cycles", type=int, default=3, help="round robin cycles")
    parser.add_argument("--skip", action="append", default=[],
                        choices=("memory", "wake", "many"))
    args = parser.parse_args()
    result: dict = {}
    sections = [f"# Many models in one server ({os.cpu_count()} CPUs)"]
    if "memory" not in args.skip:
        x = np.ones((2, mlp_shape(args.size)[0]), np.float32)
        expected = reference(args.size, x)["torch_mlp"]
        plain = plain_process_pss(args.models, args.size, x)
        log(f"  one plain process holding {args.models} models: {mib(plain)} MiB PSS")
        row = measure_memory(args.models, args.size, args.workers, x, expected)
        row["plain_process_pss_mib"] = mib(plain)
        row["tree_vs_plain"] = round(row["tree_pss_mib"] / mib(plain), 3)
        log(f"  workerpool serve: {row['tree_pss_mib']} MiB PSS ({row['tree_vs_plain']} x)")
        result["memory"] = row
        sections += [f"## {args.models} x {args.size} MiB torch models, {args.workers} "
                     "worker(s) each, against one plain process holding them all",
                     markdown_table([row], list(row))]
        x_wake, expected_wake = x, expected
        if "wake" not in args.skip:
            row = measure_wake(args.models, args.size, args.wake_rounds, x_wake,
                               expected_wake)
            log(f"  wake from zero: p50 {row['wake_p50_ms']} ms (warm {row['warm_p50_ms']})")
            result["wake"] = row
            sections += ["## Wake from zero workers to the first answer (HTTP, JSON)",
                         markdown_table([row], list(row))]
    if "many" not in args.skip:
        x = np.ones((2, mlp_shape(args.many_size)[0]), np.float32)
        expected = reference(args.many_size, x)["torch_mlp"]
        rows = []
        for idle_timeout in (5.0, 0.5):  # a cycle takes ~2 s: all awake, then each call a wake
            rows.append(measure_many(args.many, args.many_size, args.cycles, idle_timeout, x,
                                     expected))
            log(f"  {args.many} models round robin, idle timeout {idle_timeout} s: p50 "
                f"{rows[-1]['p50_ms']} ms, {rows[-1]['tree_pss_mib']} MiB PSS")
        result["many"] = rows
        sections += [f"## {args.many} x {args.many_size} MiB models that scale to zero, "
                     "called round robin", markdown_table(rows, list(rows[0])),
                     "PSS counts a weight page only while a live process maps it: "
                     "`weights_mib` is what the models published, in memory either way."]
    emit(result, "many_models", "\n\n".join(sections))


if __name__ == "__main__":
    main()
