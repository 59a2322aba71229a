"""The codec: exact round trips, validation of everything decoded, size caps."""

from __future__ import annotations

import collections
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch

from workerpool.errors import EncodeError, MessageTooLarge, ProtocolError
from workerpool.ipc.codec import ALLOWED_DTYPES, INLINE_ARRAY_BYTES, Codec

CODEC = Codec(allow_pickle=True, max_message_bytes=1 << 20, zero_copy_threshold=1024)
NETWORK_CODEC = Codec(allow_pickle=False, max_message_bytes=1 << 20)


def assert_same(got, want):
    """Equal values of the same types, arrays of the same dtype and shape, all the way down."""
    assert type(got) is type(want)
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)
    else:
        assert got == want


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.bool,
                                   torch.complex64, torch.bfloat16])
def test_tensors_can_arrive_as_numpy_arrays(dtype):
    # a server's pool: its process must not import torch to read a result
    tensor = (torch.randn(64, 3) * 1000).to(dtype)
    codec = Codec(allow_pickle=True, max_message_bytes=1 << 20, tensors_as_arrays=True)
    got = roundtrip({"out": [tensor]}, codec)["out"][0]
    assert type(got) is np.ndarray and got.shape == (64, 3)
    if dtype == torch.bfloat16:  # no numpy bfloat16: the same numbers as float32
        assert got.dtype == np.float32
        assert np.array_equal(got, tensor.float().numpy())
    else:
        assert np.array_equal(got, tensor.numpy())


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


def test_object_arrays_of_other_things_and_unknown_dtypes_are_refused():
    with pytest.raises(EncodeError, match="dtype object .* only as BYTES tensors"):
        CODEC.encode(np.array([1, "a"], dtype=object))
    with pytest.raises(EncodeError, match="dtype"):
        CODEC.encode(np.zeros(2, dtype="datetime64[s]"))


STRICT = Codec(allow_pickle=False, max_message_bytes=1 << 20)  # no pickling at all


@pytest.mark.parametrize("array, kind", [
    (np.array([[b"a", b"bc"], [b"\xff\x00", b""]], dtype=object), bytes),
    (np.array(["h\u00e9", "", "\U0001f600"], dtype=object), str),
    (np.array([b"ab", b"c"]), bytes),  # numpy's fixed-width S and U arrays
    (np.array(["ab", "c"]), str),
    (np.empty((0, 3), dtype=object), bytes),
    (np.array([b"x" * (INLINE_ARRAY_BYTES + 1), b"y"], dtype=object), bytes),  # a frame
])
def test_arrays_of_bytes_or_str_cross_in_their_own_framing_never_pickled(array, kind):
    header, frames = STRICT.encode({"t": array})
    got = STRICT.decode(header, frames)["t"]
    assert got.dtype == object and got.shape == array.shape
    assert got.tolist() == array.astype(object).tolist()
    assert all(type(item) is kind for item in got.ravel())


@pytest.mark.parametrize("payload, shape", [
    (b"\x05\x00\x00\x00ab", [1]),  # a length past the end
    (b"\x01\x00\x00\x00ab", [1]),  # bytes left over
    (b"\x01\x00", [1]),  # not even the lengths
])
def test_a_malformed_bytes_array_is_a_protocol_error(payload, shape):
    node = msgpack.ExtType(5, msgpack.packb([payload, "bytes", shape]))
    with pytest.raises(ProtocolError):
        STRICT.decode(msgpack.packb(node), [])


def test_object_arrays_are_pickled_where_the_codec_is_told_to():
    # serve/relay.py's codec: BYTES outputs between the server's own processes
    relay_codec = Codec(allow_pickle=True, max_message_bytes=1 << 20,
                        pickle_object_arrays=True)
    words = np.array([[b"a", b"bc"], [b"\xff", b""]], dtype=object)
    got = relay_codec.decode(*relay_codec.encode({"upper": words}))["upper"]
    assert got.dtype == object and got.shape == (2, 2) and got.tolist() == words.tolist()
    # never without pickling allowed
    assert not Codec(allow_pickle=False, max_message_bytes=1 << 20,
                     pickle_object_arrays=True).pickle_object_arrays


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
    (msgpack.packb(node(1, b"\0" * 3, "float32", [3])), [], "does not match"),
    (msgpack.packb(node(1, "0", "uint8", [1])), [b"\0"], "bad frame reference"),
    (msgpack.packb(msgpack.ExtType(99, b"")), [], "unknown extension"),
    (b"\xc1", [], "undecodable"),
])
def test_malformed_messages_are_rejected(header, frames, match):
    with pytest.raises(ProtocolError, match=match):
        CODEC.decode(header, frames)


def test_decoded_arrays_can_be_aligned_for_exact_math():
    codec = Codec(allow_pickle=False, max_message_bytes=1 << 20, align_arrays=True)
    want = np.arange(2048, dtype=np.float32)  # over INLINE_ARRAY_BYTES: a frame of its own
    header, frames = codec.encode(want)
    misaligned = memoryview(bytearray(want.nbytes + 1))[1:]
    misaligned[:] = memoryview(frames[0]).cast("B")
    got = codec.decode(header, [misaligned])
    assert got.ctypes.data % 64 == 0 and np.array_equal(got, want)
    header, frames = codec.encode(want[:10])  # inline: aligned all the same
    got = codec.decode(header, frames)
    assert not frames and got.ctypes.data % 64 == 0 and np.array_equal(got, want[:10])


@pytest.mark.parametrize("value", [
    np.arange(INLINE_ARRAY_BYTES // 8, dtype=np.float64),  # exactly the limit
    np.float32(1.5), np.array(3, dtype=np.int8), np.zeros((0, 4), np.float32),
    (np.ones(3, np.bool_), {"k": np.arange(4, dtype=np.uint64)}),
], ids=["at the limit", "numpy scalar", "0-d", "empty", "nested"])
def test_small_arrays_travel_inside_the_header(value):
    header, frames = CODEC.encode(value)
    assert frames == []
    assert_same(CODEC.decode(header, frames), value)


def test_arrays_over_the_inline_limit_get_a_frame():
    value = np.arange(INLINE_ARRAY_BYTES // 8 + 1, dtype=np.float64)
    header, frames = CODEC.encode(value)
    assert len(frames) == 1 and len(header) < 100
    assert_same(roundtrip(value), value)


def test_calls_round_trip_with_their_inner_tuples():
    args = (1.0, (2, "t"), np.arange(3, dtype=np.int32))
    kwargs = {"k": (np.float32(0.5),), "n": None}
    header, frames = CODEC.encode_call(args, kwargs)
    got_args, got_kwargs = CODEC.decode_call(header, frames)
    assert_same(tuple(got_args), args)
    assert_same(got_kwargs, kwargs)
    with pytest.raises(ProtocolError, match=r"not \[args, kwargs\]"):
        CODEC.decode_call(*CODEC.encode((1, 2)))


def test_encoding_arrays_leaves_numpy_ma_unimported():
    """Asking whether a value is a masked array must not import numpy.ma: measured, it
    adds 1.2 MiB to every worker (more where it touches numpy's shared objects)."""
    script = ("import sys, numpy as np\n"
              "from workerpool.ipc.codec import Codec\n"
              "Codec(allow_pickle=True, max_message_bytes=1 << 20).encode([np.ones(3), np.int8(1)])\n"
              "print('numpy.ma' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False"]
    with pytest.raises(EncodeError, match="masked arrays"):
        CODEC.encode(np.ma.masked_array([1.0, 2.0], mask=[0, 1]))


def test_a_message_leaves_nothing_for_the_garbage_collector():
    # Each encode and decode once left a reference cycle (its nested helpers held each
    # other): through workers, collecting them was ~9 us of every light request's CPU.
    import gc

    value = [{"x": np.ones((2, 3)), "big": np.arange(4096.0)}, ("a", 1), np.float32(2),
             collections.OrderedDict(k=1)]
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            assert_same(roundtrip(value), value)
        gc.collect()
        left = [o for o in gc.garbage
                if getattr(o, "__qualname__", "").startswith("Codec.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
