"""Ray Data's map_batches: the standard actor pool (each actor loads the model) vs
workerpool.ray.PoolPredictor (one Pool per actor), on the same local cluster, same run.

The model: bench/common's fp32 MLP of ``--size`` MiB (256: 4 Linear(4096, 4096) + ReLU),
seeded; the data: ``--rows`` rows of 4096 float32 ones-and-noise (``ray.data.from_numpy``,
one 2-D column). ``ray.init(num_cpus=--cpus)``; then, for each method, the dataset is
mapped with batches of ``--batch`` rows and consumed in order (``iter_batches``):

- ``standard``: ``map_batches(TorchPredictor, compute=ActorPoolStrategy(size=cpus),
  num_cpus=1)``: an actor per CPU, each ``build_mlp`` in its constructor, 1 torch thread;
- ``workerpool``: ``map_batches(PoolPredictor, compute=ActorPoolStrategy(size=1),
  num_cpus=cpus)``: one actor whose Pool has a worker per CPU (1 thread each; load() in a
  loader process).

Measured: rows/s over the whole map (actor start and model load included), and the peak
and median total PSS (psutil ``memory_full_info``, sampled every 0.5 s; the peak may catch
a Pool's loader while it still holds its copy) of the map actors' process
trees (``ray::MapWorker`` processes and their children: a Pool's loader, zygote and
workers); each actor's pid comes back in a ``pid`` column, to count the actors that scored.
The dataset is split into 4 blocks per CPU, so every actor gets work. Prints JSON, writes bench/results/ray_score.md.

    .venv/bin/python bench/ray_score.py [--size 256] [--rows 8000] [--cpus 2] [--batch 250]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np
import psutil

from common import build_mlp, emit, log, markdown_table, mib, mlp_shape

HERE = os.path.dirname(os.path.abspath(__file__))


class TorchPredictor:
    """Ray Data's usual callable class: the model loaded in the actor's constructor."""

    def __init__(self, size: int):
        import torch

        torch.set_num_threads(1)
        self.model = build_mlp(size)

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.inference_mode():
            y = self.model(torch.from_numpy(np.ascontiguousarray(batch["data"]))).numpy()
        return {"checksum": y.sum(axis=1), "pid": np.full(len(y), os.getpid())}


def pool_predict(model, x):
    """What the pool's workers run: the same forward pass and row sums."""
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy().sum(axis=1)


class TaggedPoolPredictor:
    """PoolPredictor with this actor's pid beside the outputs, for the measurement."""

    def __init__(self, size: int):
        import functools

        from workerpool.ray import PoolPredictor

        self.inner = PoolPredictor(functools.partial(build_mlp, size), pool_predict,
                                   columns=["data"], threads_per_worker=1)

    def __call__(self, batch: dict) -> dict:
        out = self.inner(batch)
        return {"checksum": out["output"], "pid": np.full(len(out["output"]), os.getpid())}


def map_workers() -> list[psutil.Process]:
    """Ray Data's actor processes (``ray::MapWorker(...)``) and their descendants."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::MapWorker"):
            try:
                found += [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
    return found


class PeakPss(threading.Thread):
    """Samples the total PSS of the map actors' process trees every 0.5 s; keeps the peak
    and how many actors it saw then."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak, self.actors, self.samples = 0, 0, []

    def run(self) -> None:
        while not self.stop.wait(0.5):
            processes = map_workers()
            total = 0
            for process in processes:
                try:
                    total += process.memory_full_info().pss
                except psutil.NoSuchProcess:
                    continue
            if total:
                self.samples.append(total)
            if total > self.peak:
                self.peak = total
                self.actors = sum(p.cmdline()[0].startswith("ray::MapWorker")
                                  for p in processes if p.is_running())


def run(method: str, dataset, size: int, cpus: int, batch: int) -> dict:
    import ray

    if method == "standard":
        mapped = dataset.map_batches(TorchPredictor, fn_constructor_kwargs={"size": size},
                                     compute=ray.data.ActorPoolStrategy(size=cpus),
                                     num_cpus=1, batch_size=batch, batch_format="numpy")
    else:
        mapped = dataset.map_batches(TaggedPoolPredictor, fn_constructor_kwargs={"size": size},
                                     compute=ray.data.ActorPoolStrategy(size=1),
                                     num_cpus=cpus, batch_size=batch, batch_format="numpy")
    sampler = PeakPss()
    sampler.start()
    start = time.perf_counter()
    done, pids, checksum = 0, set(), 0.0
    for out in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        done += len(out["pid"])
        pids.update(int(p) for p in np.unique(out["pid"]))
        checksum += float(out["checksum"].astype(np.float64).sum())
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return {"method": method, "rows": done, "actors_that_scored": len(pids),
            "rows_per_s": round(done / seconds, 1), "seconds": round(seconds, 2),
            "peak_actors_tree_pss_mib": mib(sampler.peak), "actors_at_peak": sampler.actors,
            "median_actors_tree_pss_mib": mib(statistics.median(sampler.samples or [0])),
            "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([HERE, *sys.path])}})
    try:
        width = mlp_shape(args.size)[0]
        x = np.random.default_rng(0).standard_normal((args.rows, width)).astype(np.float32)
        dataset = ray.data.from_numpy(x).repartition(4 * args.cpus).materialize()
        rows = []
        for method in ("standard", "workerpool"):
            rows.append(run(method, dataset, args.size, args.cpus, args.batch))
            log(rows[-1])
    finally:
        ray.shutdown()
    standard, ours = rows
    ours["pss_vs_standard"] = round(
        ours["peak_actors_tree_pss_mib"] / standard["peak_actors_tree_pss_mib"], 3)
    ours["rows_per_s_vs_standard"] = round(ours["rows_per_s"] / standard["rows_per_s"], 3)
    same = abs(ours["checksum"] - standard["checksum"]) <= 1e-3 * abs(standard["checksum"])
    markdown = "\n\n".join([
        f"# Ray Data map_batches: an actor per CPU vs one Pool per actor ({args.size} MiB MLP, "
        f"{args.rows} rows, {args.cpus} CPUs, batches of {args.batch})",
        markdown_table(rows, [k for k in rows[1] if k != "checksum"]),
        f"Output checksums agree (within 1e-3 relative): {same}."])
    emit({"rows": rows, "checksums_agree": same}, "ray_score", markdown)


if __name__ == "__main__":
    main()
