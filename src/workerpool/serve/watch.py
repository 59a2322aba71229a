"""``--watch``: hot-swap a model when its file (or directory) is replaced.

    every interval: fingerprint each model version's source path
        (inode, size, mtime, sha256 of the first and last MiB of each file)
    changed, and the same on the next poll (complete: nothing is still writing it)
        -> registry.swap_if(model, spec): Pool.reload, the old version serving meanwhile

The safe way to publish a new model file is to write it elsewhere and rename it over the
old one; the fingerprint then changes once, and the old version's workers keep their
mapping of the old inode until they leave. A file written in place is swapped only once it
has stopped changing for a poll.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

from ..serving.model import ModelState
from ..specs import is_function_spec
from .registry import Registry

log = logging.getLogger("workerpool.serve")

EDGE = 1024 * 1024  # bytes hashed at each end of a file


def fingerprint(path: str) -> tuple | None:
    """What identifies the content at ``path`` cheaply; None while it does not exist."""
    try:
        if os.path.isdir(path):
            entries = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    full = os.path.join(root, name)
                    entries.append((os.path.relpath(full, path), _file_print(full)))
            return tuple(entries)
        return _file_print(path)
    except OSError:  # vanished between listing and reading: changing, look again later
        return None


def _file_print(path: str) -> tuple:
    with open(path, "rb") as file:
        status = os.fstat(file.fileno())
        digest = hashlib.sha256(file.read(EDGE))
        if status.st_size > EDGE:
            file.seek(max(EDGE, status.st_size - EDGE))
            digest.update(file.read(EDGE))
    return status.st_ino, status.st_size, status.st_mtime_ns, digest.hexdigest()


class Watcher(threading.Thread):
    """Polls the source path of every model version; swaps a version whose source
    changed and then held still for one interval."""

    def __init__(self, registry: Registry, interval: float):
        super().__init__(name="workerpool-watch", daemon=True)
        self.registry = registry
        self.interval = interval
        self.stopped = threading.Event()
        self.seen: dict[int, tuple] = {}  # id(model) -> fingerprint it serves
        self.candidate: dict[int, tuple] = {}  # id(model) -> a new fingerprint, seen once

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for model in self.registry.models:
                try:
                    self.check(model)
                except Exception as exc:  # noqa: BLE001 - keep watching the others
                    log.error("--watch: model %s version %s: %s", model.name, model.version,
                              exc)

    def check(self, model) -> None:
        source = model.spec.source
        if not isinstance(source, str) or is_function_spec(source) or "://" in source:
            return
        key = id(model)
        now = fingerprint(source)
        if key not in self.seen:  # from its first poll, loading or not: no change missed
            self.seen[key] = now
            return
        if model.state not in (ModelState.LOADED, ModelState.FAILED):
            return  # loading, unloading or unloaded: not ours to swap now
        if now is None or now == self.seen[key]:
            self.candidate.pop(key, None)
            return
        if self.candidate.get(key) != now:
            self.candidate[key] = now  # changed: swap once it holds still for a poll
            return
        del self.candidate[key]
        self.seen[key] = now
        log.info("--watch: %s changed; swapping model %s version %s", source, model.name,
                 model.version)
        self.registry.swap_if(model, model.spec)

    def stop(self) -> None:
        self.stopped.set()
