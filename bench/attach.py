"""Start and replacement times of workerpool workers vs model size, for both start methods.

For each model size (fp32 MLP) and start method, with a Pool of 2 workers:
- start: ``Pool(...)`` construction (returns once every worker is READY), split into
  ``load()`` (building the model, in this process) and the rest (publish into the memfd,
  zygote, workers); then the first request and a warm request (median of 5);
- replacement, repeated: SIGKILL one worker (``pool.pids``), then poll every 1 ms
  (``pool.stats(memory_usage=False)``, well under a millisecond) until a new pid shows, until
  it is "ready", and until a request served by that new pid returns (two requests are
  submitted at once so one lands on it). Times are from the kill; ``start_to_ready_ms`` is
  the pool's own figure (the zygote was asked for a worker -> READY received), and
  ``initial_start_to_ready_ms`` the same for the first workers (the slowest one).

Prints JSON and writes bench/results/attach.md; the ratios compare the replacement's READY
time at the largest model against the smallest (target for zygote: flat, <= 100 ms).

    .venv/bin/python bench/attach.py [--sizes 16,256,1024] [--methods zygote,spawn] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import statistics
import time

import torch

import workerpool
from common import build_mlp, emit, log, make_input, markdown_table, predict

POLL_S = 0.001
_load_s = 0.0


def timed_load(size: int):
    """``load`` of the pools: builds the model here, remembering how long that took."""
    global _load_s
    start = time.monotonic()
    model = build_mlp(size)
    _load_s = time.monotonic() - start
    return model


def wait_for(condition, timeout: float = 120.0) -> float:
    """Poll ``condition()`` every POLL_S; the time.monotonic() at which it first held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{condition} did not hold within {timeout} s")
        time.sleep(POLL_S)
    return time.monotonic()


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def workers(pool) -> list[dict]:
    return pool.stats(memory_usage=False)["workers"]


def result_from(pool, x, pid: int) -> None:
    """Submit pairs of requests until one is answered by ``pid``."""
    for _ in range(100):
        futures = [pool.submit(x), pool.submit(x)]
        if pid in [f.result()[0] for f in futures]:
            return
    raise RuntimeError(f"worker {pid} never answered")


def replace_one(pool, x) -> dict:
    old = set(pool.pids)
    killed_at = time.monotonic()  # the dispatcher's clock too
    os.kill(min(old), signal.SIGKILL)

    def fresh() -> list[int]:
        return [p for p in pool.pids if p not in old]

    seen = wait_for(fresh)
    new = fresh()[0]
    ready = wait_for(lambda: any(w["pid"] == new and w["state"] == "ready"
                                 for w in workers(pool)))
    result_from(pool, x, new)
    answered = time.monotonic()
    start_to_ready = next(w["start_to_ready_ms"] for w in workers(pool) if w["pid"] == new)

    def ms(t: float) -> float:
        return (t - killed_at) * 1000

    return {"new_pid_ms": ms(seen), "ready_ms": ms(ready), "start_to_ready_ms": start_to_ready,
            "first_result_ms": ms(answered)}


def measure(size: int, method: str, repeats: int) -> dict:
    x = make_input(size)
    start = time.monotonic()
    pool = workerpool.Pool(functools.partial(timed_load, size), predict, workers=2,
                           start_method=method)
    with pool:
        construct_s = time.monotonic() - start
        initial_ready_ms = max(w["start_to_ready_ms"] for w in workers(pool))
        first_ms = timed(lambda: pool.submit(x).result()) * 1000
        warm_ms = statistics.median(timed(lambda: pool.submit(x).result()) for _ in range(5)) * 1000
        stats_ms = statistics.median(timed(pool.stats) for _ in range(5)) * 1000
        replacements = [replace_one(pool, x) for _ in range(repeats)]
        restarts = pool.stats()["restarts"]
    assert restarts == repeats, (restarts, repeats)
    median = {k: round(statistics.median(r[k] for r in replacements), 1) for k in replacements[0]}
    return {"model_mib": size, "start_method": method, "load_s": round(_load_s, 3),
            "pool_start_s": round(construct_s, 3),
            "pool_start_excl_load_s": round(construct_s - _load_s, 3),
            "initial_start_to_ready_ms": round(initial_ready_ms, 1),
            "first_request_ms": round(first_ms, 1), "warm_request_ms": round(warm_ms, 1),
            "stats_call_ms": round(stats_ms, 1),
            **{f"replace_{k}": v for k, v in median.items()},
            "replace_ready_ms_all": [round(r["ready_ms"], 1) for r in replacements]}


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["start_method"] for r in rows):
        series = sorted((r for r in rows if r["start_method"] == method),
                        key=lambda r: r["model_mib"])
        small, large = series[0], series[-1]
        out.append({"start_method": method,
                    "sizes": f"{large['model_mib']} / {small['model_mib']} MiB",
                    **{k: round(large[k] / small[k], 2) for k in
                       ("replace_ready_ms", "replace_start_to_ready_ms",
                        "replace_first_result_ms", "pool_start_excl_load_s")}})
    return out


COLUMNS = ["model_mib", "start_method", "load_s", "pool_start_s", "pool_start_excl_load_s",
           "initial_start_to_ready_ms", "first_request_ms", "warm_request_ms",
           "replace_new_pid_ms", "replace_ready_ms",
           "replace_start_to_ready_ms", "replace_first_result_ms", "stats_call_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,256,1024", help="model sizes in MiB")
    parser.add_argument("--methods", default="zygote,spawn", help="start methods")
    parser.add_argument("--repeats", type=int, default=5, help="replacements per pool")
    args = parser.parse_args()
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for method in args.methods.split(","):
            rows.append(measure(size, method, args.repeats))
            log(f"{size} MiB {method}: start {rows[-1]['pool_start_excl_load_s']} s (excl. load), "
                f"replacement ready {rows[-1]['replace_ready_ms']} ms")
    summary = ratios(rows)
    markdown = "\n\n".join([
        f"# Worker start and replacement (2 workers, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs; replace_* are medians, ms from the SIGKILL)",
        markdown_table(rows, COLUMNS),
        "Largest / smallest model (target: replacement READY flat, <= 100 ms):",
        markdown_table(summary, list(summary[0]))])
    emit({"rows": rows, "ratios": summary}, "attach", markdown)


if __name__ == "__main__":
    main()
