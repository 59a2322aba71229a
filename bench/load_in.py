"""Pool(load_in="parent") vs Pool(load_in="loader"): what the loader saves the pool's process
and what it costs in start time, for a caller that imports the framework itself and for one
that does not.

For each framework (a torch MLP, a Keras MLP; ``--size`` MiB of fp32 weights, bench/common's
shapes), each caller (``imports``: the caller imports the framework before creating the
pool, as a program that builds its own tensors does; ``bare``: it imports only numpy and
workerpool) and each ``load_in``, in a fresh interpreter: create ``Pool(load, predict,
workers=--workers, threads_per_worker=1)``, run one request per worker, then measure

- ``start_s``: creating the Pool (load, publish, zygote, workers ready);
- the pool's process: USS and PSS (psutil ``memory_full_info``) after the requests;
- ``total_pss_mib``: ``stats()["total_pss"]`` (the process, the zygote and the workers).

Medians of ``--rounds`` runs (interleaved). Prints JSON, writes bench/results/load_in.md.

    .venv/bin/python bench/load_in.py [--size 128] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import emit, log, markdown_table

def child(framework: str, caller: str, load_in: str, size: int, workers: int) -> None:
    import time

    import numpy as np
    import psutil

    if caller == "imports":
        __import__("torch" if framework == "torch" else "tensorflow")
    import server_models
    import workerpool
    from common import mlp_shape

    load = server_models.torch_mlp if framework == "torch" else server_models.keras_mlp
    predict = server_models.torch_predict if framework == "torch" else server_models.call
    x = np.ones((8, mlp_shape(size)[0]), np.float32)
    start = time.perf_counter()
    with workerpool.Pool(load, predict, workers=workers, threads_per_worker=1,
                         load_in=load_in, numpy_results=True) as pool:
        start_s = time.perf_counter() - start
        for future in [pool.submit(x) for _ in range(4 * workers)]:
            future.result()
        stats = pool.stats()
        info = psutil.Process().memory_full_info()
        print(json.dumps({"start_s": start_s, "parent_uss": info.uss, "parent_pss": info.pss,
                          "total_pss": stats["total_pss"],
                          "parent_imported": [m for m in ("torch", "tensorflow")
                                              if m in sys.modules]}))


def run(framework: str, caller: str, load_in: str, size: int, workers: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", framework, caller, load_in, str(size),
         str(workers)], capture_output=True, text=True,
        env=dict(os.environ, WORKERPOOL_BENCH_MIB=str(size)))
    if done.returncode:
        raise RuntimeError(f"{framework} {caller} {load_in} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = [(f, c, w) for f in ("torch", "tensorflow") for c in ("imports", "bare")
             for w in ("parent", "loader")]
    trials: dict[tuple, list[dict]] = {case: [] for case in cases}
    for round_ in range(args.rounds):
        for case in cases:
            trials[case].append(run(*case, args.size, args.workers))
            log(f"round {round_ + 1}: {case}: {trials[case][-1]}")
    rows = []
    mib = 1024 * 1024
    for (framework, caller, load_in), runs in trials.items():
        rows.append({
            "framework": framework, "caller": caller, "load_in": load_in,
            "start_s": round(statistics.median(r["start_s"] for r in runs), 2),
            "parent_uss_mib": round(statistics.median(r["parent_uss"] for r in runs) / mib, 1),
            "parent_pss_mib": round(statistics.median(r["parent_pss"] for r in runs) / mib, 1),
            "total_pss_mib": round(statistics.median(r["total_pss"] for r in runs) / mib, 1),
            "parent_imported": ",".join(runs[0]["parent_imported"]) or "-"})
    markdown = "\n\n".join([
        f"# load_in: parent vs loader ({args.size} MiB MLP, {args.workers} workers, "
        f"medians of {args.rounds} rounds, {os.cpu_count()} CPUs)",
        markdown_table(rows, list(rows[0]))])
    emit({"rows": rows}, "load_in", markdown)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        framework, caller, load_in, size, workers = sys.argv[2:7]
        child(framework, caller, load_in, int(size), int(workers))
    else:
        main()
