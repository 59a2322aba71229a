"""A served model version as the data plane sees it: its pool, its signature, its state.

    LOADING ──> LOADED ──> UNLOADING ──> UNLOADED ──> LOADING (loaded again)
       │          (hot swaps keep LOADED)
       └──> FAILED ──> LOADING (a new try)          any state ──> CLOSED (the server stops)

``state`` says where its lifecycle is; ``ready`` says whether it can answer now (LOADED and
its pool has a live, attached, warmed-up worker). Only TRANSITIONS are allowed (``become``).
The server's registry (serve/registry.py) adds loading, swapping and unloading; the Ray Serve
deployment wraps the pool it already holds (``ServedModel.of_pool``).
"""

from __future__ import annotations

import enum
import itertools
import time

from ..signature import Signature
from .errors import ModelNotFound, NotReady, NoWorkerNow, unknown_model
from .triton import InferenceStatistics

_added = itertools.count()  # the order versions were added, for "newest"


class ModelState(str, enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"  # has a pool; ready while the pool has a ready worker
    FAILED = "failed"  # its load raised or its workers never started
    UNLOADING = "unloading"  # draining, then freeing
    UNLOADED = "unloaded"  # the slot stays: it can be loaded again
    CLOSED = "closed"  # the server is stopping

    def __str__(self) -> str:
        return self.value


TRANSITIONS = {
    ModelState.LOADING: {ModelState.LOADED, ModelState.FAILED, ModelState.UNLOADING,
                         ModelState.CLOSED},
    ModelState.LOADED: {ModelState.UNLOADING, ModelState.CLOSED},
    ModelState.FAILED: {ModelState.LOADING, ModelState.UNLOADING, ModelState.CLOSED},
    ModelState.UNLOADING: {ModelState.UNLOADED, ModelState.CLOSED},
    ModelState.UNLOADED: {ModelState.LOADING, ModelState.UNLOADING, ModelState.CLOSED},
    ModelState.CLOSED: set(),
}
# States in which a version holds (or is about to hold) a pool: what --max-models counts.
HOLDS_A_POOL = {ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING}


class ServedModel:
    """One version of a served model."""

    def __init__(self, name: str, version: str):
        self.name = name
        self.version = version
        self.added = next(_added)
        self.last_used = time.monotonic()  # its latest request (or since it was added)
        self.pool = None
        self.state = ModelState.LOADING
        self.error = ""
        self.signature = Signature()
        self.statistics = InferenceStatistics()  # Triton's statistics extension

    @classmethod
    def of_pool(cls, name: str, pool, version: str | None = None) -> "ServedModel":
        """A model around a pool that is already running (its declared signature)."""
        model = cls(name, version or pool.version)
        model.pool = pool
        model.signature = pool_signature(pool)
        model.become(ModelState.LOADED)
        return model

    def become(self, state: ModelState) -> None:
        """Move to ``state``; the same state is no move, one not in TRANSITIONS is a bug."""
        if state != self.state:
            if state not in TRANSITIONS[self.state]:
                raise RuntimeError(f"model {self.name} version {self.version}: no transition "
                                   f"from {self.state} to {state}")
            self.state = state

    @property
    def ready(self) -> bool:
        pool = self.pool
        return self.state == ModelState.LOADED and pool is not None and pool.is_ready()

    @property
    def weights_version(self) -> str | None:
        """What the pool serves now: a content hash of its weights (or a label)."""
        pool = self.pool
        return pool.version if pool is not None else None

    def not_ready(self) -> NotReady:
        """Why this model cannot answer now, as the error its caller gets."""
        name = self.name
        if self.state == ModelState.LOADING:
            return NotReady(f"model {name} is loading")
        if self.state == ModelState.FAILED:
            return NotReady(f"model {name} failed to load: {self.error.splitlines()[0]}")
        if self.state in (ModelState.CLOSED, ModelState.UNLOADING):
            return NotReady(f"model {name} is shutting down")
        if self.state == ModelState.UNLOADED:
            return NotReady(f"model {name} version {self.version} is unloaded; load it with "
                            f"POST /v2/repository/models/{name}/load")
        broken = self.pool.broken if self.pool is not None else None
        if broken is not None:
            return NotReady(f"model {name} is broken: {str(broken).splitlines()[0]}")
        return NoWorkerNow(f"model {name} has no ready worker right now; its workers are "
                           "being replaced")


def pool_signature(pool) -> Signature:
    """What a pool's model takes and returns: as declared (``inputs``/``outputs``), the rest
    as the model itself says (a Keras model's inputs and outputs, a SavedModel's
    signature_def: ``Pool.signature``)."""
    inputs, outputs = pool.inputs, pool.outputs
    sources = ["declared"] if inputs or outputs else []
    own = pool.signature
    if (inputs is None or outputs is None) and own.source != "none":
        inputs = inputs if inputs is not None else own.inputs
        outputs = outputs if outputs is not None else own.outputs
        sources.append(own.source)
    return Signature(inputs, outputs, " + ".join(sources) or "none", own.named)


class SingleModel:
    """The models a data plane serves, when there is one (the Ray Serve deployment)."""

    def __init__(self, model: ServedModel):
        self.model = model
        self.versions = {model.name: {model.version: model}}

    def get(self, name: str, version: str | None = None) -> ServedModel:
        if name != self.model.name or version not in (None, self.model.version):
            raise ModelNotFound(f"{unknown_model(name, version)}; this "
                                f"deployment serves {self.model.name!r}")
        return self.model

    def version_labels(self, name: str) -> list[str]:
        return [self.get(name).version]

    @property
    def models(self) -> list[ServedModel]:
        return [self.model]

    @property
    def ready(self) -> bool:
        return self.model.ready
