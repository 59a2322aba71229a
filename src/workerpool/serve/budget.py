"""``--max-memory``: past a memory budget, the least recently used models lose their idle
workers first.

    every interval: the PSS of this server and every process under it (pool/memory.py)
    over the budget -> models by their latest request, oldest first:
        Pool.release_idle_workers(): its idle workers stop, it stays ready at zero workers,
        and its next request wakes one by a fork (milliseconds; load() never runs again)
    until what those workers held (their PSS) brings the estimate under the budget

What is released is what can come back cheaply: worker processes. A model's published
weights and its zygote stay (a wake costs a fork and the page faults of its first call, not
a load). Releasing those too, the weights of long-idle models to be loaded again on demand,
would turn a wake into a reload (seconds: load() again, a framework import in a loader) and
is not done: unload such a model (the repository API) if its memory is needed.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

from ..pool.memory import tree_pss
from ..serving.model import ModelState

log = logging.getLogger("workerpool.serve")

class MemoryBudget(threading.Thread):
    """Keeps the server's process tree under ``max_bytes`` by releasing the idle workers of
    the least recently used models. ``measure()``: bytes in use now (default: the PSS of
    this process and everything under it)."""

    def __init__(self, registry, max_bytes: int, interval: float = 1.0,
                 measure: Callable[[], int] | None = None):
        super().__init__(name="workerpool-memory-budget", daemon=True)
        self.registry = registry
        self.max_bytes = max_bytes
        self.interval = interval
        self.measure = measure or (lambda: tree_pss(os.getpid()))
        self.stopped = threading.Event()
        self.used: int | None = None  # at the latest check
        self.releases = 0  # workers released, all told
        self.warned = False  # said once that nothing could be released

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - keep guarding the budget
                log.error("--max-memory: %s", exc)

    def check(self) -> list[str]:
        """One round: the models released from (name@version), least recently used first."""
        self.used = used = self.measure()
        released = []
        if used <= self.max_bytes:
            return released
        loaded = [m for m in self.registry.models
                  if m.state == ModelState.LOADED and m.pool is not None]
        for model in sorted(loaded, key=lambda m: m.last_used):
            if used <= self.max_bytes:
                break
            pool = model.pool
            try:
                held = {w["pid"]: w.get("pss", 0) for w in pool.stats()["workers"]}
                stopped = pool.release_idle_workers()
            except Exception:  # noqa: BLE001 - closing or swapped meanwhile: the next one
                continue
            if stopped:
                freed = sum(held.get(pid, 0) for pid in stopped)
                used -= freed
                self.releases += len(stopped)
                released.append(f"{model.name}@{model.version}")
                log.warning("--max-memory: %.0f MiB over the budget of %.0f MiB: model %s "
                            "version %s released %d idle worker(s) (%.0f MiB); it wakes on "
                            "its next request", (self.used - self.max_bytes) / 2 ** 20,
                            self.max_bytes / 2 ** 20, model.name, model.version,
                            len(stopped), freed / 2 ** 20)
        if used > self.max_bytes and not released and not self.warned:
            log.warning("--max-memory: %.0f MiB in use, over the budget of %.0f MiB, and no "
                        "model has an idle worker to release", self.used / 2 ** 20,
                        self.max_bytes / 2 ** 20)
        self.warned = used > self.max_bytes and not released
        return released

    def stop(self) -> None:
        self.stopped.set()
