"""Memory of N workers serving one fp32 MLP: workerpool vs each worker loading its own copy.

For each model size and worker count N, after every worker has run at least one forward pass
(workerpool's measured once its workers are idle, 0.5 s later):
- workerpool: ``Pool(load, predict, workers=N)`` (zygote start method), created in a fresh
  interpreter that imported only numpy and workerpool (the input is a numpy array), once
  with ``load_in="parent"`` (load() runs there: it imports torch) and once with
  ``load_in="loader"`` (it never does); total PSS is ``pool.stats()["total_pss"]`` (parent +
  zygote + workers), USS per worker from stats();
- baseline: ``multiprocessing.get_context("spawn").Pool(N, initializer=...)`` whose initializer
  ``torch.load``s a state_dict saved once to a temp file (no mmap); total PSS is this process
  plus all its descendants (psutil ``memory_full_info``), taken while the workers are alive.
  Each of N tasks runs a forward pass and then waits on a Barrier(N), so every worker runs one.
- at N = 1, one plain process: a spawned process that loads the same state_dict and runs a
  forward pass; its RSS (what it costs when no other process shares its pages) is the
  figure a one-worker pool is compared with (``ratio_vs_plain``).

Prints JSON (rows + the PSS each extra workerpool worker adds) and writes
bench/results/memory.md. Memory is PSS/USS in MiB; ratio is total PSS / the baseline's.
ready_s runs from creating the pool to the end of the warm-up: workerpool's includes load()
(building the model), the baseline's does not (its state_dict file is saved beforehand).

    .venv/bin/python bench/memory.py [--sizes 256,1024] [--workers 1,2,4]
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import pathlib
import tempfile
import time

import json
import subprocess
import sys

import numpy as np
import psutil

from common import (build_mlp, emit, log, make_input, markdown_table, memory_of,
                    mib, mlp_shape, mlp_skeleton, model_bytes, predict,
                    sizes_and_workers, tree_pids)

# torch is imported inside functions: the pool's process (--pool-child) must not import it.

# -- baseline workers (module level: spawn passes them by reference) -----------------------
_model = _input = _barrier = None


def _init_baseline(path: str, size: int, barrier) -> None:
    import torch

    global _model, _input, _barrier
    torch.set_num_threads(1)
    with torch.device("meta"):
        _model = mlp_skeleton(*mlp_shape(size))
    _model.load_state_dict(torch.load(path, weights_only=True), assign=True)
    _input, _barrier = make_input(size), barrier


def _warm(_) -> int:
    import torch

    with torch.inference_mode():
        predict(_model, _input)
    _barrier.wait(timeout=300)  # holds this worker until all N ran one: one task per worker
    return os.getpid()


def run_baseline(size: int, n: int, path: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with ctx.Pool(n, initializer=_init_baseline, initargs=(path, size, ctx.Barrier(n))) as pool:
        worker_pids = set(pool.map(_warm, range(n), chunksize=1))
        ready_s = time.perf_counter() - start
        assert len(worker_pids) == n, worker_pids
        memory = memory_of(tree_pids())
    workers = [memory[pid] for pid in sorted(worker_pids)]
    return row(size, n, "baseline (own copy each)", ready_s,
               total=sum(m["pss"] for m in memory.values()),
               parent=memory[os.getpid()]["pss"], workers=workers)


def _plain(path: str, size: int, conn) -> None:
    import torch

    _init_baseline(path, size, None)
    with torch.inference_mode():
        predict(_model, _input)
    info = psutil.Process().memory_full_info()
    conn.send({"rss": info.rss, "pss": info.pss, "uss": info.uss})
    conn.recv()  # measured; now it may go


def run_plain(size: int, path: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    start = time.perf_counter()
    process = ctx.Process(target=_plain, args=(path, size, theirs))
    process.start()
    usage = ours.recv()
    ready_s = time.perf_counter() - start
    ours.send(None)
    process.join()
    return row(size, 1, "one plain process (its RSS)", ready_s, total=usage["rss"],
               parent=usage["rss"], workers=[])


# -- workerpool ----------------------------------------------------------------------------
def predict_array(model, x):
    """``predict`` for a numpy input, from a caller that never imports torch."""
    import torch

    return predict(model, torch.from_numpy(x))


def run_workerpool(size: int, n: int, load_in: str) -> dict:
    """``pool_child`` in a fresh interpreter; its row."""
    done = subprocess.run([sys.executable, __file__, "--pool-child", str(size), str(n),
                           load_in], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the workerpool run failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def pool_child(size: int, n: int, load_in: str) -> None:
    import workerpool

    x = np.ones((8, mlp_shape(size)[0]), np.float32)
    start = time.perf_counter()
    with workerpool.Pool(functools.partial(build_mlp, size), predict_array, workers=n,
                         load_in=load_in) as pool:
        for _ in range(5):  # every worker serves at least one request
            for future in [pool.submit(x) for _ in range(4 * n)]:
                future.result()
            stats = pool.stats()
            if all(w["requests_served"] for w in stats["workers"]):
                break
        else:
            raise RuntimeError(f"some worker never served a request: {stats['workers']}")
        ready_s = time.perf_counter() - start
        # Measured idle, as a server between bursts is: a worker idle for 0.2 s has handed
        # back the heap its requests freed (workers/main.py); busy, it holds its activations.
        time.sleep(0.5)
        stats = pool.stats()
        imported_torch = "torch" in sys.modules
    method = "workerpool" if load_in == "parent" else f"workerpool, load_in={load_in}"
    print(json.dumps(row(size, n, method, ready_s, total=stats["total_pss"],
                         parent=stats["parent"]["pss"], workers=stats["workers"],
                         zygote=stats["zygote"]["pss"], model=stats["model_bytes"],
                         parent_imported_torch=imported_torch)))


def row(size, n, method, ready_s, *, total, parent, workers, zygote=None, model=None,
        **extra) -> dict:
    out = {"model_mib": size, "workers": n, "method": method,
           "total_pss_mib": mib(total), "parent_pss_mib": mib(parent),
           "zygote_pss_mib": mib(zygote) if zygote is not None else None,
           "workers_pss_mib": mib(sum(w["pss"] for w in workers)),
           "per_worker_uss_mib": [mib(w["uss"]) for w in workers],
           "ready_s": round(ready_s, 2)}
    if model is not None:
        out["model_bytes_mib"] = mib(model)
    return {**out, **extra}


# -- the run -------------------------------------------------------------------------------
def measure(sizes: list[int], counts: list[int]) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="wp-bench-") as tmp:
        for size in sizes:
            path = str(pathlib.Path(tmp) / f"mlp{size}.pt")
            model = build_mlp(size)
            log(f"model {size} MiB: {mlp_shape(size)} (width, layers), "
                f"{mib(model_bytes(model))} MiB of weights")
            torch.save(model.state_dict(), path)
            del model
            gc.collect()
            plain = run_plain(size, path) if 1 in counts else None
            if plain is not None:
                log(f"  one plain process: RSS {plain['total_pss_mib']} MiB")
                rows.append(plain)
            for n in counts:
                base = run_baseline(size, n, path)
                log(f"  N={n} baseline   total PSS {base['total_pss_mib']} MiB")
                base["ratio_vs_baseline"] = 1.0
                rows.append(base)
                for load_in in ("parent", "loader"):
                    ours = run_workerpool(size, n, load_in)
                    ours["ratio_vs_baseline"] = round(
                        ours["total_pss_mib"] / base["total_pss_mib"], 3)
                    log(f"  N={n} {ours['method']} total PSS {ours['total_pss_mib']} MiB "
                        f"({ours['ratio_vs_baseline']}x)")
                    rows.append(ours)
                if n == 1 and plain is not None:
                    for r in rows[-3:]:
                        r["ratio_vs_plain"] = round(r["total_pss_mib"] / plain["total_pss_mib"],
                                                    3)
            os.unlink(path)
    return rows


def added_per_worker(rows: list[dict]) -> list[dict]:
    """(PSS at the largest N - PSS at the smallest N) / (difference in N), per size/method."""
    out = []
    for key in sorted({(r["model_mib"], r["method"]) for r in rows}):
        series = sorted((r["workers"], r["total_pss_mib"]) for r in rows
                        if (r["model_mib"], r["method"]) == key)
        if len(series) > 1:
            (n0, p0), (n1, p1) = series[0], series[-1]
            out.append({"model_mib": key[0], "method": key[1], "from_workers": n0, "to_workers": n1,
                        "added_pss_per_worker_mib": round((p1 - p0) / (n1 - n0), 1)})
    return out


COLUMNS = ["model_mib", "workers", "method", "total_pss_mib", "ratio_vs_baseline",
           "ratio_vs_plain",
           "parent_pss_mib", "parent_imported_torch", "zygote_pss_mib", "workers_pss_mib",
           "per_worker_uss_mib", "ready_s"]


def main() -> None:
    import torch

    sizes, counts = sizes_and_workers(__doc__.splitlines()[0])
    rows = measure(sizes, counts)
    extra = added_per_worker(rows)
    markdown = "\n\n".join([
        f"# Memory: workerpool vs a copy per worker (torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs)",
        markdown_table(rows, COLUMNS),
        "PSS added per extra worker (target for workerpool: <= 20 MiB):",
        markdown_table(extra, list(extra[0]) if extra else [])])
    emit({"rows": rows, "added_pss_per_extra_worker": extra}, "memory", markdown)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pool-child"]:
        pool_child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
