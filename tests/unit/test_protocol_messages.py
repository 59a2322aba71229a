"""The gRPC front ends' messages against the real client packages' own.

TensorProto conversion (numpy only, in the server) is checked against TensorFlow's own
writer and reader (tf.make_tensor_proto, tf.make_ndarray), in both the tensor_content and
the typed-field forms; KServe typed contents against tritonclient's messages; the warm-up
file reader against tf.io.TFRecordWriter. Messages cross as bytes, as they do on the wire.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from tensorflow.core.framework import tensor_pb2  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402

from workerpool.serving.errors import BadRequest  # noqa: E402
from workerpool.serve.proto import protocol  # noqa: E402
from workerpool.serve.proto.tensor import from_array, to_array  # noqa: E402
from workerpool.serve.tf_warmup import WarmupError, records  # noqa: E402
from workerpool.serve.grpc.kserve import (decode_inputs, encode_outputs,  # noqa: E402
                                         serialized_with_raw)

LIMIT = 64 * 1024 * 1024  # what one tensor may decode to (--max-request-bytes)
DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
          np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
# the typed field TensorFlow reads each dtype from
TYPED_FIELD = {np.float32: "float_val", np.float64: "double_val", np.float16: "half_val",
               np.int8: "int_val", np.int16: "int_val", np.int32: "int_val",
               np.int64: "int64_val", np.uint8: "int_val", np.uint16: "int_val",
               np.uint32: "uint32_val", np.uint64: "uint64_val", np.bool_: "bool_val"}


def ours(name: str, tf_message):
    """A TensorFlow message as our own class parses it from its bytes."""
    return protocol("tf_serving").message(name).FromString(tf_message.SerializeToString())


def sample(dtype, shape=(2, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype is np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def test_our_datatype_enum_is_tensorflows():
    from tensorflow.core.framework import types_pb2

    ours_ = protocol("tf_serving").enum_values("tensorflow.DataType")
    theirs = dict(types_pb2.DataType.items())
    assert {name: ours_[name] for name in theirs if name in ours_} == \
        {name: theirs[name] for name in theirs if name in ours_}
    for dtype in DTYPES:  # every dtype we convert, by TensorFlow's number
        assert tf.as_dtype(dtype).as_datatype_enum in ours_.values()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tensor_content_from_make_tensor_proto(dtype):
    x = sample(dtype)
    got = to_array("x", ours("tensorflow.TensorProto", tf.make_tensor_proto(x)), LIMIT)
    assert got.dtype == x.dtype and np.array_equal(got, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_typed_fields_read_as_tensorflow_reads_them(dtype):
    x = sample(dtype)
    proto = tensor_pb2.TensorProto(dtype=tf.as_dtype(dtype).as_datatype_enum)
    proto.tensor_shape.dim.extend([proto.tensor_shape.Dim(size=s) for s in x.shape])
    values = x.view(np.uint16) if dtype is np.float16 else x
    getattr(proto, TYPED_FIELD[dtype]).extend(values.ravel().tolist())
    want = tf.make_ndarray(proto)
    got = to_array("x", ours("tensorflow.TensorProto", proto), LIMIT)
    assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_outputs_read_back_by_make_ndarray(dtype):
    x = sample(dtype)
    tensor = protocol("tf_serving").message("tensorflow.TensorProto")()
    from_array(x, tensor)
    got = tf.make_ndarray(tensor_pb2.TensorProto.FromString(tensor.SerializeToString()))
    assert got.dtype == x.dtype and np.array_equal(got, x)


def test_strings_both_ways_and_one_value_fills_the_shape():
    words = np.array([[b"alpha", b"be"], [b"\xce\xb3", b""]], dtype=object)
    got = to_array("s", ours("tensorflow.TensorProto", tf.make_tensor_proto(words)), LIMIT)
    assert got == words.tolist()
    tensor = protocol("tf_serving").message("tensorflow.TensorProto")()
    from_array(words, tensor)
    back = tf.make_ndarray(tensor_pb2.TensorProto.FromString(tensor.SerializeToString()))
    assert back.tolist() == words.tolist()
    filled = to_array("f", ours("tensorflow.TensorProto",
                                tf.make_tensor_proto(1.5, dtype=tf.float32, shape=[2, 3])), LIMIT)
    assert np.array_equal(filled, np.full((2, 3), 1.5, np.float32))
    # a fill up to the limit is what an honest client could have sent whole; past it, no
    with pytest.raises(BadRequest, match="one value would fill shape"):
        to_array("f", ours("tensorflow.TensorProto", tf.make_tensor_proto(
            1.5, dtype=tf.float32, shape=[2, 3])), 23)
    assert to_array("f", ours("tensorflow.TensorProto", tf.make_tensor_proto(
        1.5, dtype=tf.float32, shape=[2, 3])), 24).shape == (2, 3)


@pytest.mark.parametrize("make, message", [
    (lambda: tf.make_tensor_proto(np.ones(3, np.complex64)), "DT_COMPLEX64 is not supported"),
    (lambda: _content(np.ones(4, np.float32), shape=[5]), "needs 20 bytes"),
    (lambda: _typed(tf.float32, "float_val", [1.0, 2.0], [3]), "needs 3 values"),
    (lambda: _typed(tf.int8, "int_val", [300], [1]), "do not fit int8"),
    (lambda: _typed(tf.string, "string_val", [b"a", b"b"], [3]), "needs 3 strings"),
])
def test_bad_tensors_are_bad_requests(make, message):
    with pytest.raises(BadRequest, match=message):
        to_array("x", ours("tensorflow.TensorProto", make()), LIMIT)


def _content(x, shape):
    proto = tf.make_tensor_proto(x)
    del proto.tensor_shape.dim[:]
    proto.tensor_shape.dim.extend([proto.tensor_shape.Dim(size=s) for s in shape])
    return proto


def _typed(dtype, field, values, shape):
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    proto.tensor_shape.dim.extend([proto.tensor_shape.Dim(size=s) for s in shape])
    getattr(proto, field).extend(values)
    return proto


# -- KServe v2 typed contents, as tritonclient's messages write them -------------------------
KSERVE = [("FP32", np.float32, "fp32_contents"), ("FP64", np.float64, "fp64_contents"),
          ("INT8", np.int8, "int_contents"), ("INT16", np.int16, "int_contents"),
          ("INT32", np.int32, "int_contents"), ("INT64", np.int64, "int64_contents"),
          ("UINT8", np.uint8, "uint_contents"), ("UINT16", np.uint16, "uint_contents"),
          ("UINT32", np.uint32, "uint_contents"), ("UINT64", np.uint64, "uint64_contents"),
          ("BOOL", np.bool_, "bool_contents")]


@pytest.mark.parametrize("datatype, dtype, field", KSERVE, ids=[k[0] for k in KSERVE])
def test_kserve_typed_contents_in_raw_contents_out(datatype, dtype, field):
    x = sample(dtype)
    request = service_pb2.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(x.shape))
    getattr(tensor.contents, field).extend(x.ravel().tolist())
    ours_ = protocol("triton").message("inference.ModelInferRequest")
    got = decode_inputs(ours_.FromString(request.SerializeToString()), LIMIT)["x"]
    assert got.dtype == x.dtype and np.array_equal(got, x)
    response = protocol("triton").message("inference.ModelInferResponse")()
    theirs = service_pb2.ModelInferResponse.FromString(
        serialized_with_raw(response, encode_outputs(response, {"y": x})))
    # answered raw whatever the request used, as Triton answers
    assert not theirs.outputs[0].HasField("contents")
    raw = np.frombuffer(theirs.raw_output_contents[0], np.dtype(dtype).newbyteorder("<"))
    assert np.array_equal(raw.reshape(x.shape), x)


def test_kserve_fp16_goes_raw_and_mixed_forms_are_refused():
    x = sample(np.float16)
    response = protocol("triton").message("inference.ModelInferResponse")()
    theirs = service_pb2.ModelInferResponse.FromString(
        serialized_with_raw(response, encode_outputs(response, {"y": x})))
    assert np.array_equal(np.frombuffer(theirs.raw_output_contents[0], "<f2")
                          .reshape(x.shape), x)
    request = protocol("triton").message("inference.ModelInferRequest")()
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    request.raw_input_contents.append(np.float32(1).tobytes())
    with pytest.raises(BadRequest, match="not both"):
        decode_inputs(request, LIMIT)


# -- TF Serving's warm-up file: TFRecord framing ---------------------------------------------
def test_tfrecords_written_by_tensorflow_read_back_and_corruption_is_caught(tmp_path):
    path = str(tmp_path / "records")
    payloads = [b"", b"one", bytes(range(256)) * 40]
    with tf.io.TFRecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)
    assert list(records(path)) == payloads
    data = bytearray(open(path, "rb").read())
    data[30] ^= 0x01  # inside the second payload
    open(path, "wb").write(bytes(data))
    with pytest.raises(WarmupError, match="CRC"):
        list(records(path))
    open(path, "wb").write(bytes(data[:20]))
    with pytest.raises(WarmupError, match="cut off|CRC"):
        list(records(path))


@pytest.mark.parametrize("sizes", [[0], [3], [200], [20_000, 5], [1 << 21, 0, 130]])
def test_an_answer_serialized_with_raw_contents_is_the_message_tritonclient_reads(sizes):
    """serialized_with_raw appends the tensors to the message's bytes; tritonclient's own
    ModelInferResponse parses them as the outputs in order (varint lengths of 1-3 bytes,
    an empty tensor, a BYTES tensor)."""
    rng = np.random.default_rng(len(sizes))
    arrays = {f"out{i}": rng.standard_normal(n).astype(np.float32)
              for i, n in enumerate(sizes)}
    arrays["words"] = np.array([b"a", b"bc"], dtype=object)
    response = protocol("triton").message("inference.ModelInferResponse")(
        model_name="m", model_version="1", id="r")
    raw = encode_outputs(response, arrays)
    answer = service_pb2.ModelInferResponse.FromString(serialized_with_raw(response, raw))
    assert (answer.model_name, answer.model_version, answer.id) == ("m", "1", "r")
    assert [o.name for o in answer.outputs] == list(arrays)
    for i, n in enumerate(sizes):
        assert np.frombuffer(answer.raw_output_contents[i], np.float32).tobytes() == \
            arrays[f"out{i}"].tobytes()
    assert answer.raw_output_contents[-1] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"
