"""Triton compatibility as a Triton user meets it: Triton's example models (simple,
simple_string, simple_int8, repeat_int32; tests/triton_models.py) served by
`workerpool serve --config`, called with tritonclient over HTTP and gRPC the way Triton's
own client examples call them: inference sync and async, BYTES as object arrays, the
statistics and model configuration extensions, a repository load with a config override,
the error texts clients match on, and the decoupled model's stream.
"""

from __future__ import annotations

import json
import queue
import textwrap

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import grpc
from test_serve import Server

pytestmark = pytest.mark.module_pool


def tensors(datatype: str) -> str:
    spec = f'datatype = "{datatype}", shape = [-1, 16]'
    return (f'inputs = [{{name = "INPUT0", {spec}}}, {{name = "INPUT1", {spec}}}]\n'
            f'outputs = [{{name = "OUTPUT0", {spec}}}, {{name = "OUTPUT1", {spec}}}]\n')


def model_table(name: str, predict: str, datatype: str) -> str:
    """A serve.toml table for one of Triton's simple models (add/sub on ``datatype``)."""
    return textwrap.dedent(f"""
        [models.{name}]
        source = "triton_models:load"
        predict = "triton_models:{predict}"
        workers = 1
        """) + tensors(datatype)


SIMPLE = model_table("simple", "add_sub", "INT32")
SIMPLE_STRING = model_table("simple_string", "add_sub_strings", "BYTES")

CONFIG = textwrap.dedent("""
    [server]
    grpc_port = 0
    """) + SIMPLE + SIMPLE_STRING + textwrap.dedent("""
    [models.simple_int8]
    source = "triton_models:load"
    predict = "triton_models:add_sub_int8"
    workers = 1
    {int8}
    [models.repeat_int32]
    source = "triton_models:load"
    predict = "triton_models:repeat"
    workers = 1
    inputs = [{{name = "IN", datatype = "INT32", shape = [-1]}},
              {{name = "DELAY", datatype = "UINT32", shape = [-1]}},
              {{name = "WAIT", datatype = "UINT32", shape = [1]}}]
    outputs = [{{name = "OUT", datatype = "INT32", shape = [1]}},
               {{name = "IDX", datatype = "UINT32", shape = [1]}}]
""").format(int8=tensors("INT8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = tmp_path_factory.mktemp("triton") / "serve.toml"
    config.write_text(CONFIG)
    server = Server(["--config", str(config)], grpc_lines=1)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def http(server):
    client = triton_http.InferenceServerClient(server.address, concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = triton_grpc.InferenceServerClient(server.grpc["KServe v2"])
    yield client
    client.close()


A = np.arange(16, dtype=np.int32).reshape(1, 16)
B = np.ones((1, 16), dtype=np.int32)


def simple_inputs(module, a=A, b=B, datatype="INT32"):
    inputs = [module.InferInput("INPUT0", list(a.shape), datatype),
              module.InferInput("INPUT1", list(b.shape), datatype)]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def outputs(module, binary=None):
    if module is triton_http:
        return [module.InferRequestedOutput(name, binary_data=binary)
                for name in ("OUTPUT0", "OUTPUT1")]
    return [module.InferRequestedOutput(name) for name in ("OUTPUT0", "OUTPUT1")]


def check_add_sub(result, a=A, b=B):
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


# -- inference as Triton's client examples make it ------------------------------------------
@pytest.mark.parametrize("binary", [True, False])
def test_simple_over_http_sync_and_async(http, binary):
    check_add_sub(http.infer("simple", simple_inputs(triton_http),
                             outputs=outputs(triton_http, binary)))
    pending = [http.async_infer("simple", simple_inputs(triton_http),
                                outputs=outputs(triton_http, binary)) for _ in range(4)]
    for request in pending:
        check_add_sub(request.get_result())


def test_simple_over_grpc_sync_and_async(grpc_client):
    check_add_sub(grpc_client.infer("simple", simple_inputs(triton_grpc),
                                    outputs=outputs(triton_grpc)))
    answers = queue.Queue()
    for _ in range(4):
        grpc_client.async_infer("simple", simple_inputs(triton_grpc),
                                callback=lambda result, error: answers.put((result, error)),
                                outputs=outputs(triton_grpc))
    for _ in range(4):
        result, error = answers.get(timeout=60)
        assert error is None
        check_add_sub(result)


@pytest.mark.parametrize("module", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_simple_string_bytes_are_object_arrays_both_ways(module, server):
    client = module.InferenceServerClient(server.address if module is triton_http
                                          else server.grpc["KServe v2"])
    a = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    b = np.array([[b"1"] * 16], dtype=object)
    try:
        result = client.infer("simple_string", simple_inputs(module, a, b, "BYTES"))
    finally:
        client.close()
    got0, got1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert got0.dtype == object and got0.shape == (1, 16)
    assert [int(v) for v in got0.ravel()] == [i + 1 for i in range(16)]
    assert [int(v) for v in got1.ravel()] == [i - 1 for i in range(16)]


@pytest.mark.parametrize("module", [triton_http, triton_grpc], ids=["http", "grpc"])
def test_simple_int8(module, server):
    client = module.InferenceServerClient(server.address if module is triton_http
                                          else server.grpc["KServe v2"])
    a, b = A.astype(np.int8), B.astype(np.int8)
    try:
        result = client.infer("simple_int8", simple_inputs(module, a, b, "INT8"))
    finally:
        client.close()
    check_add_sub(result, a, b)


def test_typed_contents_requests_are_answered_raw_as_triton_does(server):
    """A request built with int_contents (as Triton's grpc_explicit_int_content_client
    builds it) reads its answer from raw_output_contents."""
    request = service_pb2.ModelInferRequest(model_name="simple")
    for name, values in (("INPUT0", A), ("INPUT1", B)):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents.extend(values.ravel().tolist())
    with grpc.insecure_channel(server.grpc["KServe v2"]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert len(response.raw_output_contents) == 2
    out0 = np.frombuffer(response.raw_output_contents[0], np.int32).reshape(1, 16)
    np.testing.assert_array_equal(out0, A + B)


# -- the statistics and model configuration extensions --------------------------------------
def success_count(stats: dict, name: str) -> int:
    (model,) = [m for m in stats["model_stats"] if m["name"] == name]
    return int(model["inference_stats"]["success"]["count"])


def test_statistics_over_http_and_grpc_count_the_requests(http, grpc_client):
    before = http.get_inference_statistics("simple")
    for _ in range(3):
        http.infer("simple", simple_inputs(triton_http))
    after = http.get_inference_statistics("simple")
    (model,) = after["model_stats"]
    assert model["name"] == "simple" and model["version"] == "1"
    assert success_count(after, "simple") == success_count(before, "simple") + 3
    assert int(model["inference_stats"]["success"]["ns"]) > 0
    assert int(model["execution_count"]) >= 3 and int(model["last_inference"]) > 0
    assert int(model["inference_stats"]["queue"]["count"]) >= 3
    assert int(model["inference_stats"]["compute_infer"]["ns"]) > 0
    with pytest.raises(InferenceServerException):
        http.infer("simple", simple_inputs(triton_http, A.astype(np.float32),
                                               B.astype(np.float32), "FP32"))
    failed = http.get_inference_statistics("simple")["model_stats"][0]
    assert int(failed["inference_stats"]["fail"]["count"]) >= 1
    # over gRPC the same numbers, and every model without a name
    over_grpc = grpc_client.get_inference_statistics("simple", as_json=True)
    assert success_count(over_grpc, "simple") >= success_count(after, "simple")
    every = http.get_inference_statistics()
    assert {m["name"] for m in every["model_stats"]} >= {"simple", "simple_string",
                                                          "simple_int8", "repeat_int32"}


def test_model_config_over_http_and_grpc(http, grpc_client):
    config = http.get_model_config("simple")
    assert config["name"] == "simple" and config["max_batch_size"] == 0
    assert config["input"][0] == {"name": "INPUT0", "data_type": "TYPE_INT32",
                                  "dims": [-1, 16]}
    assert config["instance_group"][0]["count"] == 1
    over_grpc = grpc_client.get_model_config("simple_string", as_json=True)["config"]
    assert over_grpc["input"][0]["data_type"] == "TYPE_STRING"
    assert [o["name"] for o in over_grpc["output"]] == ["OUTPUT0", "OUTPUT1"]


def test_a_load_with_a_config_override_changes_the_pool(http):
    http.load_model("simple_int8", config=json.dumps({"max_batch_size": 16,
                                                      "dynamic_batching": {}}))
    config = http.get_model_config("simple_int8")
    assert config["max_batch_size"] == 16
    assert config["input"][0]["dims"] == [16]  # the batch axis is Triton's, not in dims
    a, b = A.astype(np.int8), B.astype(np.int8)
    check_add_sub(http.infer("simple_int8", simple_inputs(triton_http, a, b, "INT8")), a, b)


@pytest.mark.parametrize("override, says", [
    ('{"max_batch_size": "big"}', "max_batch_size"),
    ('{"optimization": {}}', "optimization"),
    ("not json", "not JSON"),
])
def test_a_malformed_override_fails_in_tritons_words(http, grpc_client, override, says):
    for client in (http, grpc_client):
        with pytest.raises(InferenceServerException, match="failed to load 'simple'") as err:
            client.load_model("simple", config=override)
        assert says in str(err.value)
    check_add_sub(http.infer("simple", simple_inputs(triton_http)))  # still serving


def test_an_unknown_model_in_tritons_words(http, grpc_client):
    for client, module in ((http, triton_http), (grpc_client, triton_grpc)):
        with pytest.raises(InferenceServerException,
                           match="Request for unknown model: 'nope' is not found"):
            client.infer("nope", simple_inputs(module))


# -- the decoupled model: a stream of responses per request ---------------------------------
def test_repeat_int32_streams_one_response_per_element(grpc_client):
    values = np.array([4, 2, 0, 1], np.int32)
    inputs = [triton_grpc.InferInput("IN", [4], "INT32"),
              triton_grpc.InferInput("DELAY", [4], "UINT32"),
              triton_grpc.InferInput("WAIT", [1], "UINT32")]
    inputs[0].set_data_from_numpy(values)
    inputs[1].set_data_from_numpy(np.full(4, 5, np.uint32))
    inputs[2].set_data_from_numpy(np.array([5], np.uint32))
    responses = queue.Queue()
    grpc_client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        grpc_client.async_stream_infer("repeat_int32", inputs, request_id="r1",
                                       enable_empty_final_response=True)
        got = []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None
            response = result.get_response()
            assert response.id == "r1"
            if response.parameters["triton_final_response"].bool_param:
                break
            got.append((int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])))
    finally:
        grpc_client.stop_stream()
    assert got == [(int(v), i) for i, v in enumerate(values)]
