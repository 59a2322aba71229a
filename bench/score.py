"""``workerpool score`` against scoring the same file in-process, in one run.

Two torch models on a parquet file of 32 float32 features (and an int64 id), written in
16k-row groups:
- tiny: one Linear(32, 1) - I/O bound: reading, writing and moving rows is the work.
- mlp: 32 -> 1024 -> 1024 -> 1024 -> 1024 -> 8 (4 hidden layers 1024 wide) - compute bound.

Baseline: the same reader, chunk size and output writer in this process, predict called
directly with torch on 1 thread (what a plain script does). Against it:
``workerpool.score`` with a started Pool of 1 and 2 workers (1 thread each); rows/s from
reading the input to the output's rename, medians of
``--rounds`` interleaved rounds. Targets (issue "workerpool score"): tiny >= 0.8 x
in-process; mlp with 2 workers >= 1.6 x in-process.

    .venv/bin/python bench/score.py [--rounds 3] [--tiny-rows 4000000] [--mlp-rows 40000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from common import emit, log, markdown_table

CHUNK_ROWS = 10_000


def tiny():
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(32, 1).eval()


def mlp():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 8)).eval()


def write_input(path: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).standard_normal((rows, 32)).astype(np.float32)
    columns = {"id": np.arange(rows, dtype=np.int64)}
    columns.update({f"f{i}": x[:, i] for i in range(32)})
    pq.write_table(pa.table(columns), path, row_group_size=16_384)


def in_process(load, source: str, sink: str) -> float:
    """Rows/s of the plain loop: read a chunk, call the model, write its rows."""
    import pyarrow.parquet as pq
    import torch

    from workerpool.scoring.outputs import output_columns, output_table
    from workerpool.scoring.readers import Reader
    from workerpool.sources.files import default_predict

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = load()
    writer, rows = None, 0
    with torch.inference_mode():
        for _, ids, x in Reader(source, None, "id").chunks(CHUNK_ROWS):
            table = output_table("id", ids, output_columns(default_predict(model, x), len(x)))
            writer = writer or pq.ParquetWriter(sink, table.schema)
            writer.write_table(table)
            rows += len(x)
    writer.close()
    return rows / (time.perf_counter() - started)


def pooled(load, source: str, sink: str, workers: int) -> float:
    """Rows/s of workerpool.score on a started pool (a pool starts in ~2 s here: a fresh
    interpreter importing torch; logged, not counted: a file of any size pays it once)."""
    import workerpool as wp
    from workerpool.sources.files import default_predict

    started = time.perf_counter()
    with wp.Pool(load, default_predict, workers=workers, threads_per_worker=1) as pool:
        log(f"pool of {workers} started in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        summary = wp.score(pool, source, sink, id_column="id", chunk_rows=CHUNK_ROWS)
        return summary.rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny-rows", type=int, default=4_000_000)
    parser.add_argument("--mlp-rows", type=int, default=40_000)
    parser.add_argument("--models", default="tiny,mlp")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-score-")
    models = {name: model for name, model in
              {"tiny": (tiny, args.tiny_rows), "mlp": (mlp, args.mlp_rows)}.items()
              if name in args.models.split(",")}
    trials: dict[tuple, list[float]] = {}
    try:
        for name, (_, rows) in models.items():
            write_input(os.path.join(directory, f"{name}.parquet"), rows)
        for round_ in range(args.rounds):
            for name, (load, _) in models.items():
                source = os.path.join(directory, f"{name}.parquet")
                sink = os.path.join(directory, f"{name}.out.parquet")
                for how, run in (("in-process", lambda: in_process(load, source, sink)),
                                 ("1 worker", lambda: pooled(load, source, sink, 1)),
                                 ("2 workers", lambda: pooled(load, source, sink, 2))):
                    trials.setdefault((name, how), []).append(run())
                    log((name, how), f"{trials[(name, how)][-1]:.0f} rows/s")
            log(f"round {round_ + 1}/{args.rounds} done")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    rows = []
    for (name, how), values in trials.items():
        base = statistics.median(trials[(name, "in-process")])
        rate = statistics.median(values)
        rows.append({"model": name, "rows": models[name][1], "how": how,
                     "rows_per_s": rate, "vs_in_process": rate / base})
    markdown = (f"# workerpool score vs in-process (chunk {CHUNK_ROWS} rows, medians of "
                f"{args.rounds} rounds)\n\n`{' '.join(['bench/score.py', *sys.argv[1:]])}`\n\n"
                + markdown_table(rows, ["model", "rows", "how", "rows_per_s", "vs_in_process"]))
    emit({"rounds": args.rounds, "rows": rows}, "score", markdown)
    print(markdown, file=sys.stderr)


if __name__ == "__main__":
    main()
