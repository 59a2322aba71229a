"""The models a server holds: name -> version -> Pool; loading, readiness, the one infer call.

    start_loading() ── one thread per model ──> Pool(load, predict, warmup=...)   (concurrent)
    every protocol ── await registry.infer(model, version, inputs, outputs) ──> pool.submit_async
                                                                          <── {name: array}
    close() ── every pool: close(drain)

A model is ready while its pool has live, attached, warmed-up workers (``Pool.is_ready``):
not while it loads, nor when its pool is broken or closing. Its metadata comes from the
declaration (``inputs``/``outputs``), else from the warm-up call: the warm-up input names
and describes the inputs, one call on it describes the outputs.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from .. import errors
from ..pool.pool import Pool
from ..signature import TensorSpec, datatype_of
from .config import ModelSpec, call_argument
from .errors import BadRequest, ModelNotFound, NotReady
from .v2_http import as_tensor

log = logging.getLogger("workerpool.serve")

VERSION = "1"  # one version per model until versions can be swapped live


class Model:
    """One served model: its spec, its pool once loaded, and what it takes and returns."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.name
        self.version = VERSION
        self.pool: Pool | None = None
        self.state = "loading"  # -> ready | failed | closed
        self.error = ""
        self.inputs: tuple[TensorSpec, ...] | None = None
        self.outputs: tuple[TensorSpec, ...] | None = None
        self.metadata_source = "none"
        self.loaded = threading.Event()
        self.load_seconds: float | None = None

    def load(self) -> None:
        started = time.monotonic()
        try:
            load, predict, options = self.spec.pool_arguments()
            pool = Pool(load, predict, **options)
        except BaseException as exc:  # noqa: BLE001 - reported on the model, server goes on
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.name, self.error)
            self.loaded.set()
            return
        self.pool = pool
        try:
            self.describe(self.spec.warmup_samples())
        except Exception as exc:  # noqa: BLE001 - metadata is best effort
            log.warning("model %s: no metadata from its warm-up call: %s", self.name, exc)
        self.load_seconds = time.monotonic() - started
        if self.state == "loading":
            self.state = "ready"
        else:  # closed while it loaded
            pool.close(drain=False)
        log.info("model %s ready in %.1f s", self.name, self.load_seconds)
        self.loaded.set()

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
        return self.state == "ready" and self.pool.is_ready()

    def metadata(self) -> dict:
        return {
            "name": self.name, "versions": [self.version], "platform": "workerpool",
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


def _inferred_spec(name: str, value) -> TensorSpec:
    array = as_tensor(name, value)
    shape = list(array.shape)
    if shape:
        shape[0] = -1  # the batch axis
    return TensorSpec(name, datatype_of(array.dtype), tuple(shape))


def name_outputs(result, names: list[str] | None) -> dict[str, np.ndarray]:
    """predict's result as named tensors: a dict by its keys; a tuple/list of arrays as
    output_0..k (or the declared names); anything else as one output."""
    if isinstance(result, dict):
        return {str(key): as_tensor(str(key), value) for key, value in result.items()}
    if type(result) in (tuple, list) and result and all(
            hasattr(v, "shape") for v in result):
        values = list(result)
    else:
        values = [result]
    if names is None or len(names) != len(values):
        names = [f"output_{i}" for i in range(len(values))]
    return {name: as_tensor(name, value) for name, value in zip(names, values)}


class Registry:
    def __init__(self, specs: list[ModelSpec]):
        self.models: dict[str, Model] = {spec.name: Model(spec) for spec in specs}
        self.closing = False

    def start_loading(self) -> None:
        """Load every model in the background, all at once: the server is live meanwhile."""
        for model in self.models.values():
            threading.Thread(target=model.load, name=f"workerpool-load-{model.name}",
                             daemon=True).start()

    def get(self, name: str, version: str | None = None) -> Model:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"no model named {name!r}; this server has "
                                f"{sorted(self.models)}")
        if version is not None and version != model.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; it has "
                                f"{[model.version]}")
        return model

    @property
    def ready(self) -> bool:
        return not self.closing and all(model.ready for model in self.models.values())

    async def infer(self, name: str, version: str | None, inputs: dict,
                    timeout: float | None = None) -> tuple[Model, dict[str, np.ndarray]]:
        model = self.get(name, version)
        if not model.ready:
            raise NotReady(_not_ready_reason(model))
        argument = model.call_argument(inputs)
        try:
            result = await model.pool.submit_async(argument, timeout=timeout)
        except errors.PoolClosed as exc:
            raise NotReady(f"model {name} is shutting down") from exc
        return model, name_outputs(result, model.output_names())

    def close(self, timeout: float) -> None:
        """Close every pool, draining accepted work, all within ``timeout`` seconds; a model
        still loading gets until then to finish, and is closed as soon as it does."""
        self.closing = True
        deadline = time.monotonic() + timeout
        for model in self.models.values():
            model.loaded.wait(max(0.0, deadline - time.monotonic()))
            if model.pool is not None:
                model.pool.close(drain=True, timeout=max(0.0, deadline - time.monotonic()))
            model.state = "closed"


def _not_ready_reason(model: Model) -> str:
    if model.state == "loading":
        return f"model {model.name} is loading"
    if model.state == "failed":
        return f"model {model.name} failed to load: {model.error.splitlines()[0]}"
    if model.state == "closed":
        return f"model {model.name} is shutting down"
    broken = model.pool.broken if model.pool else None
    if broken is not None:
        return f"model {model.name} is broken: {str(broken).splitlines()[0]}"
    return f"model {model.name} has no ready worker right now"
