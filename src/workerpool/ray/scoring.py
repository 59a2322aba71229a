"""``workerpool score --engine ray``: the local engine's run (chunks, parts, resume, the
same output bytes) with each chunk scored on a Ray actor holding a Pool.

    score(RayPool, ...) ── chunk i ──> actor (i mod actors).predict.remote(rows) ──> its Pool
                        <── the result ── in chunk order, as the local engine writes them

An actor per Ray node by default, reserving the node's CPUs, its Pool a worker per CPU:
one weight copy per node. Each actor takes several chunks at once (a threaded actor), so
its workers stay busy; ``predict`` gets exactly the rows it gets locally, so the output is
the same, byte for byte.
"""

from __future__ import annotations

import itertools
import types
from concurrent.futures import Future
from typing import Any, Callable

from .data import PoolPredictor


def node_cpus() -> list[int]:
    """The CPUs of each live node of the cluster this process is connected to."""
    import ray

    return [int(node["Resources"].get("CPU", 0)) for node in ray.nodes()
            if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]


class RayPool:
    """What ``workerpool.scoring.score`` needs of a Pool (``submit``, ``version``,
    ``config.workers``), spread over Ray actors that each hold a Pool.

    ``actors`` (default: one per node) each reserve ``cpus_per_actor`` CPUs (default: the
    smallest node's) and run that many workers. Every actor publishes the same model, so
    they agree on ``version`` (the weights' content hash)."""

    def __init__(self, load: Callable[[], Any] | str, predict: Callable[..., Any], *,
                 actors: int | None = None, cpus_per_actor: int | None = None,
                 **pool_options):
        import ray

        cpus = node_cpus()
        if not cpus:
            raise RuntimeError("the Ray cluster has no live node with a CPU")
        actors = actors or len(cpus)
        cpus_per_actor = cpus_per_actor or min(cpus)
        remote = ray.remote(num_cpus=cpus_per_actor, max_concurrency=4 * cpus_per_actor)(
            PoolPredictor)
        self.actors = [remote.remote(load, predict, workers=cpus_per_actor, **pool_options)
                       for _ in range(actors)]
        try:
            versions = set(ray.get([actor.version.remote() for actor in self.actors]))
        except BaseException:
            self.close()
            raise
        if len(versions) != 1:
            self.close()
            raise RuntimeError(f"the actors loaded different models: {sorted(versions)}")
        self.version = versions.pop()
        self.config = types.SimpleNamespace(workers=actors * cpus_per_actor)
        self._turn = itertools.cycle(self.actors)

    def submit(self, x) -> Future:
        """``predict(model, x)`` on the next actor's Pool; its exception as the local
        engine would see it (Ray's error is an instance of the original type)."""
        return next(self._turn).predict.remote(x).future()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - it is killed below either way
                pass
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
