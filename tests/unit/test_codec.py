"""The codec: exact round trips, validation of everything decoded, size caps."""

from __future__ import annotations

import collections

import msgpack
import numpy as np
import pytest
import torch

from workerpool.errors import EncodeError, MessageTooLarge, ProtocolError
from workerpool.ipc.codec import ALLOWED_DTYPES, Codec

CODEC = Codec(allow_pickle=True, max_message_bytes=1 << 20, zero_copy_threshold=1024)
NETWORK_CODEC = Codec(allow_pickle=False, max_message_bytes=1 << 20)


def roundtrip(value, codec=CODEC):
    header, frames = codec.encode(value)
    # what a receiver gets: independent byte buffers
    return codec.decode(header, [bytearray(memoryview(f).cast("B")) for f in frames])


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES - {"bfloat16"}))
def test_numpy_arrays_round_trip_exactly(dtype):
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    got = roundtrip(array)
    assert got.dtype == array.dtype and got.shape == array.shape
    assert np.array_equal(got, array)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.bool, torch.uint8, torch.complex64])
def test_torch_tensors_round_trip_as_tensors(dtype):
    tensor = (torch.arange(12) % 5).to(dtype).reshape(3, 4)
    got = roundtrip(tensor)
    assert isinstance(got, torch.Tensor) and got.dtype == dtype
    assert torch.equal(got, tensor)


def test_non_contiguous_and_grad_tensors_are_sent_by_value():
    tensor = torch.randn(4, 6, requires_grad=True)
    got = roundtrip((tensor.t(), tensor[:, ::2]))
    assert torch.equal(got[0], tensor.detach().t())
    assert torch.equal(got[1], tensor.detach()[:, ::2])


def test_containers_keep_their_types():
    value = {"a": (1, 2.5, "s", b"raw", None, True), 3: [np.float32(1.5), {"n": -2**63}]}
    got = roundtrip(value)
    assert got["a"] == (1, 2.5, "s", b"raw", None, True)
    assert isinstance(got["a"], tuple)
    assert got[3][0] == np.float32(1.5) and got[3][1] == {"n": -2**63}


def test_other_objects_are_pickled_only_where_allowed():
    value = collections.OrderedDict(x=1)
    assert roundtrip(value) == value and type(roundtrip(value)) is collections.OrderedDict
    with pytest.raises(EncodeError, match="cannot be sent here"):
        NETWORK_CODEC.encode(value)
    header, frames = CODEC.encode(value)
    with pytest.raises(ProtocolError, match="pickled values are refused"):
        NETWORK_CODEC.decode(header, frames)


def test_object_arrays_and_unknown_dtypes_are_refused():
    with pytest.raises(EncodeError, match="dtype object"):
        CODEC.encode(np.array([1, "a"], dtype=object))
    with pytest.raises(EncodeError, match="dtype"):
        CODEC.encode(np.zeros(2, dtype="datetime64[s]"))


def test_big_arrays_travel_without_a_copy():
    array = np.arange(4096, dtype=np.float64)
    _, frames = CODEC.encode(array)
    assert np.shares_memory(np.asarray(frames[0]), array)


def test_size_cap_is_checked_before_sending():
    with pytest.raises(MessageTooLarge, match="max_message_bytes"):
        CODEC.encode(np.zeros((1 << 20) + 1, dtype=np.uint8))


def node(code, index, dtype, shape):
    return msgpack.ExtType(code, msgpack.packb([index, dtype, shape]))


@pytest.mark.parametrize("header, frames, match", [
    (msgpack.packb(node(1, 0, "float32", [3])), [b"\0" * 8], "does not match"),
    (msgpack.packb(node(1, 0, "object", [1])), [b"\0" * 8], "not allowed"),
    (msgpack.packb(node(1, 1, "uint8", [1])), [b"\0"], "bad frame reference"),
    (msgpack.packb([node(1, 0, "uint8", [1]), node(1, 0, "uint8", [1])]), [b"\0"],
     "bad frame reference"),
    (msgpack.packb(node(1, 0, "uint8", [-1])), [b""], "bad shape"),
    (msgpack.packb(msgpack.ExtType(99, b"")), [], "unknown extension"),
    (b"\xc1", [], "undecodable"),
])
def test_malformed_messages_are_rejected(header, frames, match):
    with pytest.raises(ProtocolError, match=match):
        CODEC.decode(header, frames)


def test_decoded_arrays_can_be_aligned_for_exact_math():
    codec = Codec(allow_pickle=False, max_message_bytes=1 << 20, align_arrays=True)
    header, frames = codec.encode(np.arange(10, dtype=np.float32))
    misaligned = memoryview(bytearray(41))[1:]
    misaligned[:] = memoryview(frames[0]).cast("B")
    got = codec.decode(header, [misaligned])
    assert got.ctypes.data % 64 == 0 and np.array_equal(got, np.arange(10, dtype=np.float32))
