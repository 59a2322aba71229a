"""Per-request overhead of the Pool for a model that does nothing, against what a user could
use instead, all in one run (the machine is shared and noisy: only ratios mean anything).

The model: ``predict(model, x)`` returns ``x``; 2 workers, no batching. The rows, each the
median of ``--rounds`` rounds, the pool and its baseline interleaved within a round:

1. sequential round trip, p50 over ``--sequential`` calls of ``submit(1.0).result()``,
   against a raw pyzmq ROUTER -> DEALER echo process sent the same payload (the codec's
   header for ``((1.0,), {})``) over ipc:// like the pool's link, one message at a time.
   Target: <= 1.5x (the light-model issue's; 1.3x was an earlier one's).
2. ``--burst`` scalar submits, then waiting on all: requests/s against
   ``multiprocessing.Pool(2).apply_async``. Target: >= 1.0x (aim: 2x).
3. ``pool.map`` over ``--burst`` scalars: requests/s against
   ``ProcessPoolExecutor(2).map`` (target >= 1.5x) and ``multiprocessing.Pool(2).imap``
   with chunksize 1 (target: within 2x, i.e. >= 0.5x).
4. a 1 MiB float32 array round trip (p50 of ``--array-calls``) against the raw pyzmq echo
   of one 1 MiB frame, zero-copy both ways. Target: <= 1.2x.
5. ``submit_async`` from 64 coroutines, each awaiting its calls one by one (``--burst`` in
   all): requests/s against 64 threads doing ``submit(...).result()`` in a loop. Target:
   >= 1.0x.
6. parent CPU per request during row 2: ``time.process_time()`` of this process (every
   thread: callers, dispatcher, ZeroMQ's) / requests. Target: <= 60 us.

``--profile`` adds the top entries (tottime) of a cProfile of the calling thread over one
more burst of row 2. Prints JSON and writes bench/results/overhead.md.

    .venv/bin/python bench/overhead.py [--rounds 3] [--burst 10000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import cProfile
import io
import multiprocessing
import os
import pstats
import statistics
import threading
import time

import numpy as np

from common import ZmqEcho, emit, log, markdown_table, p50_us

WORKERS = 2


# -- what runs in the workers (module level: spawned processes import this file) -----------
def load():
    return {}


def echo(model, x):
    return x


def echo_one(x):
    return x


# -- the rows -------------------------------------------------------------------------------
def burst_rate(submit, n: int) -> tuple[float, float]:
    """(requests/s, parent CPU us per request) of n submits, then waiting on all."""
    cpu, start = time.process_time(), time.perf_counter()
    futures = [submit() for _ in range(n)]
    for future in futures:
        future.result()
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6


def rate(run, n: int) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def threaded_rate(pool, n: int, callers: int = 64) -> float:
    each = n // callers
    barrier = threading.Barrier(callers + 1)

    def caller():
        barrier.wait()
        for _ in range(each):
            pool.submit(1.0).result()

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return each * callers / (time.perf_counter() - start)


def async_rate(pool, n: int, callers: int = 64) -> float:
    each = n // callers

    async def caller():
        for _ in range(each):
            await pool.submit_async(1.0)

    async def run():
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return each * callers / (time.perf_counter() - start)

    return asyncio.run(run())


def one_round(pool, raw: ZmqEcho, mp_pool, executor, args) -> dict:
    header, _ = pool._codec.encode_call((1.0,), {})
    array = np.ones(256 * 1024, np.float32)  # 1 MiB
    out = {}
    out["seq_pool_us"] = p50_us(lambda: pool.submit(1.0).result(), args.sequential)
    out["seq_raw_us"] = p50_us(lambda: raw.round_trip([header]), args.sequential)
    out["burst_pool_rps"], out["parent_cpu_us"] = burst_rate(lambda: pool.submit(1.0),
                                                             args.burst)
    out["burst_mp_rps"], _ = burst_rate(lambda: _AsyncResult(mp_pool.apply_async(
        echo_one, (1.0,))), args.burst)
    xs = [1.0] * args.burst
    out["map_pool_rps"] = rate(lambda: list(pool.map(xs)), args.burst)
    out["map_executor_rps"] = rate(lambda: list(executor.map(echo_one, xs)), args.burst)
    out["map_imap_rps"] = rate(lambda: list(mp_pool.imap(echo_one, xs, chunksize=1)),
                               args.burst)
    out["array_pool_us"] = p50_us(lambda: pool.submit(array).result(), args.array_calls)
    out["array_raw_us"] = p50_us(lambda: raw.round_trip([array]), args.array_calls)
    out["async_rps"] = async_rate(pool, args.burst)
    out["threads_rps"] = threaded_rate(pool, args.burst)
    return out


class _AsyncResult:
    """multiprocessing's AsyncResult with a Future's ``result()``."""

    def __init__(self, result):
        self._result = result

    def result(self):
        return self._result.get()


def profile_burst(pool, n: int, top: int = 15) -> dict:
    """cProfiles of one more burst of row 2: the calling thread, and the pool's dispatcher
    thread (its profiler is switched on and off on that thread, through ``call``)."""
    dispatcher = pool._generation.dispatcher
    caller, worker_side = cProfile.Profile(), cProfile.Profile()
    dispatcher.call(worker_side.enable)
    caller.enable()
    burst_rate(lambda: pool.submit(1.0), n)
    caller.disable()
    dispatcher.call(worker_side.disable)
    texts = {}
    for name, profiler in (("calling thread", caller), ("dispatcher thread", worker_side)):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
        texts[name] = text.getvalue()
    return texts


ROWS = [  # (row, what, pool key, baseline key, "time" (lower is better) or "rate", target)
    ("1", "sequential round trip p50 (us)", "seq_pool_us", "seq_raw_us", "time", "<= 1.5"),
    ("2", "burst then wait (req/s) vs mp.Pool.apply_async", "burst_pool_rps",
     "burst_mp_rps", "rate", ">= 1.0 (aim 2)"),
    ("3a", "map (req/s) vs ProcessPoolExecutor.map", "map_pool_rps", "map_executor_rps",
     "rate", ">= 1.5"),
    ("3b", "map (req/s) vs mp.Pool.imap(chunksize=1)", "map_pool_rps", "map_imap_rps",
     "rate", ">= 0.5"),
    ("4", "1 MiB array round trip p50 (us)", "array_pool_us", "array_raw_us", "time",
     "<= 1.2"),
    ("5", "submit_async x64 coroutines vs 64 threads (req/s)", "async_rps", "threads_rps",
     "rate", ">= 1.0"),
]


def main() -> None:
    import workerpool as wp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=10000)
    parser.add_argument("--sequential", type=int, default=2000)
    parser.add_argument("--array-calls", type=int, default=300)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rounds = []
    context = multiprocessing.get_context("spawn")
    with wp.Pool(load, echo, workers=WORKERS) as pool, \
            context.Pool(WORKERS) as mp_pool, \
            concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context) as executor:
        raw = ZmqEcho()
        try:
            mp_pool.map(echo_one, range(100))  # spawned and warm before the first round
            list(executor.map(echo_one, range(100)))
            list(pool.map(range(100)))
            for number in range(args.rounds):
                rounds.append(one_round(pool, raw, mp_pool, executor, args))
                log(f"round {number + 1}: {rounds[-1]}")
            profile = profile_burst(pool, args.burst) if args.profile else None
        finally:
            raw.close()
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    rows = []
    for number, what, ours, theirs, kind, target in ROWS:
        ratio = medians[ours] / medians[theirs]
        rows.append({"row": number, "what": what, "workerpool": round(medians[ours], 1),
                     "baseline": round(medians[theirs], 1), "ratio": round(ratio, 2),
                     "target": target})
    rows.append({"row": "6", "what": "parent CPU per request at batch 1 (us)",
                 "workerpool": round(medians["parent_cpu_us"], 1), "baseline": "",
                 "ratio": "", "target": "<= 60"})
    markdown = "\n\n".join(filter(None, [
        f"# Per-request overhead: a no-op model, {WORKERS} workers ({os.cpu_count()} CPUs), "
        f"medians of {args.rounds} rounds",
        "ratio = workerpool / baseline (for times lower is better, for rates higher).",
        markdown_table(rows, ["row", "what", "workerpool", "baseline", "ratio", "target"]),
        *(f"Top of a cProfile of the {name} over one burst (row 2):\n\n```\n"
          f"{text.strip()}\n```" for name, text in (profile or {}).items())]))
    emit({"rows": rows, "rounds": rounds, "profile": profile}, "overhead", markdown)


if __name__ == "__main__":
    main()
