"""Inline models in the HTTP front ends: with ``--http-workers N``, each front end calls its
own copy of every ``inline = true`` model, so a light model's requests never reach the
server's process and HTTP, JSON and the model all scale with the front ends, as gunicorn's
workers do.

    server's process (InlineTable, on the relay)         front end (FrontInline)
      the registry changed -> the table: each loaded      "inline" {after: N}: a long poll,
      inline version's spec, signature and weights        and the ack of table N
      hash, and each model's default version  --N+1-->   loads what is new (a thread), drops
      a swap is answered once every front end asked       what left, asks again
      with after >= N+1: none serves the old one then
                                             <--"tally"-- every 0.1 s: the requests it
      metrics, Triton statistics, the compute histogram   answered (outcome, seconds) and the
      count them as if this process had served them       calls it made (compute seconds)

A front end serves a model from its copy only when the copy's weights hash is the server's
(a model file rewritten between the two loads is relayed until the next table); a request
with tensors in shared memory, or for a version the front end does not hold, is relayed as
before, and the server's process calls its own copy. Each copy is a load of the model in
each front end: meant for models of kilobytes to a few MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import threading

from .. import request_ids
from ..serving.dataplane import DataPlane
from ..serving.errors import outcome_of
from ..serving.inline import InlinePool
from ..serving.model import ModelState, ServedModel

log = logging.getLogger("workerpool.serve")

ACK_TIMEOUT_S = 30.0  # how long a swap waits for the front ends to load the new version
TALLY_INTERVAL_S = 0.1


# -- the server's side ------------------------------------------------------------------
def inline_table(registry) -> dict:
    """``{name: {"default": label, "versions": {label: entry}}}`` of every loaded inline
    version whose model a front end can load by its spec (source and predict given as
    strings: a path, or ``module:attr``)."""
    table: dict = {}
    for model in registry.models:
        pool, spec = model.pool, model.spec
        if not isinstance(pool, InlinePool) or model.state != ModelState.LOADED or \
                not isinstance(spec.source, str) or \
                not isinstance(spec.predict, (str, type(None))) or \
                not isinstance(spec.builder, (str, type(None))):
            continue
        entry = {"source": spec.source, "predict": spec.predict, "builder": spec.builder,
                 "warmup": _table_warmup(spec.warmup),
                 "trust_pickle": spec.trust_pickle, "inputs": spec.inputs,
                 "outputs": spec.outputs, "timeout": pool.config.timeout,
                 "signature": model.signature, "weights": pool.version}
        table.setdefault(model.name, {"default": None, "versions": {}})["versions"][
            model.version] = entry
    for name, models in table.items():
        try:
            models["default"] = registry.get(name).version
        except Exception:  # noqa: BLE001 - removed meanwhile: no default, all relayed
            pass
    return table


def _table_warmup(warmup):
    """A spec's warm-up as a table entry carries it: a file's path (or None: a SavedModel's
    own warm-up file, if any) as it is; inputs given as a list, pickled (entries are
    compared whole with ==, which arrays do not answer with one bool)."""
    if warmup is None:
        return None
    if isinstance(warmup, (str, os.PathLike)):
        return os.fspath(warmup)
    return pickle.dumps(list(warmup))


class InlineTable:
    """What the front ends should hold, numbered; ``publish()`` after the registry changed."""

    def __init__(self, registry, ack_timeout: float = ACK_TIMEOUT_S):
        self.registry = registry
        self.ack_timeout = ack_timeout
        self.generation = 0
        self.table: dict = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._asked_after: dict = {}  # front end's stream -> the table it asked after
        self._publishing = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start on ``loop`` (the relay's) with the registry as it is now."""
        self.loop = loop
        self._changed = asyncio.Event()
        self.table, self.generation = inline_table(self.registry), 1

    async def next_table(self, stream, after: int) -> dict:
        """The table once it is newer than ``after`` (a front end holds ``after``)."""
        self._asked_after[stream] = after
        while self.generation <= after:
            await self._changed.wait()
        return {"generation": self.generation, "table": self.table}

    def lost(self, stream) -> None:
        self._asked_after.pop(stream, None)

    def publish(self) -> None:
        """The registry changed: a new table if what the front ends should hold did, and
        (called from a thread) return once each front end holds it, or after ack_timeout
        seconds. On the loop's own thread it only installs the table."""
        if self.loop is None:
            return
        with self._publishing:
            table = inline_table(self.registry)
            if table == self.table:
                return
            on_loop = _running_loop() is self.loop
            if on_loop:
                self._install(table)
                return
            # (bounded: a loop that stopped meanwhile, the server exiting, never answers)
            generation = asyncio.run_coroutine_threadsafe(
                self._installed(table), self.loop).result(self.ack_timeout)
            held = asyncio.run_coroutine_threadsafe(
                self._held_by_all(generation), self.loop).result(self.ack_timeout + 5)
            if not held:
                log.warning("workerpool serve: an HTTP front end did not take the new inline "
                            "models within %g s; until it does it may answer with what it "
                            "held", self.ack_timeout)

    async def _installed(self, table: dict) -> int:
        return self._install(table)

    def _install(self, table: dict) -> int:
        self.table = table
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self.generation

    async def _held_by_all(self, generation: int) -> bool:
        deadline = self.loop.time() + self.ack_timeout
        while any(after < generation for after in self._asked_after.values()):
            if self.loop.time() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True


def count_tally(app, message: dict) -> None:
    """A front end's tally, counted by the server's ``app`` as its own requests."""
    registry, metrics = app.registry, app.plane.metrics
    for name, version, protocol, outcome, seconds in message["requests"]:
        versions = registry.versions.get(name)
        if versions is None:
            continue
        if metrics is not None:
            metrics.observe(name, outcome, seconds, protocol)
        model = versions.get(version)
        if model is not None:
            model.statistics.record(outcome == "success", seconds)
    for name, version, compute_s, rows in message["calls"]:
        model = registry.versions.get(name, {}).get(version)
        if model is not None and isinstance(model.pool, InlinePool):
            model.pool.record(compute_s, rows)


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -- a front end's side -----------------------------------------------------------------
class RelayInstead(Exception):
    """This request is the server's to answer (tensors in shared memory, a model or version
    this front end does not hold)."""


class _RelayedSharedMemory:
    """The front end holds no client region: a request naming one goes to the server."""

    def resolve(self, inputs):
        raise RelayInstead()

    def slot(self, use):
        raise RelayInstead()


class Tally:
    """A front end's requests and calls of inline models, until sent to the server."""

    def __init__(self):
        self.requests: list = []  # (name, version, protocol, outcome, seconds)
        self.calls: list = []  # (name, version, compute seconds, rows)

    def finished(self, name: str, protocol: str, error: BaseException | None,
                 seconds: float) -> None:
        """DataPlane's metrics: a request that ended, with its outcome."""
        if isinstance(error, RelayInstead):
            return  # the server counts it
        served = request_ids.served.get()  # (name, version, protocol), set by the plane
        version = served[1] if served is not None and served[0] == name else None
        self.requests.append((name, version, protocol,
                              "success" if error is None else outcome_of(error), seconds))

    def taken(self) -> dict | None:
        """What to send, emptied here; None when there is nothing."""
        if not self.requests and not self.calls:
            return None
        message = {"kind": "tally", "requests": self.requests, "calls": self.calls}
        self.requests, self.calls = [], []
        return message


class FrontInline:
    """A front end's copies of the inline models: ``serves(name, version)``, then
    ``kserve.infer(front_inline, ...)`` (it has the ``plane`` and ``max_request_bytes`` the
    route reads)."""

    def __init__(self, client, max_request_bytes: int):
        self.client = client
        self.max_request_bytes = max_request_bytes
        self.models: dict[tuple[str, str], ServedModel] = {}
        self.entries: dict[tuple[str, str], dict] = {}
        self.defaults: dict[str, str | None] = {}
        self.generation = 0
        self.tally = Tally()
        self.plane = DataPlane(self, self.tally, max_tensor_bytes=max_request_bytes)
        self.plane.shared_memory = _RelayedSharedMemory()
        self._tasks: list[asyncio.Task] = []

    # what DataPlane reads of its models
    def get(self, name: str, version: str | None = None) -> ServedModel:
        model = self.models.get(self._key(name, version))
        if model is None:
            raise RelayInstead()
        return model

    def version_labels(self, name: str) -> list[str]:
        return sorted(label for held, label in self.models if held == name)

    ready = True

    def serves(self, name: str, version: str | None) -> bool:
        return self._key(name, version) in self.models

    def _key(self, name: str, version: str | None) -> tuple[str, str | None]:
        """(name, label) of the version a request names; without one, the server's
        default version of ``name``."""
        return name, version if version is not None else self.defaults.get(name)

    async def start(self) -> None:
        """The server's table taken (before this front end serves), then followed."""
        await self._follow_once()
        self._tasks = [asyncio.ensure_future(self._follow()),
                       asyncio.ensure_future(self._send_tallies())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.flush()

    def flush(self) -> None:
        message = self.tally.taken()
        if message is not None:
            with contextlib.suppress(Exception):  # the server is gone: nobody to count
                self.client.notify(message)

    async def _send_tallies(self) -> None:
        while True:
            await asyncio.sleep(TALLY_INTERVAL_S)
            self.flush()

    async def _follow(self) -> None:
        while True:
            try:
                await self._follow_once()
            except asyncio.CancelledError:
                raise
            except ConnectionError:
                return  # the relay closed: this front end is stopping
            except Exception as exc:  # noqa: BLE001 - never serve a table it could not follow
                log.warning("workerpool serve: this HTTP front end relays every inline model "
                            "for now: %s", exc)
                self.models, self.entries = {}, {}
                await asyncio.sleep(1.0)

    async def _follow_once(self) -> None:
        update = await self.client.call({"kind": "inline", "after": self.generation})
        await self._apply(update["table"])
        self.generation = update["generation"]

    async def _apply(self, table: dict) -> None:
        wanted = {(name, label): entry for name, models in table.items()
                  for label, entry in models["versions"].items()}
        models = {key: model for key, model in self.models.items()
                  if self.entries[key] == wanted.get(key)}
        entries = {key: self.entries[key] for key in models}
        for key, entry in wanted.items():
            if key in models:
                continue
            try:
                models[key] = await asyncio.to_thread(self._loaded, key, entry)
                entries[key] = entry
            except Exception as exc:  # noqa: BLE001 - the server's process answers it then
                log.warning("workerpool serve: this HTTP front end relays model %s version "
                            "%s: %s", key[0], key[1], exc)
        self.models, self.entries = models, entries  # (requests read one or the other)
        self.defaults = {name: models_["default"] for name, models_ in table.items()}

    def _loaded(self, key: tuple[str, str], entry: dict) -> ServedModel:
        from ..specs import load_and_predict
        from .config import ModelSpec

        load, predict = load_and_predict(entry["source"], entry["predict"], entry["builder"],
                                         trust_pickle=entry["trust_pickle"], import_here=True)
        warmup = entry["warmup"]  # (pickled by the server's process, behind the relay)
        spec = ModelSpec(key[0], entry["source"], warmup=pickle.loads(warmup)
                         if isinstance(warmup, bytes) else warmup)
        # warmed up as the server's copy was: its first request does not pay for it
        pool = InlinePool(load, predict, inputs=entry["inputs"], outputs=entry["outputs"],
                          timeout=entry["timeout"], warmup=spec.warmup_arguments(),
                          on_call=functools.partial(self._called, key))
        if pool.version != entry["weights"]:
            pool.close()
            raise RuntimeError(f"its copy here ({pool.version}) is not the server's "
                               f"({entry['weights']}): the model file changed between the "
                               "two loads, or the model does not pickle (no hash)")
        model = ServedModel(*key)
        model.pool = pool
        model.signature = entry["signature"]
        model.become(ModelState.LOADED)
        return model

    def _called(self, key: tuple[str, str], compute_s: float, rows: int) -> None:
        self.tally.calls.append((*key, compute_s, rows))
