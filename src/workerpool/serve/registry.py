"""The models a server holds: name -> version -> Model (a pool); loading, swapping, unloading.

    start_loading() ── one thread per model version ──> Pool(load, predict, warmup=...)
    get(name, version)        what the data plane serves (serving/dataplane.py)
    load(name, parameters)    a new model or version (at most max_models loaded in all);
                              a loaded one is hot-swapped (Pool.reload: the old version
                              serves until the new is warm)
    unload(name, parameters)  stop taking requests, drain, free
    apply(specs)              a re-read --config: add, remove, swap what changed
    close()                   every pool: close(drain)

A version is a named slot (``NAME=SPEC@VERSION``, default "1") holding one pool; a hot swap
keeps the slot and changes what its pool serves (``Pool.version``, a content hash or label,
shown as ``weights_version``). The plain routes go to the newest ready version: the highest
number when every label is a number, else the one added last. Lifecycle operations run one
at a time (a lock), in threads: never on the event loop.

A model is ready while its pool has live, attached, warmed-up workers (``Pool.is_ready``):
not while it loads, nor when its pool is broken, unloading or closing. Its signature is the
declared one (``inputs``/``outputs``), else the model's own (a Keras model's inputs and
outputs, a SavedModel's signature_def), else from its warm-up call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from typing import Any, Callable

from .. import errors, malloc
from ..config import usable_cores
from ..errors import ConfigError
from ..pool.pool import Pool
from ..pool.runtime import Runtime
from ..serving.errors import (BadRequest, ModelNotFound, NotReady, TooManyModels,
                              unknown_model)
from ..serving import triton
from ..serving.inline import InlinePool
from ..serving.model import HOLDS_A_POOL, ModelState, ServedModel, pool_signature
from ..signature import Signature, TensorSpec, datatype_of
from ..specs import is_function_spec
from ..tensors import as_tensor, call_argument, name_outputs
from .config import ModelSpec, check_name, check_version
from .settings import DEFAULT_MAX_MODELS

log = logging.getLogger("workerpool.serve")

DEFAULT_VERSION = "1"


class LoadsInProgress:
    """Counts the loads running in this process; when the last of a burst ends, what they
    freed goes back to the OS. Loading leaves cyclic garbage (unpickled skeletons, the
    loader's messages) and a heap glibc would keep: measured, 8 torch models left a server
    69.8 MiB PSS, 47.2 after a collection and a trim. Once a burst, not once a load: a full
    collection took 0.3 s in a process holding torch and TensorFlow."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running = 0

    @contextlib.contextmanager
    def running(self):
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                malloc.collect_and_return()


LOADS = LoadsInProgress()


class Model(ServedModel):
    """One version of a served model: its spec, and its pool once loaded; loading, hot
    swaps and unloading move it through ModelState (serving/model.py)."""

    def __init__(self, spec: ModelSpec, pool_factory: Callable[..., Any] = Pool):
        super().__init__(spec.name, spec.version)
        self.spec = spec
        self.pool_factory = pool_factory  # Pool; tests of the lifecycle give their own
        self.loaded = threading.Event()
        self.load_seconds: float | None = None
        self.swaps = 0

    def load(self) -> None:
        """Start this version's pool (in the calling thread); failures are recorded."""
        with LOADS.running():
            self._load()

    def _load(self) -> None:
        self.become(ModelState.LOADING)
        self.error = ""
        self.loaded.clear()
        started = time.monotonic()
        try:
            load, predict, options = self.spec.pool_arguments()
            pool = self.pool_factory(load, predict, **options)
        except BaseException as exc:  # noqa: BLE001 - reported on the model, server goes on
            self.error = f"{type(exc).__name__}: {exc}"
            if self.state == ModelState.LOADING:
                self.become(ModelState.FAILED)
            log.error("model %s version %s failed to load: %s", self.name, self.version,
                      self.error)
            self.loaded.set()
            return
        self.pool = pool
        self._describe()
        self.load_seconds = time.monotonic() - started
        if self.state == ModelState.LOADING:
            self.become(ModelState.LOADED)
            log.info("model %s version %s ready in %.1f s", self.name, self.version,
                     self.load_seconds)
        else:  # unloaded or closed while it loaded
            self.pool = None
            pool.close(drain=False)
        self.loaded.set()

    def swap(self, spec: ModelSpec) -> None:
        """Serve ``spec`` in this slot with no request lost: ``Pool.reload`` when only the
        model changed, a new pool beside the old (drained, then closed) when its pool
        options did too. A failure leaves the old one serving and is raised."""
        if self.state == ModelState.LOADING:  # its first load (a thread) first
            self.loaded.wait()
        if self.pool is None or self.state != ModelState.LOADED:
            self.spec = spec
            self.load()
            if self.state != ModelState.LOADED:
                raise errors.ReloadFailed(self.error)
            return
        started = time.monotonic()
        same_pool = _pool_settings(spec) == _pool_settings(self.spec)
        try:
            load, predict, options = spec.pool_arguments()
            pool = None if same_pool else self.pool_factory(load, predict, **options)
        except Exception as exc:
            raise errors.ReloadFailed(f"reload failed, the old version still serving: "
                                      f"{type(exc).__name__}: {exc}") from exc
        if pool is None:
            self.pool.reload(load, predict=predict)  # raises ReloadFailed itself
        else:
            old, self.pool = self.pool, pool
            old.close(drain=True)
        self.spec = spec
        self.swaps += 1
        self._describe()
        log.info("model %s version %s now serves %s (swapped in %.1f s)", self.name,
                 self.version, self.pool.version, time.monotonic() - started)

    def unload(self, drain_timeout: float | None = None) -> None:
        """Take no more requests, finish those accepted, stop the workers, free the
        weights. The slot stays (UNLOADED) until loaded again."""
        self.become(ModelState.UNLOADING)
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close(drain=True, timeout=drain_timeout)
        self.become(ModelState.UNLOADED)
        log.info("model %s version %s unloaded", self.name, self.version)

    def close(self, timeout: float) -> None:
        """The server stops: drain and close within ``timeout`` seconds."""
        if self.pool is not None:
            self.pool.close(drain=True, timeout=timeout)
        self.become(ModelState.CLOSED)

    def _describe(self) -> None:
        try:
            warmup = self.spec.warmup_samples()
        except Exception as exc:  # noqa: BLE001 - metadata is best effort
            log.warning("model %s: cannot read its warm-up inputs: %s", self.name, exc)
            warmup = []
        self.signature = describe(self.pool, warmup)


def describe(pool, warmup: list) -> Signature:
    """A model's signature: as declared, else as the model itself says (a Keras model's
    inputs and outputs, a SavedModel's signature_def), else from its warm-up call: the
    warm-up input names and describes the inputs, one call on it the outputs."""
    known = pool_signature(pool)
    inputs, outputs = known.inputs, known.outputs
    sources = [known.source] if known.source != "none" else []
    if warmup and (inputs is None or outputs is None):
        try:
            inputs, outputs = _from_warmup(pool, warmup[0], inputs, outputs)
            sources.append("warm-up call")
        except Exception as exc:  # noqa: BLE001 - metadata is best effort
            log.warning("no metadata from the warm-up call: %s", exc)
    return Signature(inputs, outputs, " + ".join(sources) or "none", known.named)


def _from_warmup(pool, sample, inputs, outputs) -> tuple:
    named = sample if isinstance(sample, dict) else {
        inputs[0].name if inputs else "input_0": sample}
    if inputs is None:
        inputs = tuple(_inferred_spec(name, value) for name, value in named.items())
    if outputs is None:
        result = pool.submit(call_argument(named)).result(timeout=600)
        outputs = tuple(_inferred_spec(name, value) for name, value in
                        name_outputs(result).items())
    return inputs, outputs


def _pool_settings(spec: ModelSpec) -> tuple:
    """What a running pool was started with beyond its model: a change needs a new pool."""
    return (spec.pool_options, spec.inputs, spec.outputs, spec.warmup)


def _inferred_spec(name: str, value) -> TensorSpec:
    array = as_tensor(name, value)
    shape = list(array.shape)
    if shape:
        shape[0] = -1  # the batch axis
    return TensorSpec(name, datatype_of(array.dtype), tuple(shape))


class Registry:
    """Every model version the server knows, and the one lock its lifecycle changes take.

    ``allowed_sources``: model paths (files or directories) a load request may name, besides
    the sources configured; a request never names any other path.
    """

    def __init__(self, specs: list[ModelSpec], *, allowed_sources=(), defaults: dict | None = None,
                 drain_timeout: float = 30.0, max_models: int = DEFAULT_MAX_MODELS,
                 pool_factory: Callable[..., Any] = Pool):
        # Every model's zygote (and every version's) forks from one runtime process: one
        # import of each framework for the whole server, not one per model.
        self.runtime = Runtime() if pool_factory is Pool else None
        self.pool_factory = pool_factory if self.runtime is None else \
            functools.partial(Pool, runtime=self.runtime)
        self.versions: dict[str, dict[str, Model]] = {}
        for spec in specs:
            self.versions.setdefault(spec.name, {})[spec.version] = self._new_model(spec)
        self.allowed_sources = [os.path.realpath(p) for p in allowed_sources]
        self.defaults = defaults or {}  # pool options of a model loaded by name only
        self.drain_timeout = drain_timeout
        self.max_models = max_models  # loaded versions a repository load may bring it to
        self.closing = False
        self.lifecycle = threading.Lock()
        self.budget = None  # --max-memory's MemoryBudget, when the server has one
        self.http_workers = None  # --http-workers' HttpWorkers, when the server has them
        # run after every change of what is loaded (the front ends' inline models follow)
        self.changed: Callable[[], None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # see drive_on()

    def _new_model(self, spec: ModelSpec) -> Model:
        return Model(spec, self._new_pool)

    def _new_pool(self, *args, inline: bool | None = None, **kwargs):
        if inline:
            return InlinePool(*args, **kwargs)
        pool = self.pool_factory(*args, **kwargs)
        self._drive(pool)
        return pool

    def _drive(self, pool) -> None:
        # (the lifecycle tests' in-process pools have no dispatch to drive)
        if self.loop is not None and pool is not None and hasattr(pool, "drive_on"):
            pool.drive_on(self.loop)

    def drive_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every pool's dispatch runs on ``loop`` (the server's; Pool.drive_on), those
        loaded from now on too: a request goes from the protocol to the workers without
        a thread hop."""
        self.loop = loop
        for model in self.models:
            self._drive(model.pool)

    # -- reading ---------------------------------------------------------------------
    @property
    def models(self) -> list[Model]:
        """Every version of every model, by name then age."""
        return [model for versions in list(self.versions.values())
                for model in sorted(versions.values(), key=lambda m: m.added)]

    def names(self) -> list[str]:
        return list(self.versions)

    def get(self, name: str, version: str | None = None) -> Model:
        """That version; without one, the newest ready version (or the newest)."""
        versions = self.versions.get(name)
        if not versions:
            raise ModelNotFound(f"{unknown_model(name)}; this server has "
                                f"{sorted(self.versions)}")
        if version is not None:
            model = versions.get(version)
            if model is None:
                raise ModelNotFound(f"{unknown_model(name, version)}; it has versions "
                                    f"{self.version_labels(name)}")
            return model
        models = list(versions.values())  # (one C call: loads change it from threads)
        if len(models) == 1:  # the usual case, asked on every request
            return models[0]
        ordered = newest_first(models)
        return next((m for m in ordered if m.ready), ordered[0])

    def version_labels(self, name: str) -> list[str]:
        return [m.version for m in reversed(newest_first(list(self.versions[name].values())))]

    @property
    def ready(self) -> bool:
        """Every model that should be serving is: unloaded ones do not count."""
        return not self.closing and all(
            model.ready for model in self.models if model.state != ModelState.UNLOADED)

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index (KServe model repository extension)."""
        rows = [{"name": m.name, "version": m.version,
                 "state": "READY" if m.ready else _INDEX_STATE[m.state],
                 "reason": m.error if m.state == ModelState.FAILED else ""}
                for m in self.models]
        return [row for row in rows if row["state"] == "READY"] if ready_only else rows

    # -- changing ----------------------------------------------------------------------
    def start_loading(self) -> None:
        """Load every model in the background, as many at a time as there are cores (each
        load is a process importing a framework: a hundred at once would only thrash):
        the server is live meanwhile, and each model is ready as soon as it is loaded."""
        slots = threading.BoundedSemaphore(max(2, usable_cores()))

        def load(model: Model) -> None:
            with LOADS.running(), slots:  # waiting for a slot counts: one collection at the end
                if model.state == ModelState.LOADING:
                    model.load()
                else:  # unloaded or closed while it waited its turn
                    model.loaded.set()
            self._changed()

        for model in self.models:
            threading.Thread(target=load, args=(model,), daemon=True,
                             name=f"workerpool-load-{model.name}-{model.version}").start()

    def load(self, name: str, parameters: dict | None = None) -> Model:
        """Load a model version, or hot-swap it if it is loaded (blocking: call it in a
        thread). ``parameters``: ``version`` (a new label adds a version beside the
        others), ``source`` (a path on the allow-list), or ``config``: a JSON object with
        those keys (what tritonclient's ``load_model(config=...)`` sends) and Triton's
        model configuration fields that set the pool (serving/triton.py's
        pool_overrides: max_batch_size, instance_group count, dynamic_batching)."""
        try:
            return self._load(name, load_parameters(parameters))
        except (errors.ReloadFailed, BadRequest) as exc:
            # the words Triton's clients look for, then ours
            raise type(exc)(f"failed to load {name!r}: {exc}") from exc
        finally:
            self._changed()

    def _load(self, name: str, parameters: dict) -> Model:
        with self.lifecycle:
            self._check_open()
            versions = self.versions.get(name, {})
            version = parameters.get("version")
            model = versions.get(version) if version is not None else (
                newest(versions) if versions else None)
            overrides = parameters.get("pool_options") or {}
            if model is None:
                spec = with_pool_options(self._new_spec(name, versions, version,
                                                        parameters.get("source")), overrides)
                self._check_room(f"{name}@{spec.version}")
                model = self._new_model(spec)
                model.load()
                if model.state != ModelState.LOADED:
                    raise errors.ReloadFailed(f"model {name} version {spec.version} failed "
                                              f"to load: {model.error}")
                self.versions.setdefault(name, {})[spec.version] = model
                return model
            if model.state not in HOLDS_A_POOL:  # a pool comes back
                self._check_room(f"{name}@{model.version}")
            spec = model.spec
            if "source" in parameters:
                spec = dataclasses.replace(spec, source=self.allowed(parameters["source"]))
            model.swap(with_pool_options(spec, overrides))  # new settings: a new pool
            return model

    def unload(self, name: str, parameters: dict | None = None) -> list[Model]:
        """Drain and free every version of ``name`` (or the one ``version`` names)."""
        parameters = load_parameters(parameters, unload=True)
        with self.lifecycle:
            versions = self.versions.get(name)
            if not versions:
                raise ModelNotFound(unknown_model(name))
            targets = [self.get(name, parameters["version"])] if "version" in parameters \
                else list(versions.values())
            for model in targets:
                model.unload(self.drain_timeout)
        self._changed()
        return targets

    def apply(self, specs: list[ModelSpec]) -> dict:
        """Make the served models those of ``specs`` (a re-read --config): new versions
        load, removed ones are drained and dropped, changed ones are hot-swapped. Returns
        what was done, by name@version."""
        done: dict[str, str] = {}
        wanted = {(spec.name, spec.version): spec for spec in specs}
        with self.lifecycle:
            self._check_open()
            for model in self.models:
                if (model.name, model.version) not in wanted:
                    model.unload(self.drain_timeout)
                    del self.versions[model.name][model.version]
                    if not self.versions[model.name]:
                        del self.versions[model.name]
                    done[f"{model.name}@{model.version}"] = "removed"
            for spec in wanted.values():
                model = self.versions.get(spec.name, {}).get(spec.version)
                label = f"{spec.name}@{spec.version}"
                try:
                    if model is None:
                        model = self._new_model(spec)
                        self.versions.setdefault(spec.name, {})[spec.version] = model
                        model.load()
                        done[label] = "loaded" if model.state == ModelState.LOADED else \
                            f"failed: {model.error}"
                    elif spec != model.spec or model.state in (ModelState.FAILED,
                                                                ModelState.UNLOADED):
                        model.swap(spec)
                        done[label] = "swapped"
                except Exception as exc:  # noqa: BLE001 - one model's failure is reported
                    done[label] = f"failed: {exc}"
        self._changed()
        return done

    def swap_if(self, model: Model, spec: ModelSpec) -> None:
        """Hot-swap ``model`` to ``spec`` unless it was removed meanwhile (the watcher)."""
        with self.lifecycle:
            self._check_open()
            if self.versions.get(model.name, {}).get(model.version) is model:
                model.swap(spec)
        self._changed()

    def _changed(self) -> None:
        if self.changed is not None and not self.closing:
            try:
                self.changed()
            except Exception as exc:  # noqa: BLE001 - the change itself is done
                log.warning("after a model change: %s", exc)

    def close(self, timeout: float) -> None:
        """Close every pool, draining accepted work, all within ``timeout`` seconds; a model
        still loading gets until then to finish, and is closed as soon as it does."""
        self.closing = True
        deadline = time.monotonic() + timeout
        for model in self.models:
            model.loaded.wait(max(0.0, deadline - time.monotonic()))
            model.close(max(0.0, deadline - time.monotonic()))
        if self.runtime is not None:
            self.runtime.close(max(1.0, deadline - time.monotonic()))

    def _check_room(self, label: str) -> None:
        """TooManyModels unless one more version may load: each is a pool (a zygote and its
        workers), so a client of the repository API must not add them without end."""
        loaded = [f"{m.name}@{m.version}" for m in self.models if m.state in HOLDS_A_POOL]
        if len(loaded) >= self.max_models:
            raise TooManyModels(f"cannot load {label}: {len(loaded)} model versions are "
                                f"loaded, this server's most (--max-models "
                                f"{self.max_models}); unload one first")

    def _check_open(self) -> None:
        if self.closing:
            raise NotReady("the server is shutting down")

    def allowed(self, source) -> str:
        """``source`` if it is a path on the allow-list (or under an allowed directory)."""
        if not isinstance(source, str) or not source or is_function_spec(source):
            raise BadRequest(f"parameters.source must be a model path on this server's "
                             f"allow-list, got {source!r}")
        path = os.path.realpath(source)
        configured = [os.path.realpath(m.spec.source) for m in self.models
                      if isinstance(m.spec.source, str) and not is_function_spec(m.spec.source)]
        for allowed in self.allowed_sources + configured:
            if path == allowed or path.startswith(allowed.rstrip(os.sep) + os.sep):
                return path
        raise BadRequest(f"source {source!r} is not on this server's allow-list "
                         "(--allow-source, or [server] allow_sources)")

    def _new_spec(self, name: str, versions: dict, version: str | None,
                  source) -> ModelSpec:
        if versions:  # a new version of a known model: its newest version's settings
            template = newest(versions).spec
            label = version if version is not None else next_version(versions)
            return dataclasses.replace(template, version=label,
                                       source=self.allowed(source) if source else
                                       template.source)
        if source is None:
            raise ModelNotFound(f"{unknown_model(name)}; to load a new one, give "
                                "parameters.source (a path on the allow-list)")
        try:
            name = check_name(name)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        return ModelSpec(name, self.allowed(source),
                         version=version or DEFAULT_VERSION, pool_options=dict(self.defaults))


# The index state of a model version that is not ready (Model.ready), by Model.state:
# LOADED there means its pool has no live worker right now (broken, say).
_INDEX_STATE = {ModelState.LOADING: "LOADING", ModelState.LOADED: "UNAVAILABLE",
                ModelState.FAILED: "UNAVAILABLE", ModelState.UNLOADING: "UNLOADING",
                ModelState.UNLOADED: "UNAVAILABLE", ModelState.CLOSED: "UNAVAILABLE"}


def newest(versions: dict[str, Model]) -> Model:
    return newest_first(list(versions.values()))[0]


def newest_first(models: list[Model]) -> list[Model]:
    """The highest number first when every label is a number, else the latest added."""
    if all(m.version.isdigit() for m in models):
        return sorted(models, key=lambda m: int(m.version), reverse=True)
    return sorted(models, key=lambda m: m.added, reverse=True)


def next_version(versions: dict) -> str:
    numbers = [int(v) for v in versions if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def with_pool_options(spec: ModelSpec, overrides: dict) -> ModelSpec:
    """``spec`` with the pool options a load's Triton config sets (``overrides``)."""
    if not overrides:
        return spec
    return dataclasses.replace(spec, pool_options={**spec.pool_options, **overrides})


def load_parameters(parameters, unload: bool = False) -> dict:
    """The ``parameters`` of a repository load/unload request, checked."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be a JSON object")
    parameters = dict(parameters)
    config = parameters.pop("config", None)
    if config is not None:
        try:
            extra = json.loads(config) if isinstance(config, str) else config
        except ValueError as exc:
            raise BadRequest(f"parameters.config is not JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise BadRequest("parameters.config must be a JSON object")
        extra = dict(extra)
        for key in ("version", "source"):  # ours, in the config object
            if key in extra:
                parameters[key] = extra.pop(key)
        overrides = {} if unload else triton.pool_overrides(extra)  # Triton's config
        if overrides:
            parameters["pool_options"] = overrides
    parameters.pop("unload_dependents", None)  # tritonclient sends it; nothing depends here
    uploads = [key for key in parameters if key.startswith("file:")]
    if uploads:
        raise BadRequest("this server does not take model files in requests; it loads "
                         "only sources on its allow-list")
    known = {"version"} if unload else {"version", "source", "pool_options"}
    unknown = set(parameters) - known
    if unknown:
        raise BadRequest(f"unknown parameters {sorted(unknown)}; known: {sorted(known)}")
    if "version" in parameters:
        version = parameters["version"]
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        try:
            parameters["version"] = check_version(version)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
    return parameters
