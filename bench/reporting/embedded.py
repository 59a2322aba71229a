"""The embedded contenders of the report, driven in this process: workerpool's ``Pool`` and
``multiprocessing.Pool(initializer=load)`` (each worker loads its own copy), on the report's
model, with ``--clients`` threads calling it.

Prints one JSON line after start and warm-up (start seconds, requests per worker), waits
for a line on stdin (the harness measures the tree's PSS meanwhile), then SIGKILLs the
worker that answered last under load and prints a second line: seconds until a new worker
answers, and the calls that failed or never came back within ``--recover-timeout``.

    python -m reporting.embedded --kind multiprocessing --model-dir DIR --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import peer_model

_model = None


def _load_here() -> None:
    global _model
    _model = peer_model.load()


def _predict_here(inputs):
    return peer_model.predict(_model, inputs)


def open_pool(kind: str, workers: int):
    """(call(inputs, timeout) -> answer, close) for ``kind``."""
    if kind == "multiprocessing":
        pool = multiprocessing.Pool(workers, initializer=_load_here)

        def call(inputs, timeout):
            return pool.apply_async(_predict_here, (inputs,)).get(timeout)
        return call, pool.terminate
    import workerpool

    # One intra-op thread per worker, as multiprocessing's workers get from load(); the
    # Pool's default would give a single worker every core.
    pool = workerpool.Pool(peer_model.load, peer_model.predict, workers=workers,
                           threads_per_worker=1)

    def call(inputs, timeout):
        return pool.submit(inputs).result(timeout)
    return call, pool.close


def hammer(call, inputs, clients: int, keep_going, outcomes: list, timeout: float) -> None:
    """``clients`` threads calling while ``keep_going()``; outcomes (end, ok, pid)."""
    def loop():
        while keep_going():
            try:
                pid = call(inputs, timeout)["pid"]
                outcomes.append((time.perf_counter(), True, pid))
            except Exception:  # a lost call (timeout) or a crashed worker's error
                outcomes.append((time.perf_counter(), False, None))
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["workerpool", "multiprocessing"], required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-worker", type=int, default=100)
    parser.add_argument("--recover-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    os.environ["PEER_MODEL_DIR"] = args.model_dir
    with open(os.path.join(args.model_dir, "input.json")) as file:
        inputs = json.load(file)

    launched = time.perf_counter()
    call, close = open_pool(args.kind, args.workers)
    first = call(inputs, args.recover_timeout)
    start_s = time.perf_counter() - launched
    outcomes: list = []
    counts: dict[int, int] = {}

    read = [0]

    def not_spread():
        for _, ok, pid in outcomes[read[0]:]:
            if ok:
                counts[pid] = counts.get(pid, 0) + 1
        read[0] = len(outcomes)
        busiest = sorted(counts.values(), reverse=True)[:args.workers]
        spread = len(busiest) >= args.workers and min(busiest) >= args.per_worker
        return not spread and len(outcomes) < args.per_worker * args.workers * 4
    hammer(call, inputs, args.clients, not_spread, outcomes, args.recover_timeout)
    print(json.dumps({"start_s": start_s, "y": first["y"],
                      "served": {str(k): v for k, v in counts.items()}}), flush=True)
    sys.stdin.readline()

    outcomes.clear()
    state: dict = {"killed_at": None, "recovered_at": None}
    seen = set(counts)
    started = time.perf_counter()

    def keep_going():
        now = time.perf_counter()
        if state["killed_at"] is None and now - started > 2.0:
            pid = next(o[2] for o in reversed(outcomes) if o[1])
            seen.update(o[2] for o in outcomes if o[1])
            os.kill(pid, signal.SIGKILL)
            state["killed_at"] = now
        if state["killed_at"] is not None and state["recovered_at"] is None:
            for ended, ok, pid in reversed(outcomes):
                if ended < state["killed_at"]:
                    break
                if ok and pid not in seen:
                    state["recovered_at"] = ended
        if state["recovered_at"] is not None:
            return now < state["recovered_at"] + 1.0
        return state["killed_at"] is None or now < state["killed_at"] + args.recover_timeout
    hammer(call, inputs, args.clients, keep_going, outcomes, args.recover_timeout)
    after = [o for o in outcomes if o[0] >= state["killed_at"]]
    recovered = state["recovered_at"]
    print(json.dumps({"recover_s": None if recovered is None else recovered - state["killed_at"],
                      "failed": sum(1 for o in after if not o[1]), "after_kill": len(after),
                      "recover_timeout": args.recover_timeout, "clients": args.clients}),
          flush=True)
    close()


if __name__ == "__main__":
    main()
