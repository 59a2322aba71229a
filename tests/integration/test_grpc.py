"""gRPC and TensorFlow Serving's API: existing clients change only the address.

One server (module scope) speaks KServe v2 over HTTP and gRPC and TF Serving's gRPC and
REST APIs; it holds a torch model, a Keras model (TensorFlow engine), a SavedModel directory
with a TF Serving warm-up file, and misbehaving models. It is called with the real client
packages: tritonclient.grpc, and tensorflow-serving-api with tf.make_tensor_proto exactly as
TF Serving's users call it. Outputs are compared with the models called in-process, and
every bad request ends by checking that the server still serves.
"""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import modelzoo
import test_tensorflow  # sets the reference's TF threads like the workers' (first TF use)
from test_serve import Server, metric_samples
from testkit import wait_until

tf = test_tensorflow.tf
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,  # noqa: E402
                                     model_service_pb2_grpc, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc, classification_pb2)

pytestmark = pytest.mark.module_pool
# Triton's words for a model the server does not have (serving/errors.py)
UNKNOWN_NOPE = "Request for unknown model: 'nope' is not found"

MIB = 1024 * 1024
CONFIG = textwrap.dedent("""
    [server]
    max_request_bytes = 1048576
    grpc_port = 0
    tf_serving_port = 0

    [models.mlp]
    source = "modelzoo:mlp"
    workers = 1
    warmup = "{warmup}"

    [models.keras]
    source = "test_tensorflow:dense_mlp"
    workers = 1
    inputs = [{{name = "x", datatype = "FP32", shape = [-1, 32]}}]

    [models.mnist]
    source = "{saved_model}"
    workers = 2

    [models.sleepy]
    source = "serve_models:numbers"
    predict = "serve_models:sleep_then_echo"
    workers = 1
    max_queue = 1
    timeout = 20

    [models.faulty]
    source = "serve_models:numbers"
    predict = "serve_models:fail"
    workers = 1

    [models.words]
    source = "serve_models:numbers"
    predict = "serve_models:texts"
    workers = 1
""")


class Mnist(tf.Module):
    """A SavedModel as TF Serving users export one: one named input, variables."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.standard_normal((784, 10)).astype(np.float32))
        self.b = tf.Variable(rng.standard_normal(10).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 28, 28], tf.float32, name="input")])
    def serve(self, input):  # noqa: A002 - the signature's input name
        return {"scores": tf.matmul(tf.reshape(input, [-1, 784]), self.w) + self.b}


def save_mnist(path, warmup: list[np.ndarray]) -> None:
    module = Mnist()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    write_warmup(path, warmup)


def write_warmup(path, inputs: list) -> None:
    """assets.extra/tf_serving_warmup_requests, written as TF Serving's docs do."""
    (path / "assets.extra").mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(path / "assets.extra" / "tf_serving_warmup_requests")) as w:
        for x in inputs:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mnist"
            request.model_spec.signature_name = "serving_default"
            request.inputs["input"].CopyFrom(tf.make_tensor_proto(x, dtype=tf.float32))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            w.write(log.SerializeToString())


def mnist_reference(path, x: np.ndarray) -> np.ndarray:
    loaded = tf.saved_model.load(str(path))
    return loaded.signatures["serving_default"](input=tf.constant(x))["scores"].numpy()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mnist") / "1"
    save_mnist(path, [np.zeros((1, 28, 28), np.float32), np.ones((3, 28, 28), np.float32)])
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, saved_model):
    directory = tmp_path_factory.mktemp("grpc")
    np.savez(directory / "warmup.npz", x=np.ones((1, 32), dtype=np.float32))
    (directory / "serve.toml").write_text(CONFIG.format(warmup=directory / "warmup.npz",
                                                        saved_model=saved_model))
    server = Server(["--config", str(directory / "serve.toml")], grpc_lines=2)
    try:
        server.wait_ready(timeout=180)
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def triton(server):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
    yield client
    client.close()


@pytest.fixture(scope="module")
def tf_serving(server):
    """The channel of TF Serving's own example, with its message size option."""
    channel = grpc.insecure_channel(server.grpc["TensorFlow Serving"], options=[
        ("grpc.max_receive_message_length", 100 * 1024 * 1024)])
    yield channel
    channel.close()


def mlp_reference(x: np.ndarray) -> np.ndarray:
    return modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, torch.from_numpy(x)).numpy()


def triton_infer(client, model: str, x: np.ndarray, name: str = "x", **kwargs):
    tensor = triton_grpc.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], **kwargs)


def assert_still_serves(triton):
    x = np.random.default_rng(7).standard_normal((2, 32)).astype(np.float32)
    assert np.array_equal(triton_infer(triton, "mlp", x).as_numpy("output_0"), mlp_reference(x))


# -- KServe v2 over gRPC: tritonclient.grpc --------------------------------------------------
def test_tritonclient_grpc_torch_model_equals_in_process(triton):
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    result = triton_infer(triton, "mlp", x, request_id="r-1")
    assert np.array_equal(result.as_numpy("output_0"), mlp_reference(x))
    response = result.get_response()
    assert response.id == "r-1" and response.model_name == "mlp"
    assert response.model_version == "1" and len(response.raw_output_contents) == 1


def test_tritonclient_grpc_keras_model_equals_in_process(triton):
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    got = triton_infer(triton, "keras", x).as_numpy("output_0")
    test_tensorflow.assert_same(got, test_tensorflow.keras_reference(
        test_tensorflow.dense_mlp, x))


def test_typed_contents_in_raw_contents_out(server):
    """The protocol's other form: values in InferTensorContents, not raw bytes; the answer
    comes raw anyway, as Triton's does (clients read raw_output_contents)."""
    x = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 32])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.grpc["KServe v2"]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    (output,) = response.outputs
    assert not output.HasField("contents") and list(output.shape) == [2, 8]
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 8)
    assert np.array_equal(got, mlp_reference(x))


def test_bytes_tensors_over_grpc(triton):
    words = np.array([b"alpha", b"be", "\u03b3".encode()], dtype=np.object_)
    tensor = triton_grpc.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(words)
    result = triton.infer("words", [tensor])
    assert result.as_numpy("upper").tolist() == [b"ALPHA", b"BE", "\u03b3".encode()]
    assert result.as_numpy("length").tolist() == [5, 2, 2]


def test_health_and_metadata_over_grpc(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.get_server_metadata().name == "workerpool"
    for model in ("mlp", "keras", "mnist", "sleepy", "faulty", "words"):
        assert triton.is_model_ready(model)
    assert triton.is_model_ready("mlp", "1") and not _ready_or_error(triton, "mlp", "9")
    mlp = triton.get_model_metadata("mlp", as_json=True)  # from the warm-up call
    assert mlp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "32"]}]
    assert mlp["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": ["-1", "8"]}]
    assert mlp["versions"] == ["1"] and mlp["platform"] == "workerpool"


def _ready_or_error(client, model, version) -> bool:
    try:
        return client.is_model_ready(model, version)
    except InferenceServerException as error:
        assert error.status() == "StatusCode.NOT_FOUND"
        return False


# -- TensorFlow Serving's gRPC API: tensorflow-serving-api -----------------------------------
def test_tf_serving_snippet_against_a_keras_model(tf_serving):
    data = np.random.default_rng(4).standard_normal((1, 32)).astype(np.float32)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(tf_serving)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "keras"
    request.model_spec.signature_name = "serving_default"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(data, dtype=tf.float32, shape=[1, 32]))
    result = stub.Predict(request, timeout=10.0)
    got = tf.make_ndarray(result.outputs["output_0"])
    test_tensorflow.assert_same(got, test_tensorflow.keras_reference(
        test_tensorflow.dense_mlp, data))
    assert result.model_spec.name == "keras" and result.model_spec.version.value == 1
    assert result.model_spec.signature_name == "serving_default"


def test_tf_serving_snippet_against_a_saved_model_with_warmup(tf_serving, saved_model):
    data = np.random.default_rng(5).standard_normal((1, 28, 28)).astype(np.float32)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(tf_serving)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = "serving_default"
    request.inputs["input"].CopyFrom(tf.make_tensor_proto(data, dtype=tf.float32,
                                                          shape=[1, 28, 28]))
    result = stub.Predict(request, timeout=10.0)
    want = mnist_reference(saved_model, data)
    test_tensorflow.assert_same(tf.make_ndarray(result.outputs["scores"]), want, 1e-5)
    # typed values (float_val) instead of tensor_content, and a version asked by number
    typed = predict_pb2.PredictRequest()
    typed.model_spec.name = "mnist"
    typed.model_spec.version.value = 1
    tensor = typed.inputs["input"]
    tensor.dtype = tf.float32.as_datatype_enum
    tensor.tensor_shape.dim.extend([tensor.tensor_shape.Dim(size=s) for s in (1, 28, 28)])
    tensor.float_val.extend(data.ravel().tolist())
    typed.output_filter.append("scores")
    result = stub.Predict(typed, timeout=10.0)
    test_tensorflow.assert_same(tf.make_ndarray(result.outputs["scores"]), want, 1e-5)


def test_tf_serving_metadata_comes_from_the_saved_models_own_signature(tf_serving, server):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(tf_serving)
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "mnist"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, timeout=10.0)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    (name, info), = signature.inputs.items()
    assert name == "input" and info.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in info.tensor_shape.dim] == [-1, 28, 28]
    assert [d.size for d in signature.outputs["scores"].tensor_shape.dim] == [-1, 10]
    status = json.loads(server.get("/status")[2])
    mnist = next(m for m in status["models"] if m["name"] == "mnist")
    assert mnist["metadata_source"] == "model", mnist  # not its warm-up file: its signature


def test_tf_serving_model_status(tf_serving):
    stub = model_service_pb2_grpc.ModelServiceStub(tf_serving)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    (status,) = stub.GetModelStatus(request, timeout=10.0).model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


# -- TensorFlow Serving's REST API on the HTTP port ------------------------------------------
def test_tf_serving_rest_row_and_columnar_formats(server, saved_model):
    x = np.random.default_rng(6).standard_normal((2, 28, 28)).astype(np.float32)
    want = mnist_reference(saved_model, x)
    status, _, raw = server.post("/v1/models/mnist:predict", json.dumps(
        {"signature_name": "serving_default", "instances": x.tolist()}).encode())
    assert status == 200, raw
    test_tensorflow.assert_same(np.array(json.loads(raw)["predictions"], np.float32), want, 1e-5)
    status, _, raw = server.post("/v1/models/mnist/versions/1:predict", json.dumps(
        {"inputs": {"input": x.tolist()}}).encode())
    assert status == 200, raw
    test_tensorflow.assert_same(np.array(json.loads(raw)["outputs"], np.float32), want, 1e-5)
    named_rows = [{"input": row.tolist()} for row in x]
    status, _, raw = server.post("/v1/models/mnist:predict", json.dumps(
        {"instances": named_rows}).encode())
    test_tensorflow.assert_same(np.array(json.loads(raw)["predictions"], np.float32), want, 1e-5)


def test_tf_serving_rest_strings_several_outputs_status_and_metadata(server):
    status, _, raw = server.post("/v1/models/words:predict", json.dumps(
        {"instances": [{"b64": "YWxwaGE="}, "be"]}).encode())  # base64 of "alpha"
    assert status == 200, raw
    assert json.loads(raw)["predictions"] == [{"upper": "ALPHA", "length": 5},
                                              {"upper": "BE", "length": 2}]
    status, _, raw = server.get("/v1/models/mnist")
    assert status == 200 and json.loads(raw) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]}
    status, _, raw = server.get("/v1/models/mnist/versions/1/metadata")
    signature = json.loads(raw)["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["input"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in signature["inputs"]["input"]["tensor_shape"]["dim"]] == \
        ["-1", "28", "28"]


REST_ERRORS = [
    ("/v1/models/mnist:predict", b"{not json", 400, "not valid JSON"),
    ("/v1/models/mnist:predict", b'{"instances": []}', 400, "non-empty list"),
    ("/v1/models/mnist:predict", b'{"instances": [1], "inputs": [1]}', 400, "either"),
    ("/v1/models/mnist:predict", b'{"instances": [[1, 2], [3]]}', 400, "different lengths"),
    ("/v1/models/mnist:predict", b'{"instances": [1], "signature_name": "other"}', 400,
     "has no signature 'other'; it has ['serving_default']"),
    ("/v1/models/nope:predict", b'{"instances": [1]}', 404, UNKNOWN_NOPE),
    ("/v1/models/mnist/versions/7:predict", b'{"instances": [1]}', 404, "version 7 is not found"),
    ("/v1/models/mnist:classify", b'{"examples": []}', 501, "use :predict"),
    ("/v1/models/faulty:predict", b'{"instances": [1.0]}', 500, "refuses this input"),
]


@pytest.mark.parametrize("path, body, status, message", REST_ERRORS,
                         ids=[f"{p} {b[:20]!r}" for p, b, _, _ in REST_ERRORS])
def test_tf_serving_rest_bad_requests(server, triton, path, body, status, message):
    got, _, raw = server.post(path, body)
    assert got == status and message in json.loads(raw)["error"], raw
    assert_still_serves(triton)


# -- every bad gRPC request gets its status code, and the server goes on --------------------
def _kserve(model="mlp", datatype="FP32", shape=(1, 32), raw=None, count=32):
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(np.ones(count, np.float32).tobytes() if raw is None
                                      else raw)
    return request


def _tf_predict(model="mnist", dtype=tf.float32, shape=(1, 28, 28), version=None, name="input"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    request.inputs[name].CopyFrom(tf.make_tensor_proto(np.ones(shape), dtype=dtype))
    return request


GRPC_ERRORS = [
    # id, service, request, status code, what the message must say
    ("unknown model", "kserve", _kserve("nope"), "NOT_FOUND", UNKNOWN_NOPE),
    ("wrong dtype", "kserve", _kserve(datatype="INT32"), "INVALID_ARGUMENT",
     "must be FP32, got INT32"),
    ("wrong shape", "kserve", _kserve("keras", shape=(1, 3), count=3), "INVALID_ARGUMENT",
     "must have shape"),
    ("raw bytes vs shape", "kserve", _kserve(raw=b"\0" * 12), "INVALID_ARGUMENT",
     "needs 128 bytes"),
    ("unknown datatype", "kserve", _kserve(datatype="FP8"), "INVALID_ARGUMENT",
     "datatype 'FP8'"),
    ("model raises", "kserve", _kserve("faulty", shape=(1,), count=1), "INTERNAL",
     "refuses this input"),
    ("message too large", "kserve", _kserve(raw=b"\0" * (2 * MIB)), "RESOURCE_EXHAUSTED",
     "larger than max"),
    ("TF unknown model", "tf", _tf_predict("nope"), "NOT_FOUND", UNKNOWN_NOPE),
    ("TF unknown version", "tf", _tf_predict(version=3), "NOT_FOUND", "version 3 is not found"),
    ("TF wrong dtype", "tf", _tf_predict(dtype=tf.int32), "INVALID_ARGUMENT",
     "must be FP32, got INT32"),
    ("TF wrong input name", "tf", _tf_predict(name="pixels"), "INVALID_ARGUMENT",
     "takes inputs ['input']"),
    ("TF unsupported dtype", "tf", _tf_predict(dtype=tf.complex64), "INVALID_ARGUMENT",
     "DT_COMPLEX64 is not supported"),
]


@pytest.mark.parametrize("service, request_, code, message",
                         [case[1:] for case in GRPC_ERRORS], ids=[c[0] for c in GRPC_ERRORS])
def test_grpc_bad_requests(server, triton, service, request_, code, message):
    with grpc.insecure_channel(server.grpc["KServe v2" if service == "kserve" else
                                           "TensorFlow Serving"]) as channel:
        if service == "kserve":
            call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        else:
            call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
        with pytest.raises(grpc.RpcError) as caught:
            call(request_, timeout=30)
    assert caught.value.code() == getattr(grpc.StatusCode, code), caught.value.details()
    assert message in caught.value.details()
    assert_still_serves(triton)


def test_classify_and_regress_are_unimplemented(tf_serving, triton):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(tf_serving)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(classification_pb2.ClassificationRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Predict" in caught.value.details()
    assert_still_serves(triton)


def test_full_queue_is_resource_exhausted(server, triton):
    """sleepy: one worker, max_queue 1: of 6 calls at once some are refused."""
    assert wait_until(lambda: triton.is_model_ready("sleepy"), 60)
    results = []

    def call():
        x = np.full((1, 1), 0.5, np.float32)
        try:
            triton_infer(triton, "sleepy", x, client_timeout=30)
            results.append("OK")
        except InferenceServerException as error:
            results.append(error.status())

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "OK" in results and "StatusCode.RESOURCE_EXHAUSTED" in results, results
    assert set(results) <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, results
    assert_still_serves(triton)


@pytest.mark.parametrize("service", ["kserve", "tf"])
def test_client_deadline_becomes_deadline_exceeded_and_the_pool_recovers(
        server, triton, tf_serving, service):
    """A 0.5 s client deadline on a 3 s model run (the pool's own timeout: 20 s):
    DEADLINE_EXCEEDED, and the deadline reached the pool: it aborted the run (its worker
    replaced: a restart) instead of running it out for nobody; then it answers again."""
    assert wait_until(lambda: triton.is_model_ready("sleepy"), 60)
    restarts = _sleepy(server)["restarts"]
    if service == "kserve":
        with pytest.raises(InferenceServerException) as caught:
            triton_infer(triton, "sleepy", np.full((1, 1), 3.0, np.float32),
                         client_timeout=0.5)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    else:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "sleepy"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.full((1, 1), 3.0, np.float32)))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(tf_serving)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(request, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _sleepy(server).get("restarts", restarts) == restarts + 1, 60)
    x = np.full((1, 1), 0.01, np.float32)
    assert wait_until(lambda: triton.is_model_ready("sleepy"), 60)
    assert np.array_equal(triton_infer(triton, "sleepy", x, client_timeout=30)
                          .as_numpy("output_0"), x)
    assert_still_serves(triton)


def _sleepy(server) -> dict:
    report = json.loads(server.get("/status")[2])
    return next(m for m in report["models"] if m["name"] == "sleepy")


# -- metrics: one family, a protocol label ---------------------------------------------------
def test_metrics_count_each_protocol(server, triton, tf_serving):
    before = metric_samples(server)
    assert_still_serves(triton)  # one kserve_grpc success
    stub = prediction_service_pb2_grpc.PredictionServiceStub(tf_serving)
    with pytest.raises(grpc.RpcError):
        stub.Predict(_tf_predict(dtype=tf.int32), timeout=10)
    stub.Predict(_tf_predict(), timeout=10)
    server.post("/v1/models/mnist:predict", b'{"instances": [[1]]}')  # bad shape
    after = metric_samples(server)

    def delta(**labels):
        key = ("workerpool_requests_total", tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta(model="mlp", outcome="success", protocol="kserve_grpc") == 1
    assert delta(model="mnist", outcome="bad_request", protocol="tfserving_grpc") == 1
    assert delta(model="mnist", outcome="success", protocol="tfserving_grpc") == 1
    assert delta(model="mnist", outcome="bad_request", protocol="tfserving_rest") == 1


# -- servers of their own: API key, SIGTERM drains gRPC, a broken warm-up file ---------------
def test_api_key_no_tensorflow_and_sigterm_drain_over_grpc(tmp_path):
    """A numpy model served on both gRPC ports: the key is asked for; speaking TF Serving's
    protocol loads no TensorFlow into the server; SIGTERM lets the call in flight finish
    and refuses new ones."""
    server = Server(["serve_models:numbers", "--predict", "serve_models:sleep_then_echo",
                     "--name", "sleepy", "--workers", "1", "--grpc-port", "0",
                     "--tf-serving-port", "0", "--api-key", "k3y"], grpc_lines=2)
    try:
        server.wait_ready()
        key = [("authorization", "Bearer k3y")]
        with grpc.insecure_channel(server.grpc["TensorFlow Serving"]) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            predict = _tf_predict("sleepy", shape=(1, 1), name="x")
            with pytest.raises(grpc.RpcError) as caught:
                stub.Predict(predict, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            response = stub.Predict(predict, metadata=[("x-api-key", "k3y")], timeout=30)
            assert tf.make_ndarray(response.outputs["output_0"]).tolist() == [[1.0]]
        with open(f"/proc/{server.process.pid}/maps") as maps:
            assert "tensorflow" not in maps.read()
        with grpc.insecure_channel(server.grpc["KServe v2"]) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # open, as in HTTP
            request = _kserve("sleepy", shape=(1, 1), raw=np.float32(1.5).tobytes())
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            in_flight = stub.ModelInfer.future(request, metadata=key, timeout=30)
            time.sleep(0.5)  # the request is in the worker
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:  # draining: no new calls
                stub.ModelInfer(request, metadata=key, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            response = in_flight.result()  # finished, not cut off
            assert np.frombuffer(response.raw_output_contents[0], np.float32) == [1.5]
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def test_a_saved_model_whose_warmup_requests_fail_does_not_load(tmp_path):
    """The warm-up requests really run in the workers: a request of the wrong shape fails
    the load, and the reason names it; a corrupt file is refused by its CRC."""
    from workerpool import Pool
    from workerpool.serve.config import ConfigError, ModelSpec

    path = tmp_path / "1"
    save_mnist(path, [np.zeros((1, 5), np.float32)])  # not [n, 28, 28]
    load, predict, options = ModelSpec("mnist", str(path)).pool_arguments()
    assert len(options["warmup"]) == 1
    with pytest.raises(Exception, match="warm") as caught:
        Pool(load, predict, workers=1, **options).close()
    assert "reshape" in str(caught.value).lower() or "shape" in str(caught.value).lower()
    warmup = path / "assets.extra" / "tf_serving_warmup_requests"
    data = bytearray(warmup.read_bytes())
    data[-5] ^= 0xFF
    warmup.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="fails its CRC"):
        ModelSpec("mnist", str(path)).pool_arguments()
