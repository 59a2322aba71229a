"""The models a server holds: name -> version -> Pool; loading, swapping, unloading, infer.

    start_loading() ── one thread per model version ──> Pool(load, predict, warmup=...)
    every protocol ── await registry.infer(model, version, inputs) ──> pool.submit_async
                                                                  <── {name: array}
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
not while it loads, nor when its pool is broken, unloading or closing. Its metadata comes
from the declaration (``inputs``/``outputs``), else from the warm-up call: the warm-up input
names and describes the inputs, one call on it describes the outputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import threading
import time

import numpy as np

from .. import errors, tensors
from ..pool.pool import Pool
from ..signature import TensorSpec, datatype_of
from ..errors import ConfigError
from ..specs import is_function_spec
from ..tensors import as_tensor, call_argument, name_outputs
from .config import ModelSpec, check_name, check_version
from .errors import BadRequest, ModelNotFound, NotReady, NoWorkerNow, TooManyModels
from .limits import DEFAULT_MAX_MODELS

log = logging.getLogger("workerpool.serve")

DEFAULT_VERSION = "1"
_added = itertools.count()  # the order versions were added, for "newest"


class Model:
    """One version of a served model: its spec, its pool once loaded, what it takes and
    returns. ``state``: loading -> ready | failed; unloading -> unavailable; closed."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        self.added = next(_added)
        self.pool: Pool | None = None
        self.state = "loading"
        self.error = ""
        self.inputs: tuple[TensorSpec, ...] | None = None
        self.outputs: tuple[TensorSpec, ...] | None = None
        self.metadata_source = "none"
        self.loaded = threading.Event()
        self.load_seconds: float | None = None
        self.swaps = 0

    def load(self) -> None:
        """Start this version's pool (in the calling thread); failures are recorded."""
        self.state, self.error = "loading", ""
        self.loaded.clear()
        started = time.monotonic()
        try:
            load, predict, options = self.spec.pool_arguments()
            pool = Pool(load, predict, **options)
        except BaseException as exc:  # noqa: BLE001 - reported on the model, server goes on
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model %s version %s failed to load: %s", self.name, self.version,
                      self.error)
            self.loaded.set()
            return
        self.pool = pool
        self._describe()
        self.load_seconds = time.monotonic() - started
        if self.state == "loading":
            self.state = "ready"
        else:  # closed while it loaded
            pool.close(drain=False)
        log.info("model %s version %s ready in %.1f s", self.name, self.version,
                 self.load_seconds)
        self.loaded.set()

    def swap(self, spec: ModelSpec) -> None:
        """Serve ``spec`` in this slot with no request lost: ``Pool.reload`` when only the
        model changed, a new pool beside the old (drained, then closed) when its pool
        options did too. A failure leaves the old one serving and is raised."""
        if self.state == "loading":  # its first load (a thread of start_loading) first
            self.loaded.wait()
        if self.pool is None or self.state != "ready":
            self.spec = spec
            self.load()
            if self.state != "ready":
                raise errors.ReloadFailed(self.error)
            return
        started = time.monotonic()
        same_pool = _pool_settings(spec) == _pool_settings(self.spec)
        try:
            load, predict, options = spec.pool_arguments()
            pool = None if same_pool else Pool(load, predict, **options)
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
        weights. The slot stays (state "unavailable") until loaded again."""
        self.state = "unloading"
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close(drain=True, timeout=drain_timeout)
        self.state = "unavailable"
        log.info("model %s version %s unloaded", self.name, self.version)

    def _describe(self) -> None:
        try:
            self.describe(self.spec.warmup_samples())
        except Exception as exc:  # noqa: BLE001 - metadata is best effort
            log.warning("model %s: no metadata from its warm-up call: %s", self.name, exc)

    def describe(self, warmup: list) -> None:
        """Inputs and outputs: as declared, the rest from the warm-up call."""
        self.inputs, self.outputs = self.pool.inputs, self.pool.outputs
        sources = ["declared"] if self.inputs or self.outputs else []
        if warmup and (self.inputs is None or self.outputs is None):
            self._describe_from(warmup[0])
            sources.append("warm-up call")
        self.metadata_source = " + ".join(sources) or "none"

    def _describe_from(self, sample) -> None:
        named = sample if isinstance(sample, dict) else {
            self.inputs[0].name if self.inputs else "input_0": sample}
        if self.inputs is None:
            self.inputs = tuple(_inferred_spec(name, value) for name, value in named.items())
        if self.outputs is None:
            result = self.pool.submit(call_argument(named)).result(timeout=600)
            self.outputs = tuple(_inferred_spec(name, value) for name, value in
                                 name_outputs(result, None).items())

    @property
    def ready(self) -> bool:
        pool = self.pool
        return self.state == "ready" and pool is not None and pool.is_ready()

    @property
    def weights_version(self) -> str | None:
        """What the pool serves now: a content hash of its weights (or a label)."""
        pool = self.pool
        return pool.version if pool is not None else None

    def metadata(self, versions: list[str]) -> dict:
        return {
            "name": self.name, "versions": versions, "platform": "workerpool",
            "inputs": [s.as_dict() for s in self.inputs or ()],
            "outputs": [s.as_dict() for s in self.outputs or ()],
        }

    def call_argument(self, inputs: dict):
        """What predict gets: the one array, or a dict of them by name; checked against
        the model's inputs when it has them."""
        if self.inputs:
            expected = [s.name for s in self.inputs]
            if sorted(inputs) != sorted(expected):
                raise BadRequest(f"model {self.name} takes inputs {expected}, got "
                                 f"{sorted(inputs)}")
            for spec in self.inputs:
                value = inputs[spec.name]
                problem = spec.mismatch(value) if isinstance(value, np.ndarray) else (
                    None if spec.datatype == "BYTES" else
                    f"input {spec.name!r} must be {spec.datatype}, got BYTES")
                if problem:
                    raise BadRequest(f"model {self.name}: {problem}")
            inputs = {spec.name: inputs[spec.name] for spec in self.inputs}
        return call_argument(inputs)

    def output_names(self) -> list[str] | None:
        return [s.name for s in self.outputs] if self.outputs else None


def _pool_settings(spec: ModelSpec) -> tuple:
    """What a running pool was started with beyond its model: a change needs a new pool."""
    return (spec.pool_options, spec.inputs, spec.outputs, spec.warmup)


def _inferred_spec(name: str, value) -> TensorSpec:
    array = as_tensor(name, value)
    shape = list(array.shape)
    if shape:
        shape[0] = -1  # the batch axis
    return TensorSpec(name, datatype_of(array.dtype), tuple(shape))


def select_outputs(model: str, outputs: dict, wanted: list[str]) -> dict:
    """The outputs a request asked for, in its order (all when it named none); an unknown
    name is a BadRequest listing the model's outputs."""
    try:
        return tensors.select_outputs(outputs, wanted, f"model {model}")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


class Registry:
    """Every model version the server knows, and the one lock its lifecycle changes take.

    ``allowed_sources``: model paths (files or directories) a load request may name, besides
    the sources configured; a request never names any other path.
    """

    def __init__(self, specs: list[ModelSpec], *, allowed_sources=(), defaults: dict | None = None,
                 drain_timeout: float = 30.0, max_models: int = DEFAULT_MAX_MODELS):
        self.versions: dict[str, dict[str, Model]] = {}
        for spec in specs:
            self.versions.setdefault(spec.name, {})[spec.version] = Model(spec)
        self.allowed_sources = [os.path.realpath(p) for p in allowed_sources]
        self.defaults = defaults or {}  # pool options of a model loaded by name only
        self.drain_timeout = drain_timeout
        self.max_models = max_models  # loaded versions a repository load may bring it to
        self.closing = False
        self.lifecycle = threading.Lock()

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
            raise ModelNotFound(f"no model named {name!r}; this server has "
                                f"{sorted(self.versions)}")
        if version is not None:
            model = versions.get(version)
            if model is None:
                raise ModelNotFound(f"model {name!r} has no version {version!r}; it has "
                                    f"{self.version_labels(name)}")
            return model
        ordered = newest_first(list(versions.values()))
        return next((m for m in ordered if m.ready), ordered[0])

    def version_labels(self, name: str) -> list[str]:
        return [m.version for m in reversed(newest_first(list(self.versions[name].values())))]

    @property
    def ready(self) -> bool:
        """Every model that should be serving is: unloaded ones do not count."""
        return not self.closing and all(
            model.ready for model in self.models if model.state != "unavailable")

    def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index (KServe model repository extension)."""
        rows = [{"name": m.name, "version": m.version,
                 "state": "READY" if m.ready else _INDEX_STATE[m.state],
                 "reason": m.error if m.state == "failed" else ""} for m in self.models]
        return [row for row in rows if row["state"] == "READY"] if ready_only else rows

    async def infer(self, name: str, version: str | None, inputs: dict,
                    timeout: float | None = None) -> tuple[Model, dict[str, np.ndarray]]:
        """predict on ``inputs`` (by name) in that version's pool: (the model, its outputs
        by name). ``timeout``: the caller's deadline in seconds (a gRPC client's), which
        shortens the model's own ``timeout``, never lengthens it."""
        model = self.get(name, version)
        if not model.ready:
            raise not_ready(model)
        argument = model.call_argument(inputs)
        pool = model.pool
        while True:
            if pool is None:  # unloaded since the check
                raise not_ready(model)
            limit = timeout
            if limit is not None and pool.config.timeout is not None:
                limit = min(limit, pool.config.timeout)
            if limit is not None and limit <= 0:
                raise errors.TaskTimeout("the caller's deadline had passed when the request "
                                         "arrived")
            try:
                result = await pool.submit_async(argument, timeout=limit)
                break
            except errors.PoolClosed as exc:
                if model.pool is None or model.pool is pool:  # not a swap of pools: closing
                    raise NotReady(f"model {name} is shutting down") from exc
                pool = model.pool  # replaced by a new pool between reading and submitting
        return model, name_outputs(result, model.output_names())

    # -- changing ----------------------------------------------------------------------
    def start_loading(self) -> None:
        """Load every model in the background, all at once: the server is live meanwhile."""
        for model in self.models:
            threading.Thread(target=model.load, daemon=True,
                             name=f"workerpool-load-{model.name}-{model.version}").start()

    def load(self, name: str, parameters: dict | None = None) -> Model:
        """Load a model version, or hot-swap it if it is loaded (blocking: call it in a
        thread). ``parameters``: ``version`` (a new label adds a version beside the
        others), ``source`` (a path on the allow-list), or ``config``: a JSON object with
        those keys (what tritonclient's ``load_model(config=...)`` sends)."""
        parameters = load_parameters(parameters)
        with self.lifecycle:
            self._check_open()
            versions = self.versions.get(name, {})
            version = parameters.get("version")
            model = versions.get(version) if version is not None else (
                newest(versions) if versions else None)
            if model is None:
                spec = self._new_spec(name, versions, version, parameters.get("source"))
                self._check_room(f"{name}@{spec.version}")
                model = Model(spec)
                model.load()
                if model.state != "ready":
                    raise errors.ReloadFailed(f"model {name} version {spec.version} failed "
                                              f"to load: {model.error}")
                self.versions.setdefault(name, {})[spec.version] = model
                return model
            if model.state not in ("loading", "ready", "unloading"):  # a pool comes back
                self._check_room(f"{name}@{model.version}")
            spec = model.spec
            if "source" in parameters:
                spec = dataclasses.replace(spec, source=self.allowed(parameters["source"]))
            model.swap(spec)
            return model

    def unload(self, name: str, parameters: dict | None = None) -> list[Model]:
        """Drain and free every version of ``name`` (or the one ``version`` names)."""
        parameters = load_parameters(parameters, unload=True)
        with self.lifecycle:
            versions = self.versions.get(name)
            if not versions:
                raise ModelNotFound(f"no model named {name!r}")
            targets = [self.get(name, parameters["version"])] if "version" in parameters \
                else list(versions.values())
            for model in targets:
                model.unload(self.drain_timeout)
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
                        model = Model(spec)
                        self.versions.setdefault(spec.name, {})[spec.version] = model
                        model.load()
                        done[label] = "loaded" if model.state == "ready" else \
                            f"failed: {model.error}"
                    elif spec != model.spec or model.state in ("failed", "unavailable"):
                        model.swap(spec)
                        done[label] = "swapped"
                except Exception as exc:  # noqa: BLE001 - one model's failure is reported
                    done[label] = f"failed: {exc}"
        return done

    def swap_if(self, model: Model, spec: ModelSpec) -> None:
        """Hot-swap ``model`` to ``spec`` unless it was removed meanwhile (the watcher)."""
        with self.lifecycle:
            self._check_open()
            if self.versions.get(model.name, {}).get(model.version) is model:
                model.swap(spec)

    def close(self, timeout: float) -> None:
        """Close every pool, draining accepted work, all within ``timeout`` seconds; a model
        still loading gets until then to finish, and is closed as soon as it does."""
        self.closing = True
        deadline = time.monotonic() + timeout
        for model in self.models:
            model.loaded.wait(max(0.0, deadline - time.monotonic()))
            if model.pool is not None:
                model.pool.close(drain=True, timeout=max(0.0, deadline - time.monotonic()))
            model.state = "closed"

    def _check_room(self, label: str) -> None:
        """TooManyModels unless one more version may load: each is a pool (a zygote and its
        workers), so a client of the repository API must not add them without end."""
        loaded = [f"{m.name}@{m.version}" for m in self.models
                  if m.state in ("loading", "ready", "unloading")]
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
            raise ModelNotFound(f"no model named {name!r}; to load a new one, give "
                                "parameters.source (a path on the allow-list)")
        try:
            name = check_name(name)
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        return ModelSpec(name, self.allowed(source),
                         version=version or DEFAULT_VERSION, pool_options=dict(self.defaults))


# The index state of a model version that is not ready (Model.ready), by Model.state:
# "ready" there means its pool has no live worker right now (broken, say).
_INDEX_STATE = {"loading": "LOADING", "ready": "UNAVAILABLE", "failed": "UNAVAILABLE",
                "unloading": "UNLOADING", "unavailable": "UNAVAILABLE", "closed": "UNAVAILABLE"}


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
        parameters.update(extra)
    parameters.pop("unload_dependents", None)  # tritonclient sends it; nothing depends here
    uploads = [key for key in parameters if key.startswith("file:")]
    if uploads:
        raise BadRequest("this server does not take model files in requests; it loads "
                         "only sources on its allow-list")
    known = {"version"} if unload else {"version", "source"}
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


def not_ready(model: Model) -> NotReady:
    """Why ``model`` cannot answer now, as the error its caller gets."""
    if model.state == "loading":
        return NotReady(f"model {model.name} is loading")
    if model.state == "failed":
        return NotReady(f"model {model.name} failed to load: {model.error.splitlines()[0]}")
    if model.state in ("closed", "unloading"):
        return NotReady(f"model {model.name} is shutting down")
    if model.state == "unavailable":
        return NotReady(f"model {model.name} version {model.version} is unloaded; load it "
                        f"with POST /v2/repository/models/{model.name}/load")
    broken = model.pool.broken if model.pool else None
    if broken is not None:
        return NotReady(f"model {model.name} is broken: {str(broken).splitlines()[0]}")
    return NoWorkerNow(f"model {model.name} has no ready worker right now; its workers are "
                       "being replaced")
