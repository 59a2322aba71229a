"""Memory of N workers serving one fp32 Keras MLP: workerpool's TensorFlow engines vs each
worker loading its own copy.

Every measurement runs in a fresh spawned process (the "parent" below), so one pool's heap
never counts in the next; the model is built and saved once per size in another one.

The model: a functional Keras MLP (``keras.Input((width,))`` then ``layers`` Dense(width,
relu) layers, ``keras.utils.set_random_seed(0)``) of about ``--sizes`` MiB of fp32 weights
(the torch benchmark's shapes, bench/common.mlp_shape). For each size and worker count N,
measured after every worker has run at least one prediction on a (8, width) batch of ones:

- ``workerpool``: ``Pool(load, predict, workers=N, threads_per_worker=1)`` with the default
  ``tf_engine``: the parent freezes the serving graph and maps each big constant from a
  sealed memfd (ImmutableConst); workers fork from a zygote. ~4*N requests go through
  ``pool.map`` until ``stats()["workers"][i]["requests_served"] > 0`` for every worker.
  total PSS = ``stats()["total_pss"]`` (parent + zygote + workers); "pool PSS" = zygote +
  workers only (without the parent, which holds TensorFlow and what load() left behind);
- ``workerpool copy``: the same with ``tf_engine="copy"`` (each worker loads its own copy);
- ``baseline``: ``multiprocessing.get_context("spawn").Pool(N, initializer=...)`` whose
  initializer sets TF to 1 intra/1 inter-op thread and ``keras.saving.load_model``s a
  ``.keras`` file saved once; each of N tasks runs one prediction and then waits on a
  Barrier(N), so every worker has loaded and run. total PSS = this process plus all its
  descendants (psutil ``memory_full_info``), taken while the workers are alive; "pool PSS"
  = the N workers only.

TensorFlow maps an ImmutableConst's file only while a run uses it, so between requests the
weight memfds may be resident (shmem) yet mapped by no process: then they are in no one's
PSS. ``memfd_mib`` is the size of the workerpool memfds this process holds open during the
measurement, ``weights_pss_mib`` the PSS of their mappings summed over the pool's processes;
``unmapped_memfd_mib`` (the difference) is memory the PSS totals leave out, and
``total_with_memfd_mib`` / ``ratio_with_memfd`` add it back. ``checksum_ok``: every reply's
output sum equals the Keras call's where the model was saved (also 1 thread).

Also per row: ``parent_peak_rss_mib`` (the measuring process's peak RSS: for workerpool it
includes load() and freezing), ``worker_peak_rss_mib`` (the baseline's largest worker peak),
``load_s`` (load(): building the model), ``start_s`` (creating the Pool: load + freeze +
zygote + workers; the baseline: -), ``ready_s`` (creation to the end of the warm-up, whose
first requests include the copy engine's per-worker load) and ``request_ms`` (median of 2*N
sequential requests after the warm-up, as the caller sees them; the baseline's are timed
in the worker).

Prints JSON (rows + the PSS each extra worker adds, (N=max - N=min)/(difference in N), per
size and method) and writes bench/results/tf_memory.md. Memory is PSS/USS in MiB; ratio is
total PSS / the baseline's at the same size and N. The baseline's ready_s does not include
building the model (its .keras file is saved beforehand).

    .venv/bin/python bench/tf_memory.py [--sizes 256,1024] [--workers 1,2,4]

Peak memory: the frozen-graph parent peaks near 10x the model size while freezing (measured:
~11 GiB for 1 GiB), each baseline worker near 3.7x while loading; run one at a time.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import gc
import multiprocessing
import os
import pathlib
import resource
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # inherited by the spawned workers
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's INFO lines; warnings stay

import numpy as np

from common import (BATCH, emit, log, markdown_table, memfd_mappings, memory_of, mib,
                    mlp_shape, predict, sizes_and_workers, tree_pids)

MEMFD_NAME = "memfd:workerpool-weights"


# -- the model (module level: the baseline's spawned workers import this file) ---------------
def build_keras_mlp(size: int):
    """About ``size`` MiB of fp32 Dense weights (+ biases), seeded."""
    import keras

    width, layers = mlp_shape(size)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((width,), name="x")
    x = inputs
    for _ in range(layers):
        x = keras.layers.Dense(width, activation="relu")(x)
    return keras.Model(inputs, x, name=f"mlp{size}")


_load_s = None  # how long the last timed_build took, in this process


def timed_build(size: int):
    """load() of the pools: build_keras_mlp, timed."""
    global _load_s
    start = time.perf_counter()
    model = build_keras_mlp(size)
    _load_s = time.perf_counter() - start
    return model


def peak_rss(who=resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024


def make_input(size: int) -> np.ndarray:
    return np.ones((BATCH, mlp_shape(size)[0]), np.float32)


def keras_bytes(model) -> int:
    return sum(int(np.prod(w.shape)) * 4 for w in model.weights)


def set_tf_threads(threads: int) -> None:
    """Before this process's first TF op."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def keras_checksum(model, x: np.ndarray) -> float:
    return float(np.asarray(model(x, training=False)).sum())


def trim_heap() -> None:
    """Return freed heap to the OS, so one run's garbage does not count in the next."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# -- baseline workers -------------------------------------------------------------------------
_model = _input = _barrier = None


def _init_baseline(path: str, size: int, barrier) -> None:
    global _model, _input, _barrier
    set_tf_threads(1)
    import keras

    _model = keras.saving.load_model(path)
    _input, _barrier = make_input(size), barrier


def _warm(_) -> tuple[int, float]:
    checksum = keras_checksum(_model, _input)
    _barrier.wait(timeout=600)  # holds this worker until all N ran one: one task per worker
    return os.getpid(), checksum


def _timed_request() -> tuple[float, float]:
    start = time.perf_counter()
    checksum = keras_checksum(_model, _input)
    return time.perf_counter() - start, checksum


def run_baseline(size: int, n: int, path: str, reference: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with ctx.Pool(n, initializer=_init_baseline,
                  initargs=(path, size, ctx.Barrier(n))) as pool:
        replies = pool.map(_warm, range(n), chunksize=1)
        ready_s = time.perf_counter() - start
        worker_pids = {pid for pid, _ in replies}
        assert len(worker_pids) == n, worker_pids
        memory = memory_of(tree_pids())
        timed = [pool.apply(_timed_request) for _ in range(2 * n)]  # one at a time
    workers = [memory[pid] for pid in sorted(worker_pids)]
    return row(size, n, "baseline (own copy each)", ready_s,
               total=sum(m["pss"] for m in memory.values()),
               parent=memory[os.getpid()]["pss"], zygote=None, workers=workers,
               checksum_ok=all(c == reference for _, c in replies + timed),
               request_ms=round(statistics.median(t for t, _ in timed) * 1000, 1),
               parent_peak_rss_mib=mib(peak_rss()), load_s=None, start_s=None,
               worker_peak_rss_mib=mib(peak_rss(resource.RUSAGE_CHILDREN)))


# -- workerpool ---------------------------------------------------------------------------------
def run_workerpool(size: int, n: int, engine: str, reference: float) -> dict:
    import workerpool

    x = make_input(size)
    start = time.perf_counter()
    with workerpool.Pool(functools.partial(timed_build, size), predict, workers=n,
                         threads_per_worker=1, tf_engine=engine) as pool:
        started_s = time.perf_counter() - start
        start_peak = peak_rss()
        checksums = []
        for attempt in range(1, 21):  # every worker serves at least one request
            checksums += [c for _, c in pool.map([x] * (4 * n))]
            stats = pool.stats()
            if all(w["requests_served"] > 0 for w in stats["workers"]):
                break
        else:
            raise RuntimeError(f"some worker never served a request: {stats['workers']}")
        ready_s = time.perf_counter() - start
        latencies = []
        for _ in range(2 * n):
            begin = time.perf_counter()
            checksums.append(pool.submit(x).result()[1])
            latencies.append(time.perf_counter() - begin)
        stats = pool.stats()
        memfd_bytes = open_memfd_bytes()
        weights_pss = sum(p["weights_pss"] for p in (stats["parent"], stats["zygote"],
                                                     *stats["workers"]))
        method = "workerpool" if engine == "tensorflow" else f"workerpool {engine}"
        out = row(size, n, method, ready_s, total=stats["total_pss"],
                  parent=stats["parent"]["pss"], zygote=stats["zygote"]["pss"],
                  workers=stats["workers"], memfd=memfd_bytes, weights_pss=weights_pss,
                  checksum_ok=all(c == checksums[0] == reference for c in checksums),
                  request_ms=round(statistics.median(latencies) * 1000, 1),
                  parent_peak_rss_mib=mib(start_peak), load_s=round(_load_s, 2),
                  start_s=round(started_s, 2), warmup_rounds=attempt,
                  zygote_uss_mib=mib(stats["zygote"]["uss"]),
                  start_to_ready_ms=[w["start_to_ready_ms"] for w in stats["workers"]],
                  compute_ms=stats["compute_ms"],
                  model_bytes_mib=mib(stats["model_bytes"]),
                  skeleton_mib=mib(stats["skeleton_bytes"]),
                  weights_source=stats["weights_source"],
                  worker_weights_rss_mib=[mib(w["weights_rss"]) for w in stats["workers"]],
                  weights_copied_mib=mib(sum(w["weights_copied"] for w in stats["workers"])),
                  counters={k: stats[k] for k in ("restarts", "crashes", "hung", "aborted")
                            if stats.get(k)})
    trim_heap()  # the Pool is gone: nothing of its weights may stay open or mapped here
    out["parent_memfd_maps_after"] = memfd_mappings()
    out["parent_memfd_mib_after"] = mib(open_memfd_bytes())
    return out


def open_memfd_bytes(pid: int | None = None) -> int:
    """Total size of the workerpool memfds ``pid`` (default: this process) has open: all
    written and sealed, so resident whether or not anything maps them."""
    fd_dir = f"/proc/{pid or os.getpid()}/fd"
    total = 0
    for name in os.listdir(fd_dir):
        try:
            if MEMFD_NAME in os.readlink(f"{fd_dir}/{name}"):
                total += os.stat(f"{fd_dir}/{name}").st_size
        except OSError:
            continue
    return total


def row(size, n, method, ready_s, *, total, parent, zygote, workers, memfd=0, weights_pss=0,
        **extra) -> dict:
    pool = (zygote or 0) + sum(w["pss"] for w in workers)
    unmapped = max(0, memfd - weights_pss)
    return {"model_mib": size, "workers": n, "method": method,
            "total_pss_mib": mib(total), "pool_pss_mib": mib(pool),
            "parent_pss_mib": mib(parent),
            "zygote_pss_mib": mib(zygote) if zygote is not None else None,
            "workers_pss_mib": mib(sum(w["pss"] for w in workers)),
            "per_worker_uss_mib": [mib(w["uss"]) for w in workers],
            "memfd_mib": mib(memfd), "weights_pss_mib": mib(weights_pss),
            "unmapped_memfd_mib": mib(unmapped), "total_with_memfd_mib": mib(total + unmapped),
            "ready_s": round(ready_s, 2), **extra}


# -- the run ------------------------------------------------------------------------------------
def save_model(size: int, path: str) -> float:
    """Build the model, save it as ``path``; returns its output sum (1 TF thread)."""
    set_tf_threads(1)
    model = build_keras_mlp(size)
    reference = keras_checksum(model, make_input(size))
    log(f"model {size} MiB: {mlp_shape(size)} (width, layers), "
        f"{mib(keras_bytes(model))} MiB of weights; output sum {reference}")
    model.save(path)
    return reference


def measure_one(size: int, n: int, method: str, path: str, reference: float) -> dict:
    """One row, in a fresh process."""
    if method == "baseline":
        return run_baseline(size, n, path, reference)
    return run_workerpool(size, n, method, reference)


def in_fresh_process(function, *args):
    """``function(*args)`` in a new spawned process (not daemonic: it may start its own)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx,
                                                max_tasks_per_child=1) as executor:
        return executor.submit(function, *args).result()


METHODS = ("baseline", "tensorflow", "copy")


def measure(sizes: list[int], counts: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="wp-tf-bench-") as tmp:
        for size in sizes:
            path = str(pathlib.Path(tmp) / f"mlp{size}.keras")
            reference = in_fresh_process(save_model, size, path)
            for n in counts:
                base = None
                for method in METHODS:
                    out = in_fresh_process(measure_one, size, n, method, path, reference)
                    base = base or out
                    out["ratio_vs_baseline"] = round(
                        out["total_pss_mib"] / base["total_pss_mib"], 3)
                    out["ratio_with_memfd"] = round(
                        out["total_with_memfd_mib"] / base["total_pss_mib"], 3)
                    log(f"  N={n} {out['method']:<24} total PSS {out['total_pss_mib']} MiB "
                        f"({out['ratio_vs_baseline']}x), pool {out['pool_pss_mib']} MiB, "
                        f"+{out['unmapped_memfd_mib']} MiB memfd mapped by no process, "
                        f"parent peak RSS {out['parent_peak_rss_mib']} MiB, "
                        f"ready {out['ready_s']} s, request {out['request_ms']} ms")
                    rows.append(out)
            os.unlink(path)
    return rows


def added_per_worker(rows: list[dict]) -> list[dict]:
    """(PSS at the largest N - PSS at the smallest N) / (difference in N), per size/method."""
    out = []
    for key in sorted({(r["model_mib"], r["method"]) for r in rows}):
        series = sorted((r["workers"], r["total_pss_mib"], r["pool_pss_mib"]) for r in rows
                        if (r["model_mib"], r["method"]) == key)
        if len(series) > 1:
            (n0, t0, p0), (n1, t1, p1) = series[0], series[-1]
            out.append({"model_mib": key[0], "method": key[1], "from_workers": n0,
                        "to_workers": n1,
                        "added_total_pss_per_worker_mib": round((t1 - t0) / (n1 - n0), 1),
                        "added_pool_pss_per_worker_mib": round((p1 - p0) / (n1 - n0), 1)})
    return out


COLUMNS = ["model_mib", "workers", "method", "total_pss_mib", "pool_pss_mib",
           "per_worker_uss_mib", "ratio_vs_baseline", "parent_pss_mib", "zygote_pss_mib",
           "unmapped_memfd_mib", "total_with_memfd_mib", "ratio_with_memfd",
           "parent_peak_rss_mib", "load_s", "start_s", "ready_s", "request_ms", "checksum_ok"]


def main() -> None:
    sizes, counts = sizes_and_workers(__doc__.splitlines()[0])
    rows = measure(sizes, counts)
    import keras  # for the versions only: no op runs here
    import tensorflow as tf

    extra = added_per_worker(rows)
    markdown = "\n\n".join([
        (f"# Memory: workerpool's TensorFlow engines vs a copy per worker (TensorFlow "
         f"{tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs)"),
        ("Each row measured in a fresh process. pool = zygote + workers (baseline: workers). "
         "ratio = total PSS / the baseline's at the same size and N. unmapped_memfd: weight "
         "memfds resident but mapped by no process at the measurement, so in no PSS; "
         "total_with_memfd adds them back (ratio_with_memfd)."),
        markdown_table(rows, COLUMNS),
        "PSS added per extra worker:",
        markdown_table(extra, list(extra[0]) if extra else [])])
    emit({"rows": rows, "added_pss_per_extra_worker": extra}, "tf_memory", markdown)


if __name__ == "__main__":
    main()
