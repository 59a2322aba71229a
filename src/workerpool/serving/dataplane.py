"""The data plane: the one inference path and model description every protocol calls.

    protocol (KServe v2 HTTP/gRPC, TF Serving REST/gRPC, the Ray Serve deployment):
        with plane.inference(model, version, protocol) as call:   # counted; 404 before decoding
            inputs = decode(request)                                # the protocol's own
            outputs = await call.run(inputs, requested, timeout)   # the plane
            answer = encode(call.model, outputs)                    # the protocol's own

    call.stream: the same checks, then pool.stream_async: the outputs of each item yielded,
              named as run names them (the generate routes, gRPC ModelStreamInfer)
    call.run: the signature asked for (the default one, or a SavedModel's other by name:
              400 for none such) -> ready? (503 with why) -> inputs against that
              signature (400 naming what the model expects) -> pool.submit_async with the deadline (the caller's, never
              past the model's own) -> outputs named (a dict's keys, output_0..k or the
              signature's names) -> the requested ones, in the request's order (400 for an
              unknown one)

Errors are the types of serving/errors.py; each protocol renders them through its one table
(HTTP status, gRPC code, metrics outcome). Health and metadata come from here too, so every
protocol describes a model the same way (``model_metadata`` is KServe v2's form; TF Serving's
is rendered from the same Signature). Nothing here knows a wire format, nor a server.
"""

from __future__ import annotations

import time

import numpy as np

from .. import __version__, errors, request_ids, tensors
from ..signature import Signature
from ..ipc.regions import PlacedCall, PlacedOutput
from ..tensors import call_argument, name_outputs
from . import triton
from .errors import BadRequest, NotReady
from .limits import DEFAULT_MAX_REQUEST_BYTES
from .model import ServedModel
from .shared_memory import SharedInput, SharedUse, SystemSharedMemory

EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics", "model_configuration",
              "generate", "system_shared_memory"]


class DataPlane:
    """``models``: what is served (the server's Registry, or serving.model.SingleModel):
    ``get(name, version)``, ``version_labels(name)``, ``ready``. ``metrics``: counts each
    inference as it ends (``finished(model, protocol, error, seconds)``: ``error`` None
    for a success), or None."""

    def __init__(self, models, metrics=None, *,
                 max_tensor_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.models = models
        self.metrics = metrics
        self.max_tensor_bytes = max_tensor_bytes  # what one tensor may decode to
        self.shared_memory = SystemSharedMemory()  # the regions clients registered

    # -- health and description ------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.models.ready

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """That version; without one, the newest ready version. ModelNotFound if none."""
        return self.models.get(name, version)

    def versions(self, name: str) -> list[ServedModel]:
        """Every version of ``name``, oldest label first."""
        return [self.models.get(name, label) for label in self.models.version_labels(name)]

    def server_metadata(self) -> dict:
        return {"name": "workerpool", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        """KServe v2 model metadata: every protocol's description renders this Signature."""
        model = self.model(name, version)
        signature = model.signature
        return {"name": model.name, "versions": self.models.version_labels(model.name),
                "platform": "workerpool",
                "inputs": [spec.as_dict() for spec in signature.inputs or ()],
                "outputs": [spec.as_dict() for spec in signature.outputs or ()]}

    # -- inference -------------------------------------------------------------------
    def inference(self, name: str, version: str | None, protocol: str,
                  started: float | None = None) -> "Inference":
        """One inference request of ``protocol``, to use as ``with plane.inference(...) as
        call``: the model is looked up on entering (ModelNotFound before the protocol
        decodes a byte), and the request is counted with its outcome when the block ends.
        ``started``: the request's first byte (a perf_counter; default: now)."""
        return Inference(self, name, version, protocol, started)

    # -- Triton's statistics and model configuration extensions (blocking: in a thread) ---
    def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        """``{"model_stats": [...]}`` of one model version, every version of ``name``
        (without a version), or every model (without a name)."""
        if not name:
            models = self.models.models
        elif version:
            models = [self.model(name, version)]
        else:
            models = self.versions(name)
        return {"model_stats": [triton.statistics(model) for model in models]}

    def config(self, name: str, version: str | None = None) -> dict:
        """Triton's model configuration of that version (the newest ready without one)."""
        return triton.config(self.model(name, version))


class Inference:
    """One request on the data plane (``plane.inference(...)``): a context manager whose
    ``model`` is set on entering; ``await run(...)`` in the block. A class, not a generator
    context: its entry and exit were ~5 us of a light model's request (uvloop, in-process)."""

    __slots__ = ("plane", "model", "_name", "_version", "_protocol", "_started")

    def __init__(self, plane: DataPlane, name: str, version: str | None, protocol: str,
                 started: float | None = None):
        self.plane = plane
        self.model: ServedModel | None = None
        self._name, self._version, self._protocol = name, version, protocol
        self._started = time.perf_counter() if started is None else started

    def __enter__(self) -> "Inference":
        try:
            model = self.model = self.plane.model(self._name, self._version)
        except BaseException as error:
            self._finished(error)
            raise
        request_ids.served.set((model.name, model.version, self._protocol))
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._finished(error)

    def _finished(self, error: BaseException | None) -> None:
        """Counted: in the model's statistics (a model found) and the plane's metrics."""
        seconds = time.perf_counter() - self._started
        if self.model is not None:
            self.model.statistics.record(error is None, seconds)
        metrics = self.plane.metrics
        if metrics is not None:
            metrics.finished(self._name, self._protocol, error, seconds)

    async def stream(self, inputs: dict, outputs: list[str] | None = None,
                     timeout: float | None = None):
        """:meth:`run` for a model whose predict yields: an async iterator of the outputs
        by name, one dict per item, as the worker yields them (a model that returns a
        value gives one). ``timeout`` bounds the whole stream. Closing the iterator, or
        cancelling the task that reads it, stops the generator in its worker."""
        model = self.model
        described = self.signature(None)
        inputs = self._resolved(inputs)
        self._check(described, inputs)
        items = await self._submit(call_argument(described.ordered(inputs)), timeout, {},
                                   streamed=True)
        try:
            async for item in items:
                named = name_outputs(item, described.output_names)
                try:
                    yield tensors.select_outputs(named, outputs, f"model {model.name}")
                except ValueError as exc:
                    raise BadRequest(str(exc)) from None
        finally:
            await items.aclose()

    def _resolved(self, inputs: dict) -> dict:
        """``inputs`` with those in shared memory as the references a worker maps."""
        for value in inputs.values():
            if type(value) is SharedInput:
                return self.plane.shared_memory.resolve(inputs)
        return inputs

    def _check(self, described: Signature, inputs: dict) -> None:
        model = self.model
        if not model.ready:
            raise model.not_ready()
        problem = described.mismatch(inputs)
        if problem:
            raise BadRequest(f"model {model.name}: {problem}")
        model.last_used = time.monotonic()  # (a memory budget releases the least recent)

    async def run(self, inputs: dict, outputs: list[str] | None = None,
                  timeout: float | None = None,
                  signature: str | None = None,
                  placed: dict[str, SharedUse] | None = None) -> dict[str, np.ndarray]:
        """predict on ``inputs`` (by name; those in shared memory as SharedInput): the
        outputs by name, those requested in their order (all in the model's order when
        ``outputs`` is None or empty). ``timeout``: the caller's deadline in seconds, which
        shortens the model's own, never lengthens it. ``signature``: which of the model's
        signatures (None: its default); predict gets ``signature=NAME`` for any other.
        ``placed``: outputs the worker writes into shared memory (each answered as a
        PlacedOutput)."""
        model = self.model
        described = self.signature(signature)
        inputs = self._resolved(inputs)
        self._check(described, inputs)
        chosen = {} if described is model.signature else {"signature": signature}
        argument = call_argument(described.ordered(inputs))
        if placed:
            slots = {name: self.plane.shared_memory.slot(use) for name, use in placed.items()}
            argument = PlacedCall(argument, described.output_names, slots)
        result = await self._submit(argument, timeout, chosen)
        named = name_outputs(result, described.output_names, keep=PlacedOutput)
        try:
            return tensors.select_outputs(named, outputs, f"model {model.name}")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def signature(self, name: str | None = None) -> Signature:
        """The model's signature ``name`` (None, "": its default); BadRequest naming the
        model's signatures if it has no such one."""
        signatures = self.model.signature
        try:
            return signatures.selected(name)
        except KeyError:
            raise BadRequest(f"model {self.model.name} has no signature {name!r}; it has "
                             f"{signatures.names}") from None

    async def _submit(self, argument, timeout: float | None, chosen: dict,
                      streamed: bool = False):
        """predict's result; ``streamed``: the stream of its items (pool.stream_async)."""
        model = self.model
        pool = model.pool
        while True:
            if pool is None:  # unloaded since the check
                raise model.not_ready()
            limit = timeout
            if limit is not None and pool.config.timeout is not None:
                limit = min(limit, pool.config.timeout)
            if limit is not None and limit <= 0:
                raise errors.TaskTimeout("the caller's deadline had passed when the request "
                                         "arrived")
            try:
                if streamed:
                    return pool.stream_async(argument, timeout=limit, **chosen)
                return await pool.submit_async(argument, timeout=limit, **chosen)
            except errors.PoolClosed as exc:
                if model.pool is None or model.pool is pool:  # not a swap of pools: closing
                    raise NotReady(f"model {model.name} is shutting down") from exc
                pool = model.pool  # replaced by a new pool between reading and submitting

