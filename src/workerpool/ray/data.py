"""PoolPredictor: a callable class for ``ray.data.Dataset.map_batches``, one Pool per actor."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..pool.pool import Pool
from ..scoring.outputs import output_columns


def actor_pool(load, predict, workers: int | None, pool_options: dict) -> Pool:
    """The Pool of a Ray actor: a worker per CPU Ray assigned it unless ``workers`` says,
    load() in a loader (the actor's process never imports the framework) and results as
    numpy arrays, unless the options say otherwise."""
    pool_options = {"load_in": "loader", "numpy_results": True, **pool_options}
    return Pool(load, predict, workers=workers or assigned_cpus(), **pool_options)


def assigned_cpus() -> int:
    """The CPUs Ray reserved for this actor (1 outside Ray, or with fractional CPUs)."""
    import ray

    if not ray.is_initialized():
        return 1
    resources = ray.get_runtime_context().get_assigned_resources()
    return max(1, int(resources.get("CPU", 1)))


class PoolPredictor:
    """``map_batches`` with a workerpool Pool in each Ray actor.

    Args:
        load, predict: as for :class:`workerpool.Pool`; ``predict(model, x)`` gets ``x``, a
            2-D array of the ``columns`` (in that order) for some rows of the batch, and
            returns one output row per input row (an array, a dict or a tuple of them:
            the same columns ``workerpool score`` writes).
        columns: the feature columns (default: every column but ``passthrough``).
        passthrough: columns copied to the output unchanged (an id, say).
        workers: the pool's worker processes (default: the CPUs Ray assigned the actor).
        dtype: cast the features to it (text formats read numbers as float64).
        pool options: the rest, passed to Pool (``load_in`` defaults to ``"loader"``: the
            actor's own process never imports the framework).

    The batch is cut into one slice per worker, scored in parallel; a worker that dies is
    replaced and its slice retried (the pool's own guarantee), so no row is lost.
    """

    def __init__(self, load: Callable[[], Any] | str, predict: Callable[..., Any], *,
                 columns: list[str] | None = None, passthrough: tuple | list = (),
                 workers: int | None = None, dtype: str | None = None, **pool_options):
        self.columns = list(columns) if columns is not None else None
        self.passthrough = list(passthrough)
        self.dtype = dtype
        self.pool = actor_pool(load, predict, workers, pool_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.columns or [c for c in batch if c not in self.passthrough]
        features = np.column_stack([np.asarray(batch[name]) for name in names])
        if self.dtype is not None:
            features = features.astype(self.dtype, copy=False)
        rows = len(features)
        out = {name: np.asarray(batch[name]) for name in self.passthrough}
        if rows == 0:
            return out
        step = math.ceil(rows / self.pool.config.workers)
        slices = [features[start:start + step] for start in range(0, rows, step)]
        results = [future.result() for future in [self.pool.submit(s) for s in slices]]
        parts = [output_columns(result, len(s)) for result, s in zip(results, slices)]
        for name in parts[0]:
            out[name] = np.concatenate([part[name] for part in parts])
        return out

    def predict(self, x):
        """``predict(model, x)`` on the pool, as it returns it (``workerpool score``'s call)."""
        return self.pool.submit(x).result()

    def version(self) -> str:
        return self.pool.version

    def stats(self) -> dict:
        """The pool's ``stats()`` (memory included): for checking one copy per actor."""
        return self.pool.stats()

    def pids(self) -> list[int]:
        return self.pool.pids

    def close(self) -> None:
        self.pool.close()

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close(drain=False)
