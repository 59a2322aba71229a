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
- ``workerpool, load_in=loader``: the same with ``load_in="loader"``: load() and the
  freezing run in a loader process; the measuring process never imports TensorFlow;
- ``one plain process``: at N = 1 only, a process that loads the ``.keras`` file and runs
  one prediction (1 thread); its RSS (nothing shares its pages) is what the N = 1 rows
  are compared with (``ratio_vs_plain``);
- ``workerpool copy``: the same with ``tf_engine="copy"`` (each worker loads its own copy);
- ``savedmodel export``: ``Pool(<dir>, ...)`` on the SavedModel that ``model.export(dir)``
  wrote for the same Keras model (served by path, TF Serving's format);
- ``savedmodel module``: ``Pool(<dir>, ...)`` on a SavedModel written by
  ``tf.saved_model.save`` of a ``tf.Module`` MLP of the same shapes (its own seeded weights)
  whose signature calls one nested ``tf.function`` per layer;
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

The SavedModel rows' references are the SavedModel loaded in the measuring process with
``tf.saved_model.load`` (1 thread). ``publish_peak_x_model``: (the parent's peak RSS while
starting the pool - its RSS just before, TensorFlow already imported - + the memfds it
published) / the model's bytes: the most memory publishing held at once, as a multiple of
the model (an upper bound: the two peaks may not coincide).

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
        [--methods baseline,tensorflow,copy,savedmodel_export,savedmodel_module]

Peak memory: building and saving the models holds a few copies at once; each baseline worker
peaks near 3.7x the model while loading; run one at a time.
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
import shutil
import statistics
import tempfile
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # inherited by the spawned workers
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's INFO lines; warnings stay

import numpy as np
import psutil

from common import (BATCH, emit, log, markdown_table, memfd_mappings, memory_of, mib,
                    mlp_shape, predict, predict_named, sizes_and_workers, tree_pids)

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


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
def run_plain(size: int, path: str, reference: float) -> dict:
    set_tf_threads(1)
    import keras

    start = time.perf_counter()
    model = keras.saving.load_model(path)
    x = make_input(size)
    checksum = keras_checksum(model, x)
    ready_s = time.perf_counter() - start
    begin = time.perf_counter()
    keras_checksum(model, x)
    request_s = time.perf_counter() - begin
    rss = psutil.Process().memory_full_info().rss
    return row(size, 1, "one plain process (its RSS)", ready_s, total=rss, parent=rss,
               zygote=None, workers=[], checksum_ok=checksum == reference,
               request_ms=round(request_s * 1000, 1), parent_peak_rss_mib=mib(peak_rss()),
               load_s=None, start_s=None)


def run_workerpool(size: int, n: int, engine: str, reference: float,
                   saved_model: str | None = None, load_in: str = "parent") -> dict:
    if load_in == "parent":
        import tensorflow  # noqa: F401 - the pool's parent imports it anyway: not publishing's

    import workerpool

    x = make_input(size)
    source, function = functools.partial(timed_build, size), predict
    if load_in == "loader":  # by reference: this module is __mp_main__ here, not importable
        import tf_memory

        source = functools.partial(tf_memory.timed_build, size)
    if saved_model is not None:
        source, function = saved_model, predict_named
    before_rss = current_rss()
    start = time.perf_counter()
    with workerpool.Pool(source, function, workers=n, threads_per_worker=1,
                         tf_engine=engine, load_in=load_in) as pool:
        started_s = time.perf_counter() - start
        start_peak = peak_rss()
        loader_peak = peak_rss(resource.RUSAGE_CHILDREN)  # the loader is reaped, no other
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
        if load_in != "parent":
            method += f", load_in={load_in}"
        if saved_model is not None:
            method = f"savedmodel {os.path.basename(saved_model)}"
        out = row(size, n, method, ready_s, total=stats["total_pss"],
                  parent=stats["parent"]["pss"], zygote=stats["zygote"]["pss"],
                  workers=stats["workers"], memfd=memfd_bytes, weights_pss=weights_pss,
                  checksum_ok=all(c == checksums[0] == reference for c in checksums),
                  request_ms=round(statistics.median(latencies) * 1000, 1),
                  parent_peak_rss_mib=mib(start_peak),
                  publish_peak_x_model=round(
                      (start_peak - before_rss + memfd_bytes) / stats["model_bytes"], 2)
                  if load_in == "parent" else None,
                  loader_peak_rss_mib=mib(loader_peak) if load_in != "parent" else None,
                  parent_imported_tensorflow="tensorflow" in sys.modules,
                  load_s=None if saved_model or _load_s is None else round(_load_s, 2),
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
def save_models(size: int, directory: str) -> dict:
    """Build the models of ``size`` MiB and save them under ``directory``: the Keras MLP as
    mlp.keras and (model.export) export/, the tf.Module MLP as module/. Returns
    {method: (path, output sum)} (1 TF thread)."""
    import tensorflow as tf

    set_tf_threads(1)
    model = build_keras_mlp(size)
    x = make_input(size)
    reference = keras_checksum(model, x)
    log(f"model {size} MiB: {mlp_shape(size)} (width, layers), "
        f"{mib(keras_bytes(model))} MiB of weights; output sum {reference}")
    keras_path = os.path.join(directory, "mlp.keras")
    model.save(keras_path)
    export = os.path.join(directory, "export")
    model.export(export, verbose=False)
    del model
    module = os.path.join(directory, "module")
    tf.saved_model.save(MLPModule(*mlp_shape(size)), module)
    paths = {"baseline": keras_path, "tensorflow": keras_path, "copy": keras_path,
             "plain": keras_path, "loader": keras_path}
    out = {method: (path, reference) for method, path in paths.items()}
    for method, path in (("savedmodel_export", export), ("savedmodel_module", module)):
        signature = tf.saved_model.load(path).signatures["serving_default"]
        (y,) = signature(tf.constant(x)).values()
        out[method] = (path, float(np.asarray(y).sum()))
        del signature
    return out


def _module_classes():
    import tensorflow as tf

    class Dense(tf.Module):
        def __init__(self, width: int, rng):
            super().__init__()
            scale = np.float32(1 / np.sqrt(width))
            self.kernel = tf.Variable(
                rng.standard_normal((width, width), np.float32) * scale)
            self.bias = tf.Variable(np.zeros(width, np.float32))

        @tf.function
        def __call__(self, x):
            return tf.nn.relu(tf.matmul(x, self.kernel) + self.bias)

    class MLP(tf.Module):
        def __init__(self, width: int, layers: int):
            super().__init__()
            rng = np.random.default_rng(0)
            self.layers = [Dense(width, rng) for _ in range(layers)]
            self.__call__ = tf.function(
                self._call, input_signature=[tf.TensorSpec([None, width], tf.float32,
                                                           name="x")])

        def _call(self, x):
            for layer in self.layers:
                x = layer(x)
            return {"y": x}

    return MLP


def MLPModule(width: int, layers: int):
    """A tf.Module MLP of ``layers`` Dense layers, each a nested tf.function."""
    return _module_classes()(width, layers)


def measure_one(size: int, n: int, method: str, path: str, reference: float) -> dict:
    """One row, in a fresh process."""
    if method == "baseline":
        return run_baseline(size, n, path, reference)
    if method == "plain":
        return run_plain(size, path, reference)
    if method == "loader":
        return run_workerpool(size, n, "tensorflow", reference, load_in="loader")
    if method.startswith("savedmodel"):
        return run_workerpool(size, n, "tensorflow", reference, saved_model=path)
    return run_workerpool(size, n, method, reference)


def in_fresh_process(function, *args):
    """``function(*args)`` in a new spawned process (not daemonic: it may start its own)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx,
                                                max_tasks_per_child=1) as executor:
        return executor.submit(function, *args).result()


METHODS = ("plain", "baseline", "tensorflow", "loader", "copy", "savedmodel_export",
           "savedmodel_module")


def measure(sizes: list[int], counts: list[int], methods=METHODS) -> list[dict]:
    methods = [m for m in METHODS if m in methods]  # the plain process and baseline first
    rows = []
    with tempfile.TemporaryDirectory(prefix="wp-tf-bench-") as tmp:
        for size in sizes:
            directory = str(pathlib.Path(tmp) / f"mlp{size}")
            os.makedirs(directory)
            saved = in_fresh_process(save_models, size, directory)
            for n in counts:
                base = None
                for method in methods:
                    if method == "plain" and n != 1:
                        continue
                    path, reference = saved[method]
                    out = in_fresh_process(measure_one, size, n, method, path, reference)
                    if method == "plain":
                        plain = out
                    if method == "baseline":
                        base = out
                    if n == 1 and "plain" in methods and method != "plain":
                        out["ratio_vs_plain"] = round(
                            out["total_pss_mib"] / plain["total_pss_mib"], 3)
                    out["ratio_vs_baseline"] = out["ratio_with_memfd"] = None
                    if base is not None:
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
            shutil.rmtree(directory)
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
           "per_worker_uss_mib", "ratio_vs_baseline", "ratio_vs_plain", "parent_pss_mib",
           "zygote_pss_mib",
           "unmapped_memfd_mib", "total_with_memfd_mib", "ratio_with_memfd",
           "parent_peak_rss_mib", "publish_peak_x_model", "load_s", "start_s", "ready_s", "request_ms", "checksum_ok"]


def main() -> None:
    sizes, counts, methods = sizes_and_workers(__doc__.splitlines()[0], methods=METHODS)
    rows = measure(sizes, counts, methods)
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
