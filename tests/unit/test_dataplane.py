"""The data plane and the registry's lifecycle, without processes: a pool factory injected.

InProcessPool stands in for a Pool where the decision under test is the plane's or the
registry's (signature checks, output naming and selection, deadlines, readiness, states):
it runs ``predict`` in this process and records what it was sent. What a real pool does is
tested against real processes elsewhere; the protocols against a real server.
"""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest

import workerpool as wp
from workerpool.serve.config import ModelSpec
from workerpool.serve.registry import Registry
from workerpool.serving.dataplane import DataPlane
from workerpool.serving.errors import (BadRequest, ModelNotFound, NotReady, NoWorkerNow,
                                       TooManyModels)
from workerpool.serving.model import ModelState, ServedModel, SingleModel
from workerpool.signature import Signature, TensorSpec, specs


class InProcessPool:
    """The part of Pool the plane and the registry use, run in this process."""

    def __init__(self, load, predict, *, inputs=None, outputs=None, timeout=None, **options):
        self.model = load()
        self.predict = predict
        self.inputs, self.outputs = specs(inputs), specs(outputs)
        self.signature = getattr(self.model, "signature", Signature())
        self.config = types.SimpleNamespace(timeout=timeout)
        self.version = "v1"
        self.broken = None
        self.ready = True
        self.closed = False
        self.sent: list = []  # (argument, timeout) of every submit_async
        self.swapped_on_submit = None  # called, then PoolClosed: a swap under the request

    def is_ready(self) -> bool:
        return self.ready and not self.closed

    async def submit_async(self, x, timeout=None, **chosen):
        self.sent.append((x, timeout, *chosen.values()))
        if self.closed:
            raise wp.PoolClosed("closed")
        if self.swapped_on_submit is not None:
            self.swapped_on_submit()
            self.closed = True
            raise wp.PoolClosed("closed by a swap")
        return self.predict(self.model, x, **chosen)

    def close(self, drain=True, timeout=None):
        self.closed = True

    def reload(self, load, predict=None):
        self.model = load()


def two_outputs():
    return {"scale": np.float32(2.0)}


def scaled_and_summed(model, x):
    return x * model["scale"], x.sum(axis=-1)


def fail(model, x):
    raise ValueError("the model refuses this input")


DECLARED = [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]


def served(predict=scaled_and_summed, inputs=DECLARED, outputs=None, **options):
    pool = InProcessPool(two_outputs, predict, inputs=inputs, outputs=outputs, **options)
    model = ServedModel.of_pool("m", pool, version="1")
    return DataPlane(SingleModel(model)), pool


def run(coroutine):
    return asyncio.run(coroutine)


async def infer(plane, inputs, outputs=None, timeout=None, name="m"):
    with plane.inference(name, None, "test") as call:
        return await call.run(inputs, outputs, timeout)


X = np.ones((2, 3), np.float32)


# -- the input check against the signature ---------------------------------------------------
@pytest.mark.parametrize("inputs, message", [
    ({"y": X}, "model m: takes inputs ['x'], got ['y']"),
    ({"x": X, "y": X}, "takes inputs ['x']"),
    ({"x": X.astype(np.int64)}, "input 'x' must be FP32, got INT64"),
    ({"x": np.ones((2, 4), np.float32)}, "input 'x' must have shape [-1, 3] (-1: any), got [2, 4]"),
    ({"x": [[b"a"]]}, "input 'x' must be FP32, got BYTES"),
])
def test_inputs_that_do_not_fit_the_signature_never_reach_the_pool(inputs, message):
    plane, pool = served()
    with pytest.raises(BadRequest) as caught:
        run(infer(plane, inputs))
    assert str(caught.value) == message or message in str(caught.value)
    assert pool.sent == []


def test_an_unknown_signature_checks_nothing_and_passes_the_one_input_as_it_is():
    plane, pool = served(inputs=None)
    run(infer(plane, {"anything": X}))
    assert pool.sent[0][0] is X


# -- outputs: named, selected, ordered ---------------------------------------------------------
def test_outputs_are_named_by_the_signature_and_selected_in_the_requests_order():
    plane, _ = served(outputs=[{"name": "scaled", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "sum", "datatype": "FP32", "shape": [-1]}])
    every = run(infer(plane, {"x": X}))
    assert list(every) == ["scaled", "sum"]
    assert np.array_equal(every["scaled"], X * 2) and np.array_equal(every["sum"], [3, 3])
    assert list(run(infer(plane, {"x": X}, ["sum", "scaled"]))) == ["sum", "scaled"]
    with pytest.raises(BadRequest, match=r"model m has no outputs \['nope'\]; it has"):
        run(infer(plane, {"x": X}, ["nope"]))


def test_without_output_names_a_tuple_is_output_0_to_k():
    plane, _ = served()
    assert list(run(infer(plane, {"x": X}))) == ["output_0", "output_1"]


@pytest.mark.parametrize("result, message", [
    (None, "predict returned None"),
    ({1: np.zeros(1)}, "keys [1] are not strings"),
    (lambda: None, "is not a tensor: it holds function values"),
])
def test_a_result_no_protocol_can_carry_is_the_models_error(result, message):
    plane, _ = served(predict=lambda model, x: result)
    with pytest.raises(wp.OutputEncodeError, match=message.replace("[", r"\[").replace(
            "]", r"\]")):
        run(infer(plane, {"x": X}))


# -- readiness, deadlines, swaps ---------------------------------------------------------------
def test_a_model_with_no_ready_worker_is_no_worker_now_and_a_broken_one_says_why():
    plane, pool = served()
    pool.ready = False
    with pytest.raises(NoWorkerNow, match="being replaced"):
        run(infer(plane, {"x": X}))
    pool.broken = RuntimeError("3 new zygotes failed\ndetail")
    with pytest.raises(NotReady, match="is broken: 3 new zygotes failed$"):
        run(infer(plane, {"x": X}))
    assert not plane.ready


def test_the_callers_deadline_shortens_the_models_own_never_lengthens_it():
    plane, pool = served(timeout=5.0)
    run(infer(plane, {"x": X}, timeout=2.0))
    run(infer(plane, {"x": X}, timeout=9.0))
    run(infer(plane, {"x": X}))
    assert [t for _, t in pool.sent] == [2.0, 5.0, None]
    with pytest.raises(wp.TaskTimeout, match="deadline had passed"):
        run(infer(plane, {"x": X}, timeout=0.0))


def test_a_pool_swapped_under_a_request_gets_the_request_not_an_error():
    plane, old = served()
    model = plane.model("m")
    new = InProcessPool(two_outputs, scaled_and_summed, inputs=DECLARED)
    old.swapped_on_submit = lambda: setattr(model, "pool", new)  # what Model.swap does
    assert list(run(infer(plane, {"x": X}))) == ["output_0", "output_1"]
    assert len(old.sent) == 1 and len(new.sent) == 1
    new.close()  # a pool closed for good (not a swap): the model is shutting down
    with pytest.raises(NotReady):
        run(infer(plane, {"x": X}))


def test_unknown_models_and_versions_are_not_found():
    plane, _ = served()
    with pytest.raises(ModelNotFound):
        run(infer(plane, {"x": X}, name="other"))


class CountingMetrics:
    def __init__(self):
        self.outcomes = []

    def finished(self, model, protocol, error, seconds):
        from workerpool.serving.errors import outcome_of

        self.outcomes.append((model, protocol,
                              "success" if error is None else outcome_of(error)))


def test_every_inference_is_counted_with_its_outcome():
    metrics = CountingMetrics()
    pool = InProcessPool(two_outputs, scaled_and_summed, inputs=DECLARED)
    plane = DataPlane(SingleModel(ServedModel.of_pool("m", pool, "1")), metrics)
    run(infer(plane, {"x": X}))
    with pytest.raises(BadRequest):
        run(infer(plane, {"y": X}))
    model = plane.model("m")
    model.pool = InProcessPool(two_outputs, fail, inputs=DECLARED)
    with pytest.raises(ValueError):
        run(infer(plane, {"x": X}))
    assert metrics.outcomes == [("m", "test", "success"), ("m", "test", "bad_request"),
                                ("m", "test", "error")]


# -- the registry's lifecycle with the plane on top ---------------------------------------------
def spec(name="m", version="1", **fields):
    return ModelSpec(name, two_outputs, version=version, predict=scaled_and_summed,
                     inputs=DECLARED, **fields)


def test_a_registry_loads_serves_unloads_and_reloads_through_its_states():
    registry = Registry([spec()], pool_factory=InProcessPool)
    plane = DataPlane(registry)
    model = registry.get("m")
    assert model.state == ModelState.LOADING and not plane.ready
    model.load()
    assert model.state == ModelState.LOADED and plane.ready
    assert model.signature == Signature(tuple(specs(DECLARED)), None, "declared")
    assert list(run(infer(plane, {"x": X}))) == ["output_0", "output_1"]
    registry.unload("m")
    assert model.state == ModelState.UNLOADED and model.pool is None
    assert plane.ready  # an unloaded version is not a missing one
    with pytest.raises(NotReady, match="is unloaded; load it"):
        run(infer(plane, {"x": X}))
    registry.load("m")
    assert model.state == ModelState.LOADED
    registry.close(1.0)
    assert model.state == ModelState.CLOSED and not plane.ready


def test_a_load_that_fails_is_failed_with_its_error_and_can_be_tried_again():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("the disk is not there yet")
        return two_outputs()

    registry = Registry([ModelSpec("m", flaky, predict=scaled_and_summed)],
                        pool_factory=InProcessPool)
    model = registry.get("m")
    model.load()
    assert model.state == ModelState.FAILED and "the disk is not there yet" in model.error
    with pytest.raises(NotReady, match="failed to load: OSError"):
        run(infer(DataPlane(registry), {"x": X}))
    registry.load("m")
    assert model.state == ModelState.LOADED


def test_only_the_allowed_transitions_happen():
    model = ServedModel("m", "1")
    with pytest.raises(RuntimeError, match="no transition from loading to unloaded"):
        model.become(ModelState.UNLOADED)
    model.become(ModelState.CLOSED)
    with pytest.raises(RuntimeError, match="from closed to loading"):
        model.become(ModelState.LOADING)


def test_max_models_counts_the_versions_holding_pools(tmp_path):
    source = tmp_path / "m.pt"
    source.write_bytes(b"")
    registry = Registry([spec(version="1"), spec(version="2")], max_models=2,
                        pool_factory=InProcessPool, allowed_sources=[str(tmp_path)])
    for model in registry.models:
        model.load()
    with pytest.raises(TooManyModels, match="--max-models 2"):
        registry.load("m", {"version": "3"})
    registry.unload("m", {"version": "1"})
    registry.load("m", {"version": "3"})
    assert [(m.version, m.state) for m in registry.models] == [
        ("1", ModelState.UNLOADED), ("2", ModelState.LOADED), ("3", ModelState.LOADED)]


def test_the_models_own_signature_serves_when_nothing_is_declared():
    class Described(dict):
        signature = Signature(tuple(specs([{"name": "image", "datatype": "FP32",
                                            "shape": [-1, 3]}])),
                              tuple(specs([{"name": "digit", "datatype": "FP32",
                                            "shape": [-1, 3]},
                                           {"name": "sum", "datatype": "FP32",
                                            "shape": [-1]}])), "model")

    def load():
        return Described(scale=np.float32(2.0))

    registry = Registry([ModelSpec("m", load, predict=scaled_and_summed)],
                        pool_factory=InProcessPool)
    registry.get("m").load()
    plane = DataPlane(registry)
    assert plane.model_metadata("m") == {
        "name": "m", "versions": ["1"], "platform": "workerpool",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "digit", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "sum", "datatype": "FP32", "shape": [-1]}]}
    assert list(run(infer(plane, {"image": X}))) == ["digit", "sum"]
    with pytest.raises(BadRequest, match=r"takes inputs \['image'\]"):
        run(infer(plane, {"x": X}))
    assert plane.model("m").signature.source == "model"


def test_a_named_signature_is_checked_as_its_own_and_reaches_predict_by_name():
    def tensor(name, shape):
        return TensorSpec(name, "FP32", shape)

    class TwoSignatures(dict):
        signature = Signature((tensor("features", (-1, 3)),), (tensor("scores", (-1, 3)),),
                              "model", {"top": Signature((tensor("pixels", (-1, 3)),),
                                                         (tensor("best", (-1,)),), "model")})

    def predict(model, x, signature=None):
        return x.max(axis=1) if signature == "top" else x * 2

    async def infer_signature(plane, inputs, signature):
        with plane.inference("m", None, "test") as call:
            return await call.run(inputs, signature=signature)

    registry = Registry([ModelSpec("m", TwoSignatures, predict=predict)],
                        pool_factory=InProcessPool)
    registry.get("m").load()
    plane, pool = DataPlane(registry), registry.get("m").pool
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for signature in (None, "", "serving_default"):
        np.testing.assert_array_equal(
            run(infer_signature(plane, {"features": x}, signature))["scores"], x * 2)
    assert run(infer_signature(plane, {"pixels": x}, "top"))["best"].tolist() == [2.0, 5.0]
    assert [sent[2:] for sent in pool.sent] == [(), (), (), ("top",)]  # the default: no name
    for inputs, signature, message in [
            ({"pixels": x}, "nope", "model m has no signature 'nope'; it has "
                                    "['serving_default', 'top']"),
            ({"features": x}, "top", "takes inputs ['pixels'], got ['features']"),
            ({"pixels": x[:, :2]}, "top", "input 'pixels' must have shape [-1, 3]")]:
        with pytest.raises(BadRequest) as caught:
            run(infer_signature(plane, inputs, signature))
        assert message in str(caught.value)
    assert len(pool.sent) == 4


def test_error_messages_are_cut_for_every_protocol():
    from workerpool.serve.grpc.server import GRPC_MESSAGE_BYTES, status_message
    from workerpool.serving.errors import MAX_ERROR_CHARS, message_of

    huge = BadRequest("é" * 100_000)
    assert len(message_of(huge)) <= MAX_ERROR_CHARS + 40
    assert message_of(huge).endswith("more characters]")
    assert len(status_message(huge, debug=True).encode()) <= GRPC_MESSAGE_BYTES + 3
