"""``workerpool score``: its command line, progress and exit codes.

Exit codes:
    0  every row scored (with --on-error skip: every row but those in OUTPUT.errors.jsonl)
    1  predict failed on a chunk (--on-error fail), or predict's output cannot be written
    2  a bad command line, input or model spec; or a resume refused (another input, model
       or settings than the parts were written with)
    3  stopped by SIGINT/SIGTERM after finishing the chunks in flight: resume with --resume
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

from ..config import LOAD_IN
from .progress import reporter


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workerpool score",
        description="Score a file with a model in a pool of workers that share one copy of "
                    "its weights: streamed, resumable, with progress.",
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="module:load, path/to/file.py:load, or a model path or URL "
                   "(as in workerpool serve)")
    p.add_argument("--predict", help="module:function or file.py:function; optional for "
                   "torch and Keras/TensorFlow models (the model is called)")
    p.add_argument("--builder", help="module:function returning the empty module, for "
                   "state-dict files")
    p.add_argument("--trust-pickle", action="store_true", help="allow a model file that "
                   "pickles a whole module (unpickling runs code from the file: only files "
                   "you trust)")
    p.add_argument("--input", required=True, help="a .parquet, .csv, .jsonl or .npy file")
    p.add_argument("--output", required=True, help="a .parquet, .csv, .jsonl or .npy file; "
                   "written only when every chunk is done")
    p.add_argument("--columns", help="a,b,c: the feature columns predict gets, in this order "
                   "(default: every column but the id column; for .npy: column numbers)")
    p.add_argument("--dtype", help="cast the features to this numpy dtype (float32, ...): "
                   "CSV and JSON numbers read as float64")
    p.add_argument("--id-column", help="a column carried to the output beside each row's "
                   "outputs")
    p.add_argument("--chunk-rows", type=int, default=10_000,
                   help="rows per chunk: the unit of work, of resume and of memory "
                   "(default 10000)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: this machine's CPUs; with --engine ray: "
                   "per actor, default its node's CPUs)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default): a Pool here; ray: a Pool in an actor per node of "
                   "a Ray cluster (pip install 'workerpool-serve[ray]'); the same output bytes")
    p.add_argument("--address", default=None,
                   help="with --engine ray: the cluster to join (auto, or HOST:PORT; "
                   "default: start a local one)")
    p.add_argument("--load-in", choices=LOAD_IN, default="loader",
                   help="where load() runs: a loader process (default: this process then "
                   "imports no framework and holds no weights) or this one")
    p.add_argument("--max-batch-size", type=int, help="rows per predict call (default: a "
                   "whole chunk)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped or crashed run from its OUTPUT.parts/")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="fail (default): stop at the first chunk predict fails on; skip: "
                   "isolate the bad rows, list them in OUTPUT.errors.jsonl, score the rest")
    p.add_argument("--log-every", type=float, default=5.0,
                   help="seconds between progress lines when stderr is not a terminal")
    return p


def open_pool(args, load, predict, options):
    """The pool chunks go to: a Pool here, or a RayPool (a Pool per Ray actor)."""
    if args.engine == "local":
        from .. import Pool

        return Pool(load, predict, workers=args.workers or os.cpu_count() or 1, **options)
    return ray_pool(args, load, predict, options)


@contextlib.contextmanager
def ray_pool(args, load, predict, options):
    import ray

    from ..ray.scoring import RayPool

    # Ray's workers import predict and load by reference: this process's path goes along.
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path
                                                                      if p)}})
    try:
        with RayPool(load, predict, cpus_per_actor=args.workers, **options) as pool:
            yield pool
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from ..errors import ConfigError, ModelSourceError, WorkerpoolError
    from ..specs import load_and_predict
    from ..sources.remote import fetch
    from .outputs import OutputError
    from .parts import ResumeRefused
    from .readers import InputError, Reader
    from .run import Interrupted, ScoreFailed, score

    def fail(code: int, message: str) -> int:
        print(f"workerpool score: {message}", file=sys.stderr)
        return code

    columns = args.columns.split(",") if args.columns else None
    try:
        total = Reader(fetch(args.input), columns, args.id_column, args.dtype).total_rows
        load, predict = load_and_predict(args.spec, args.predict, args.builder,
                                         trust_pickle=args.trust_pickle,
                                         import_here=args.load_in != "loader")
        options = {"load_in": args.load_in, "numpy_results": True}
    except (InputError, ConfigError, ModelSourceError, OSError, TypeError) as exc:
        return fail(2, str(exc))
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print(f"workerpool score: {signal.Signals(signum).name}: finishing the chunks in "
              "flight, then stopping (again to stop at once)", file=sys.stderr)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    started = time.monotonic()
    progress = reporter(total, args.log_every)
    try:
        with open_pool(args, load, predict, options) as pool:
            identity = f"{args.spec} {args.predict or ''} {pool.version}"
            summary = score(pool, args.input, args.output, columns=columns,
                            id_column=args.id_column, chunk_rows=args.chunk_rows,
                            batch_rows=args.max_batch_size, resume=args.resume,
                            on_error=args.on_error, progress=progress.update, stop=stop,
                            model_identity=identity, dtype=args.dtype)
    except (InputError, ResumeRefused, ModelSourceError) as exc:  # (load() refused a file)
        return fail(2, str(exc))
    except (ScoreFailed, OutputError) as exc:
        return fail(1, str(exc).split("\n", 1)[0])
    except (Interrupted, KeyboardInterrupt) as exc:  # a second signal: at once
        return fail(3, str(exc) or "stopped at once; resume with --resume (the chunks that "
                    "were in flight are scored again)")
    except WorkerpoolError as exc:  # the pool itself: broken, closed, ...
        return fail(1, str(exc).split("\n", 1)[0])
    finally:
        progress.close()
    seconds = time.monotonic() - started
    print(f"workerpool score: {summary.rows} rows in {seconds:.1f} s "
          f"({summary.rows / seconds if seconds else 0:.0f} rows/s), {summary.errors} errors"
          + (f" (see {args.output}.errors.jsonl)" if summary.errors else "")
          + (f", {summary.resumed_chunks} chunks resumed" if summary.resumed_chunks else "")
          + f" -> {args.output}", file=sys.stderr)
    return 0
