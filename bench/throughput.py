"""Throughput and latency of a small torch MLP served by a 2-worker Pool, batching on vs off.

The model: ``Linear(512, 1024) -> ReLU -> Linear(1024, 1024) -> ReLU -> Linear(1024, 10)``,
fp32, seed 0 (about 6 MiB); ``predict`` is ``model(x)`` (the pool runs it under
``torch.inference_mode``); every request is one tensor of shape (1, 512). Pools use the
default threads per worker (usable cores // workers). Configurations:

- off:     ``max_batch_size=1`` (no batching);
- on:      ``max_batch_size=32, max_wait_ms=0`` (batch only what is already queued);
- on+wait: ``max_batch_size=32, max_wait_ms=2`` (latency phase only: what waiting costs).

Measured, always as ratios within this run (the machine is shared and noisy):

1. Throughput under concurrent load, batching on vs off, both pools open at once and the
   trials alternated (ABBA...) over ``--rounds`` rounds; the median trial is reported:
   - closed loop: ``--callers`` threads, each ``submit(x).result()`` in a loop, ``--requests``
     requests in all (split evenly); requests/s from the barrier that starts them to the
     last thread's end, plus the per-request latency each caller saw (p50/p99);
   - map: ``list(pool.map(xs))`` over ``--map-requests`` single-row inputs (default window).
   mean_batch_size is rows per predict call during that trial (delta of
   ``pool.stats()["batch_size_histogram"]``); parent/workers CPU is psutil user + system time
   of this process and of the workers during the trial, per request.
2. Latency at low load: one caller, sequential ``submit(x).result()``; after ``--warmup``
   requests per pool, ``--latency-requests`` requests per pool, interleaved across the three
   pools (off, on, on+wait) in blocks of 50 so they see the same noise; p50/p99/mean in ms and
   their ratios to off. ``queue_ms``/``compute_ms`` are the pool's own figures (``pool.stats()``).
3. Baseline: the same model called in this process (1 intra-op thread, inference_mode,
   batch of 1), per-call latency p50/p99 and the calls/s that makes; also rows/s at batch 32
   as the compute ceiling of one core.

Every pool result is checked against the in-process output (max abs difference reported).
Prints JSON on stdout and writes bench/results/throughput.md.

    .venv/bin/python bench/throughput.py [--requests 3000] [--callers 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import subprocess
import threading
import time

import numpy as np
import psutil
import torch
from torch import nn

import workerpool
from common import emit, log, markdown_table

IN_FEATURES = 512
N_INPUTS = 256  # distinct input rows, reused round-robin
RESULT_TIMEOUT_S = 60.0  # a request not answered by then is reported as a hang
LATENCY_BLOCK = 50  # latency phase: consecutive requests to one pool before the next

CONFIGS = {
    "off": {"max_batch_size": 1},
    "on": {"max_batch_size": 32, "max_wait_ms": 0},
    "on+wait2ms": {"max_batch_size": 32, "max_wait_ms": 2},
}


# -- what the pool runs (module level) ----------------------------------------------------
def load() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                         nn.ReLU(), nn.Linear(1024, 10)).eval()


def predict(model, x):
    return model(x)


# -- helpers ------------------------------------------------------------------------------
def make_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, IN_FEATURES, generator=generator) for _ in range(N_INPUTS)]


def percentiles_ms(seconds: list[float]) -> dict:
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
            "mean_ms": round(float(np.mean(seconds)) * 1000, 3)}


def histogram(pool) -> collections.Counter:
    return collections.Counter(pool.stats(memory_usage=False)["batch_size_histogram"])


def mean_batch(before: collections.Counter, after: collections.Counter) -> tuple[float, dict]:
    delta = after - before
    calls = sum(delta.values())
    rows = sum(size * n for size, n in delta.items())
    return (round(rows / calls, 2) if calls else 0.0), dict(sorted(delta.items()))


class Checker:
    """Compares pool outputs with the in-process model's (batched GEMMs may differ in the
    last bits from batch-1 ones, so the max abs difference is recorded, not equality)."""

    def __init__(self, expected: list[torch.Tensor]):
        self.expected = expected
        self.max_abs_diff = 0.0
        self.bad_shapes = 0
        self.lock = threading.Lock()

    def check(self, index: int, output) -> None:
        expected = self.expected[index % len(self.expected)]
        if not isinstance(output, torch.Tensor) or output.shape != expected.shape:
            with self.lock:
                self.bad_shapes += 1
            return
        diff = float((output - expected).abs().max())
        with self.lock:
            self.max_abs_diff = max(self.max_abs_diff, diff)


class CpuMeter:
    """CPU seconds (user + system) of this process and of the pool's workers over a trial,
    per request: shows which side (the parent's dispatcher and callers, or the workers)
    limits throughput."""

    def __init__(self, pool):
        self.procs = [psutil.Process(os.getpid())] + [psutil.Process(p) for p in pool.pids]
        self.start = [self._cpu(p) for p in self.procs]

    @staticmethod
    def _cpu(proc) -> float:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:  # a worker replaced mid-trial: its share is lost
            return float("nan")
        return times.user + times.system

    def per_request_us(self, requests: int) -> dict:
        used = [self._cpu(p) - s for p, s in zip(self.procs, self.start)]
        return {"parent_cpu_us_per_req": round(used[0] / requests * 1e6, 1),
                "workers_cpu_us_per_req": round(sum(used[1:]) / requests * 1e6, 1)}


def ratio(a, b):
    return round(a / b, 3) if a and b else None


# -- 3. baseline in this process ----------------------------------------------------------
def inprocess(model, inputs: list[torch.Tensor], warmup: int, n: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for i in range(warmup):
                model(inputs[i % len(inputs)])
            times = []
            for i in range(n):
                x = inputs[i % len(inputs)]
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
            batch = torch.cat(inputs[:32])
            for _ in range(10):
                model(batch)
            calls = max(50, n // 4)
            start = time.perf_counter()
            for _ in range(calls):
                model(batch)
            batch32_rows_per_s = calls * 32 / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    out = {"what": "in-process, 1 thread, batch 1", **percentiles_ms(times)}
    out["calls_per_s"] = round(1000 / out["mean_ms"], 1)
    out["batch32_rows_per_s"] = round(batch32_rows_per_s, 1)
    return out


# -- 1. throughput ------------------------------------------------------------------------
def closed_loop(pool, inputs, checker: Checker, requests: int, callers: int) -> dict:
    per_caller = [requests // callers + (i < requests % callers) for i in range(callers)]
    barrier = threading.Barrier(callers + 1)
    latencies: list[list[float]] = [[] for _ in range(callers)]
    outputs: list[list] = [[] for _ in range(callers)]  # checked after the clock stops
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        mine, answers = latencies[k], outputs[k]
        try:
            barrier.wait()
            for j in range(per_caller[k]):
                index = k * 7919 + j
                start = time.perf_counter()
                output = pool.submit(inputs[index % len(inputs)]).result(RESULT_TIMEOUT_S)
                mine.append(time.perf_counter() - start)
                answers.append((index, output))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(callers)]
    for thread in threads:
        thread.start()
    before = histogram(pool)
    cpu = CpuMeter(pool)
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    flat = [t for per in latencies for t in per]
    cpu_used = cpu.per_request_us(max(1, len(flat)))
    if errors:
        raise RuntimeError(f"{len(errors)} callers failed; first: {errors[0]!r}") from errors[0]
    mean, hist = mean_batch(before, histogram(pool))
    for answers in outputs:
        for index, output in answers:
            checker.check(index, output)
    return {"requests": len(flat), "seconds": round(elapsed, 3),
            "req_per_s": round(len(flat) / elapsed, 1), "mean_batch_size": mean,
            "histogram": hist, **cpu_used,
            **{f"caller_{k}": v for k, v in percentiles_ms(flat).items()}}


def map_run(pool, inputs, checker: Checker, requests: int) -> dict:
    xs = [inputs[i % len(inputs)] for i in range(requests)]
    before = histogram(pool)
    cpu = CpuMeter(pool)
    start = time.perf_counter()
    outputs = list(pool.map(xs, timeout=RESULT_TIMEOUT_S))
    elapsed = time.perf_counter() - start
    cpu_used = cpu.per_request_us(len(outputs))
    mean, hist = mean_batch(before, histogram(pool))
    for i, output in enumerate(outputs):
        checker.check(i, output)
    return {"requests": len(outputs), "seconds": round(elapsed, 3),
            "req_per_s": round(len(outputs) / elapsed, 1), "mean_batch_size": mean,
            "histogram": hist, **cpu_used}


def throughput(pools: dict, inputs, checker: Checker, args) -> dict:
    trials = {(load_kind, name): [] for load_kind in ("closed_loop", "map") for name in pools}
    for rnd in range(args.rounds):
        order = list(pools) if rnd % 2 == 0 else list(reversed(pools))
        for name in order:
            trial = closed_loop(pools[name], inputs, checker, args.requests, args.callers)
            trials["closed_loop", name].append(trial)
            log(f"  round {rnd + 1} closed loop {name:>3}: {trial['req_per_s']:8.1f} req/s, "
                f"mean batch {trial['mean_batch_size']}, caller p50 {trial['caller_p50_ms']} ms")
        for name in reversed(order):
            trial = map_run(pools[name], inputs, checker, args.map_requests)
            trials["map", name].append(trial)
            log(f"  round {rnd + 1} map         {name:>3}: {trial['req_per_s']:8.1f} req/s, "
                f"mean batch {trial['mean_batch_size']}")
    rows = []
    for (load_kind, name), runs in trials.items():
        median = sorted(runs, key=lambda r: r["req_per_s"])[len(runs) // 2]
        rows.append({
            "load": (f"closed loop, {args.callers} callers" if load_kind == "closed_loop"
                     else "pool.map"),
            "load_kind": load_kind, "batching": name, "config": CONFIGS[name],
            "req_per_s": median["req_per_s"],
            "req_per_s_trials": [r["req_per_s"] for r in runs],
            "mean_batch_size": median["mean_batch_size"],
            "histogram": median["histogram"],
            "caller_p50_ms": median.get("caller_p50_ms"),
            "caller_p99_ms": median.get("caller_p99_ms"),
            "parent_cpu_us_per_req": median["parent_cpu_us_per_req"],
            "workers_cpu_us_per_req": median["workers_cpu_us_per_req"],
        })
    for row in rows:
        off = next(r for r in rows if r["load_kind"] == row["load_kind"]
                   and r["batching"] == "off")
        row["ratio_vs_off"] = ratio(row["req_per_s"], off["req_per_s"])
        # per round, on/off of the same round: the noise-robust figure
        on_trials = trials[row["load_kind"], row["batching"]]
        off_trials = trials[row["load_kind"], "off"]
        row["ratio_vs_off_per_round"] = [ratio(a["req_per_s"], b["req_per_s"])
                                         for a, b in zip(on_trials, off_trials)]
    return {"rows": rows}


# -- 2. latency at low load ---------------------------------------------------------------
def latency(pools: dict, inputs, checker: Checker, warmup: int, n: int) -> list[dict]:
    for pool in pools.values():
        for i in range(warmup):
            checker.check(i, pool.submit(inputs[i % len(inputs)]).result(RESULT_TIMEOUT_S))
    before = {name: histogram(pool) for name, pool in pools.items()}
    times = {name: [] for name in pools}
    names = list(pools)
    # Blocks of LATENCY_BLOCK requests, pools in rotating order: each pool sees the same
    # noise, and a pool's worker is not made to run with another pool's weights in cache
    # on every request (interleaving one by one tripled the worker's compute time).
    for block, first in enumerate(range(0, n, LATENCY_BLOCK)):
        shift = block % len(names)
        for name in names[shift:] + names[:shift]:
            for i in range(first, min(n, first + LATENCY_BLOCK)):
                start = time.perf_counter()
                output = pools[name].submit(inputs[i % len(inputs)]).result(RESULT_TIMEOUT_S)
                times[name].append(time.perf_counter() - start)
                checker.check(i, output)
    rows = []
    for name, pool in pools.items():
        stats = pool.stats(memory_usage=False)
        mean = mean_batch(before[name], collections.Counter(stats["batch_size_histogram"]))[0]
        rows.append({"batching": name, "config": CONFIGS[name], "requests": n,
                     **percentiles_ms(times[name]), "mean_batch_size": mean,
                     "pool_queue_p50_ms": stats["queue_ms"]["p50"],
                     "pool_queue_p99_ms": stats["queue_ms"]["p99"],
                     "pool_compute_p50_ms": stats["compute_ms"]["p50"],
                     "pool_compute_p99_ms": stats["compute_ms"]["p99"]})
    off = rows[0]
    for row in rows:
        row["p50_ratio_vs_off"] = ratio(row["p50_ms"], off["p50_ms"])
        row["p99_ratio_vs_off"] = ratio(row["p99_ms"], off["p99_ms"])
        row["mean_ratio_vs_off"] = ratio(row["mean_ms"], off["mean_ms"])
    return rows


# -- the run ------------------------------------------------------------------------------
def open_pools(stack: contextlib.ExitStack, names: list[str], workers: int) -> dict:
    pools = {}
    for name in names:
        start = time.perf_counter()
        pools[name] = stack.enter_context(
            workerpool.Pool(load, predict, workers=workers, **CONFIGS[name]))
        log(f"  pool {name}: ready in {time.perf_counter() - start:.2f} s "
            f"(threads per worker {pools[name].config.threads})")
    return pools


def pool_stats(pools: dict) -> list[dict]:
    rows = []
    for name, pool in pools.items():
        stats = pool.stats(memory_usage=False)
        rows.append({"batching": name, "mean_batch_size": round(stats["mean_batch_size"], 2),
                     "queue_p50_ms": stats["queue_ms"]["p50"],
                     "queue_p99_ms": stats["queue_ms"]["p99"],
                     "compute_p50_ms": stats["compute_ms"]["p50"],
                     "compute_p99_ms": stats["compute_ms"]["p99"],
                     "served": [w["requests_served"] for w in stats["workers"]],
                     **{k: stats[k] for k in ("restarts", "crashes", "hung", "timeouts",
                                              "late_replies") if stats.get(k)}})
    return rows


def git_state() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" (src modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000,
                        help="requests per closed-loop trial (all callers together)")
    parser.add_argument("--callers", type=int, default=64, help="closed-loop caller threads")
    parser.add_argument("--map-requests", type=int, default=5000, help="inputs per map trial")
    parser.add_argument("--rounds", type=int, default=5, help="throughput trials per config")
    parser.add_argument("--latency-requests", type=int, default=300,
                        help="timed sequential requests per pool")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per pool")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    started = time.perf_counter()
    meta = {"torch": torch.__version__, "workerpool_commit": git_state(),
            "usable_cores": len(os.sched_getaffinity(0)), "loadavg_at_start": os.getloadavg(),
            "workers": args.workers, "model": "512-1024-1024-10 fp32 MLP, seed 0",
            "args": vars(args)}
    inputs = make_inputs()
    model = load()
    with torch.inference_mode():
        checker = Checker([model(x) for x in inputs])

    log("baseline: in-process")
    base = inprocess(model, inputs, args.warmup, args.latency_requests)
    log(f"  p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms, {base['calls_per_s']} calls/s; "
        f"batch 32: {base['batch32_rows_per_s']} rows/s")

    with contextlib.ExitStack() as stack:
        log("latency at low load (1 caller, sequential)")
        pools = open_pools(stack, ["off", "on", "on+wait2ms"], args.workers)
        lat = latency(pools, inputs, checker, args.warmup, args.latency_requests)
        for row in lat:
            log(f"  {row['batching']:>10}: p50 {row['p50_ms']} ms ({row['p50_ratio_vs_off']}x), "
                f"p99 {row['p99_ms']} ms ({row['p99_ratio_vs_off']}x)")
    with contextlib.ExitStack() as stack:
        log(f"throughput ({args.callers} callers x {args.requests} requests; map of "
            f"{args.map_requests}), {args.rounds} rounds")
        pools = open_pools(stack, ["off", "on"], args.workers)
        tput = throughput(pools, inputs, checker, args)
        tput["pool_stats"] = pool_stats(pools)

    off_lat = lat[0]
    closed = {r["batching"]: r for r in tput["rows"] if r["load_kind"] == "closed_loop"}
    overhead = [
        {"what": base["what"], "p50_ms": base["p50_ms"], "p99_ms": base["p99_ms"],
         "req_per_s": base["calls_per_s"], "p50_vs_inprocess": 1.0,
         "req_per_s_vs_inprocess": 1.0},
        {"what": "pool off, 1 caller sequential", "p50_ms": off_lat["p50_ms"],
         "pool_queue_p50_ms": off_lat["pool_queue_p50_ms"],
         "pool_compute_p50_ms": off_lat["pool_compute_p50_ms"],
         "p99_ms": off_lat["p99_ms"], "req_per_s": round(1000 / off_lat["mean_ms"], 1),
         "p50_vs_inprocess": ratio(off_lat["p50_ms"], base["p50_ms"]),
         "req_per_s_vs_inprocess": ratio(1000 / off_lat["mean_ms"], base["calls_per_s"])},
    ] + [
        {"what": f"pool {name}, {args.callers} callers", "p50_ms": row["caller_p50_ms"],
         "p99_ms": row["caller_p99_ms"], "req_per_s": row["req_per_s"],
         "p50_vs_inprocess": ratio(row["caller_p50_ms"], base["p50_ms"]),
         "req_per_s_vs_inprocess": ratio(row["req_per_s"], base["calls_per_s"])}
        for name, row in closed.items()]
    overhead_ms = round(off_lat["p50_ms"] - base["p50_ms"], 3)
    checks = {"max_abs_diff_vs_inprocess": checker.max_abs_diff,
              "bad_shapes": checker.bad_shapes}
    meta["seconds"] = round(time.perf_counter() - started, 1)
    result = {"meta": meta, "inprocess": base, "latency": lat, "throughput": tput,
              "overhead": overhead, "pool_overhead_p50_ms": overhead_ms, "checks": checks}

    markdown = "\n\n".join([
        (f"# Throughput and latency: 512-1024-1024-10 MLP, {args.workers} workers "
        f"(torch {torch.__version__}, {meta['usable_cores']} cores, workerpool "
        f"{meta['workerpool_commit']})"),
        ("Ratios are within one run; the machine is shared, absolute numbers are noisy. "
        f"Run: `.venv/bin/python bench/throughput.py --requests {args.requests} "
        f"--callers {args.callers}` ({meta['seconds']} s, load average at start "
        f"{', '.join(f'{x:.2f}' for x in meta['loadavg_at_start'])})."),
        f"## 1. Throughput, batching on vs off (median of {args.rounds} alternated trials)",
        markdown_table(tput["rows"], ["load", "batching", "req_per_s", "ratio_vs_off",
                                      "ratio_vs_off_per_round", "mean_batch_size",
                                      "caller_p50_ms", "caller_p99_ms", "parent_cpu_us_per_req",
                                      "workers_cpu_us_per_req", "req_per_s_trials"]),
        ("parent_cpu / workers_cpu: CPU time (user + system) of this process (callers, "
        "dispatcher, ZeroMQ I/O thread) and of both workers during the trial, per request."),
        ("The pools' own figures over all throughput trials (`pool.stats()`; served = "
        "requests per worker):"),
        markdown_table(tput["pool_stats"], ["batching", "mean_batch_size", "queue_p50_ms",
                                            "queue_p99_ms", "compute_p50_ms", "compute_p99_ms",
                                            "served"]),
        (f"## 2. Latency at low load (1 caller, sequential, {args.latency_requests} requests "
        "per pool after warm-up, interleaved across pools)"),
        markdown_table(lat, ["batching", "p50_ms", "p99_ms", "mean_ms", "p50_ratio_vs_off",
                             "p99_ratio_vs_off", "mean_batch_size", "pool_queue_p50_ms",
                             "pool_queue_p99_ms", "pool_compute_p50_ms"]),
        "## 3. Baseline: the same model in-process (1 thread, batch 1) vs through the pool",
        markdown_table(overhead, ["what", "p50_ms", "p99_ms", "req_per_s", "p50_vs_inprocess",
                                  "req_per_s_vs_inprocess", "pool_queue_p50_ms",
                                  "pool_compute_p50_ms"]),
        ("pool_queue / pool_compute: the pool's own split (`pool.stats()`): submit to sent, "
        "and decode + predict in the worker. Rows with callers: p50/p99 are what each caller "
        "saw per request, under load."),
        (f"Pool overhead per lone request (p50, pool off - in-process): {overhead_ms} ms. "
        f"In-process at batch 32: {base['batch32_rows_per_s']} rows/s on one thread."),
        (f"Checks: every pool output vs the in-process output: max abs diff "
        f"{checker.max_abs_diff:.3g}, wrong shapes {checker.bad_shapes}."),
    ])
    emit(result, "throughput", markdown)


if __name__ == "__main__":
    main()
