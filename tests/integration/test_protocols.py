"""The four protocols agree: one table of requests, each sent over KServe v2 HTTP, KServe v2
gRPC, TF Serving REST and TF Serving gRPC to one real server; the same request gets the same
outcome class (and, when it succeeds, the same numbers) whichever protocol carries it.

The models: a function model with declared inputs and two named outputs, one that raises, and
a Keras model saved as ``.keras`` with a named 28x28 input and two named outputs, served with
no declaration and no warm-up: its signature comes from the model itself, so every protocol
describes it and refuses a wrong shape with 400 / INVALID_ARGUMENT naming what it expects.
A SavedModel with two signatures is answered by either through TF Serving's
``signature_name``, and described with both.
"""

from __future__ import annotations

import json
import textwrap

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

import test_saved_model
import test_tensorflow  # sets the reference's TF threads like the workers' (first TF use)
from test_serve import Server
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,  # noqa: E402
                                     prediction_service_pb2_grpc)

tf = test_tensorflow.tf
pytestmark = pytest.mark.module_pool
# Triton's words for a model the server does not have (serving/errors.py)
UNKNOWN_NOPE = "Request for unknown model: 'nope' is not found"

CONFIG = textwrap.dedent("""
    [server]
    grpc_port = 0
    tf_serving_port = 0

    [models.two]
    source = "serve_models:numbers"
    predict = "serve_models:scaled_and_total"
    workers = 1
    inputs = [{{name = "x", datatype = "FP32", shape = [-1, 3]}}]

    [models.faulty]
    source = "serve_models:numbers"
    predict = "serve_models:fail"
    workers = 1

    [models.digits]
    source = "{keras_file}"
    workers = 1

    [models.heads]
    source = "{saved_model}"
    workers = 1
""")


def digits_model():
    keras = tf.keras
    image = keras.Input(shape=(28, 28), name="image")
    hidden = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(image))
    return keras.Model(image, {"digit": keras.layers.Dense(10, name="digit")(hidden),
                               "parity": keras.layers.Dense(2, name="parity")(hidden)})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("protocols")
    digits_model().save(directory / "digits.keras")
    heads = test_saved_model.saved_two_signatures(directory / "heads")
    (directory / "serve.toml").write_text(CONFIG.format(keras_file=directory / "digits.keras",
                                                        saved_model=heads))
    server = Server(["--config", str(directory / "serve.toml")], grpc_lines=2)
    server.keras_file = str(directory / "digits.keras")
    server.saved_model = heads
    try:
        server.wait_ready(timeout=180)
        yield server
    finally:
        assert server.stop() == 0


# -- one request, four ways --------------------------------------------------------------------
HTTP_CLASS = {200: "ok", 400: "invalid", 404: "not_found", 500: "internal"}
GRPC_CLASS = {"OK": "ok", "INVALID_ARGUMENT": "invalid", "NOT_FOUND": "not_found",
              "INTERNAL": "internal"}
DATATYPE = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


def kserve_http(server, model, inputs, outputs):
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": DATATYPE[x.dtype],
                        "data": x.ravel().tolist()} for name, x in inputs.items()]}
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    status, _, raw = server.post(f"/v2/models/{model}/infer", json.dumps(body).encode())
    answer = json.loads(raw)
    if status != 200:
        return HTTP_CLASS[status], answer["error"]
    return "ok", {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"])
                  for o in answer["outputs"]}


def kserve_grpc(server, model, inputs, outputs):
    with triton_grpc.InferenceServerClient(server.grpc["KServe v2"]) as client:
        tensors = []
        for name, x in inputs.items():
            tensor = triton_grpc.InferInput(name, list(x.shape), DATATYPE[x.dtype])
            tensor.set_data_from_numpy(x)
            tensors.append(tensor)
        wanted = [triton_grpc.InferRequestedOutput(name) for name in outputs or ()]
        try:
            result = client.infer(model, tensors, outputs=wanted or None)
        except InferenceServerException as exc:
            return GRPC_CLASS[exc.status().removeprefix("StatusCode.")], exc.message()
        return "ok", {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def tf_rest(server, model, inputs, outputs):
    assert not outputs  # TF Serving's REST API selects no outputs
    body = {"inputs": {name: x.tolist() for name, x in inputs.items()}}
    status, _, raw = server.post(f"/v1/models/{model}:predict", json.dumps(body).encode())
    answer = json.loads(raw)
    if status != 200:
        return HTTP_CLASS[status], answer["error"]
    values = answer["outputs"]
    return "ok", {name: np.array(value, np.float32) for name, value in values.items()}


def tf_grpc(server, model, inputs, outputs, signature=""):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, x in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(x))
    request.output_filter.extend(outputs or ())
    with grpc.insecure_channel(server.grpc["TensorFlow Serving"]) as channel:
        try:
            reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=60)
        except grpc.RpcError as exc:
            return GRPC_CLASS[exc.code().name], exc.details()
    assert reply.model_spec.signature_name == (signature or "serving_default")
    return "ok", {name: tf.make_ndarray(tensor) for name, tensor in reply.outputs.items()}


PROTOCOLS = {"kserve_http": kserve_http, "kserve_grpc": kserve_grpc, "tf_rest": tf_rest,
             "tf_grpc": tf_grpc}
X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
CASES = [
    # id, model, inputs, requested outputs, outcome class, what an error must say,
    # protocols that cannot carry the request (JSON has no dtypes; TF REST selects no outputs)
    ("answered", "two", {"x": X}, None, "ok", "", ()),
    ("an output selected", "two", {"x": X}, ["total"], "ok", "", ("tf_rest",)),
    ("unknown model", "nope", {"x": X}, None, "not_found", UNKNOWN_NOPE, ()),
    ("wrong datatype", "two", {"x": X.astype(np.int32)}, None, "invalid",
     "input 'x' must be FP32, got INT32", ("tf_rest",)),
    ("wrong shape", "two", {"x": X[:, :2]}, None, "invalid",
     "input 'x' must have shape [-1, 3]", ()),
    ("unknown input", "two", {"y": X}, None, "invalid", "takes inputs ['x'], got ['y']", ()),
    ("unknown output", "two", {"x": X}, ["nope"], "invalid", "has no outputs ['nope']",
     ("tf_rest",)),
    ("the model raises", "faulty", {"x": X}, None, "internal",
     "ValueError: the model refuses this input", ()),
    ("Keras: its own signature refuses a wrong shape", "digits", {"image": X}, None,
     "invalid", "input 'image' must have shape [-1, 28, 28]", ()),
    ("Keras: a wrong input name", "digits", {"x": np.zeros((1, 28, 28), np.float32)}, None,
     "invalid", "takes inputs ['image']", ()),
]


@pytest.mark.parametrize("model, inputs, outputs, outcome, message, cannot",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_same_request_gets_the_same_outcome_on_every_protocol(server, model, inputs,
                                                                   outputs, outcome, message,
                                                                   cannot):
    answers = {name: call(server, model, inputs, outputs)
               for name, call in PROTOCOLS.items() if name not in cannot}
    assert {name: got[0] for name, got in answers.items()} == \
        {name: outcome for name in answers}, answers
    if outcome != "ok":
        for name, (_, error) in answers.items():
            assert message in error, (name, error)
        return
    first, *others = answers.values()
    for other in others:
        assert sorted(other[1]) == sorted(first[1])
        for key in first[1]:
            np.testing.assert_array_equal(other[1][key], first[1][key])
    # KServe's outputs are a list: in the request's order when it names them, else the model's
    assert list(answers["kserve_http"][1]) == list(answers["kserve_grpc"][1]) == \
        (outputs or ["scaled", "total"])
    if model == "two":
        expected = {"scaled": X * 2, "total": X.sum(axis=1)}
        for key, value in first[1].items():
            np.testing.assert_array_equal(value, expected[key])


def test_a_keras_model_is_answered_as_keras_answers_it_on_every_protocol(server):
    x = np.random.default_rng(3).standard_normal((2, 28, 28)).astype(np.float32)
    reference = tf.keras.models.load_model(server.keras_file)
    want = {key: np.asarray(value) for key, value in reference(x, training=False).items()}
    for name, call in PROTOCOLS.items():
        outcome, outputs = call(server, "digits", {"image": x}, None)
        assert outcome == "ok", (name, outputs)
        assert sorted(outputs) == ["digit", "parity"], name
        for key in want:
            test_tensorflow.assert_same(outputs[key], want[key], 1e-5)


def tf_serving_signatures(server, model):
    """The model's SignatureDefMap from TF Serving's REST API (JSON) and its gRPC API."""
    rest = json.loads(server.get(f"/v1/models/{model}/metadata")[2])
    with grpc.insecure_channel(server.grpc["TensorFlow Serving"]) as channel:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert reply.metadata["signature_def"].Unpack(signatures)
    return rest["metadata"]["signature_def"]["signature_def"], signatures


# -- metadata: one signature, every protocol's form --------------------------------------------
def test_every_protocol_describes_the_keras_model_from_its_own_signature(server):
    inputs = [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28]}]
    outputs = [{"name": "digit", "datatype": "FP32", "shape": [-1, 10]},
               {"name": "parity", "datatype": "FP32", "shape": [-1, 2]}]
    http = json.loads(server.get("/v2/models/digits")[2])
    assert (http["inputs"], http["outputs"]) == (inputs, outputs)
    status = json.loads(server.get("/status")[2])
    assert next(m for m in status["models"] if m["name"] == "digits")["metadata_source"] == \
        "model"
    with triton_grpc.InferenceServerClient(server.grpc["KServe v2"]) as client:
        over_grpc = client.get_model_metadata("digits", as_json=True)
    assert [{"name": t["name"], "datatype": t["datatype"], "shape": [int(s) for s in t["shape"]]}
            for t in over_grpc["inputs"]] == inputs
    assert [t["name"] for t in over_grpc["outputs"]] == ["digit", "parity"]
    rest_signatures, signatures = tf_serving_signatures(server, "digits")
    rest_signature = rest_signatures["serving_default"]
    tf_signature = signatures.signature_def["serving_default"]
    assert list(rest_signature["inputs"]) == ["image"]
    assert [d["size"] for d in rest_signature["inputs"]["image"]["tensor_shape"]["dim"]] == \
        ["-1", "28", "28"]
    assert sorted(rest_signature["outputs"]) == ["digit", "parity"]
    assert [d.size for d in tf_signature.inputs["image"].tensor_shape.dim] == [-1, 28, 28]
    assert tf_signature.inputs["image"].dtype == tf.float32.as_datatype_enum
    assert sorted(tf_signature.outputs) == ["digit", "parity"]
    assert [d.size for d in tf_signature.outputs["parity"].tensor_shape.dim] == [-1, 2]


# -- a SavedModel's several signatures, chosen by TF Serving's signature_name ---------------------
def tf_rest_signature(server, model, inputs, signature):
    body = {"signature_name": signature, "inputs": {k: x.tolist() for k, x in inputs.items()}}
    status, _, raw = server.post(f"/v1/models/{model}:predict", json.dumps(body).encode())
    answer = json.loads(raw)
    if status != 200:
        return HTTP_CLASS[status], answer["error"]
    values = answer["outputs"]  # one output: its value alone, as TF Serving answers
    named = values if isinstance(values, dict) else {"(the one output)": values}
    return "ok", {name: np.array(value) for name, value in named.items()}


def tf_grpc_signature(server, model, inputs, signature):
    return tf_grpc(server, model, inputs, None, signature)


def test_each_signature_of_a_saved_model_answers_by_its_name_over_tf_serving(server):
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    cases = [("", {"features": x}), ("serving_default", {"features": x}),
             ("top", {"pixels": x})]
    for signature, inputs in cases:
        want = test_saved_model.in_process(server.saved_model, inputs,
                                           signature or "serving_default")
        for call in (tf_rest_signature, tf_grpc_signature):
            outcome, got = call(server, "heads", inputs, signature)
            assert outcome == "ok", (call.__name__, signature, got)
            if list(got) == ["(the one output)"] and len(want) == 1:
                got = {next(iter(want)): got["(the one output)"]}
            assert sorted(got) == sorted(want), (call.__name__, signature)
            for key in want:
                test_tensorflow.assert_same(got[key], want[key], 1e-5)
    refused = [("nope", {"pixels": x}, "has no signature 'nope'; it has "
                "['serving_default', 'top']"),
               ("top", {"features": x}, "takes inputs ['pixels'], got ['features']"),
               ("top", {"pixels": x[:, :8]}, "input 'pixels' must have shape [-1, 64]")]
    for signature, inputs, message in refused:
        for call in (tf_rest_signature, tf_grpc_signature):
            outcome, error = call(server, "heads", inputs, signature)
            assert (outcome, message in error) == ("invalid", True), (call.__name__, error)


def test_every_signature_of_a_saved_model_is_in_its_tf_serving_metadata(server):
    rest_signatures, signatures = tf_serving_signatures(server, "heads")
    described = {name: (sorted(s.inputs), sorted(s.outputs))
                 for name, s in signatures.signature_def.items()}
    assert described == {"serving_default": (["features"], ["scores"]),
                         "top": (["pixels"], ["best", "label"])}
    assert {name: (sorted(s["inputs"]), sorted(s["outputs"]))
            for name, s in rest_signatures.items()} == described
    top = signatures.signature_def["top"]
    assert top.outputs["label"].dtype == tf.int64.as_datatype_enum
    assert [d.size for d in top.inputs["pixels"].tensor_shape.dim] == [-1, 64]
    # KServe v2 describes the default signature, the one its requests reach
    kserve = json.loads(server.get("/v2/models/heads")[2])
    assert [t["name"] for t in kserve["inputs"]] == ["features"]
