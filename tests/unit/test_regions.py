"""Shared-memory tensors (ipc/regions.py) and their codec nodes, on real POSIX shared memory:
read in place (a view of the region's pages, not a copy), written back, BYTES in Triton's
layout, and every refusal a client's region can cause, before any page is touched."""

from __future__ import annotations

import os
import uuid

import msgpack
import numpy as np
import pytest

from workerpool.errors import ProtocolError, SharedMemoryError
from workerpool.ipc import codec as codec_module
from workerpool.ipc.codec import Codec
from workerpool.ipc.regions import (PlacedCall, PlacedOutput, RegionSlot, RegionTensor,
                                    region_size, shm_path)
from workerpool.serving.errors import BadRequest
from workerpool.serving.shared_memory import (SharedInput, SharedUse, SystemSharedMemory,
                                              shared_input, shared_use)
from workerpool.tensors import serialized_bytes


@pytest.fixture
def region():
    """A POSIX shared-memory object of 1 MiB: (key, path)."""
    key = f"/wp_unit_{uuid.uuid4().hex}"
    path = shm_path(key)
    with open(path, "wb") as out:
        out.truncate(1 << 20)
    yield key, path
    if os.path.exists(path):
        os.unlink(path)


def put(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as out:
        out.seek(offset)
        out.write(data)


def get(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as source:
        source.seek(offset)
        return source.read(size)


def test_a_tensor_is_read_in_place(region):
    key, path = region
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    put(path, 4100, x.tobytes())
    array = RegionTensor(key, 4100, x.nbytes, "FP32", (10, 100)).read()
    np.testing.assert_array_equal(array, x)
    assert not array.flags.writeable and not array.flags.owndata
    put(path, 4100, np.zeros(1, np.float32).tobytes())  # the region's pages, not a copy
    assert array[0, 0] == 0 and array[0, 1] == 1


def test_bytes_tensors_in_tritons_layout(region):
    key, path = region
    values = np.array([b"a", b"", "\u00e9".encode(), b"xyz" * 100], dtype=object).reshape(2, 2)
    data = serialized_bytes(values)
    put(path, 0, data)
    read = RegionTensor(key, 0, len(data), "BYTES", (2, 2)).read()
    assert read.dtype == object and read.tolist() == values.tolist()
    with pytest.raises(SharedMemoryError, match="shape needs 5 BYTES elements, got 4"):
        RegionTensor(key, 0, len(data), "BYTES", (5,)).read()
    placed = PlacedCall(None, ["out"], {"out": RegionSlot(key, 1000, 500)}).place(values)
    assert placed["out"] == PlacedOutput("BYTES", (2, 2), len(data))
    assert get(path, 1000, len(data)) == data


def test_outputs_are_written_into_their_slots(region):
    key, path = region
    call = PlacedCall(None, ["sum", "diff"], {"sum": RegionSlot(key, 8192, 64)})
    a = np.arange(16, dtype=np.int32)
    placed = call.place((a + 1, a - 1))
    assert placed["sum"] == PlacedOutput("INT32", (16,), 64)
    np.testing.assert_array_equal(placed["diff"], a - 1)  # not placed: travels as it is
    np.testing.assert_array_equal(np.frombuffer(get(path, 8192, 64), np.int32), a + 1)
    with pytest.raises(SharedMemoryError, match="takes 64 bytes but its shared memory "
                                                "gives it 60"):
        PlacedCall(None, ["sum"], {"sum": RegionSlot(key, 0, 60)}).place(a)


def test_what_a_region_cannot_give_is_refused_before_mapping(region):
    key, path = region
    with pytest.raises(SharedMemoryError, match="holds 1048576 bytes"):
        RegionTensor(key, 1 << 20, 4, "FP32", (1,)).read()  # would be SIGBUS if mapped
    os.truncate(path, 4096)  # shrunk after registration
    with pytest.raises(SharedMemoryError, match="was it shrunk"):
        RegionTensor(key, 0, 8192, "UINT8", (8192,)).read()
    os.unlink(path)
    with pytest.raises(SharedMemoryError, match="does not exist"):
        RegionTensor(key, 0, 4, "FP32", (1,)).read()
    with pytest.raises(SharedMemoryError, match="does not exist"):
        PlacedCall(None, None, {"output_0": RegionSlot(key, 0, 4)}).place(np.ones(1, "f4"))


@pytest.mark.parametrize("key", ["", "/", "/..", "..", "/a/b", "/../etc/passwd", "a\0b", 7])
def test_keys_stay_in_dev_shm(key):
    with pytest.raises(SharedMemoryError, match="not a POSIX shared-memory name"):
        shm_path(key)


def test_a_symlink_or_a_directory_is_not_a_region(tmp_path):
    name = f"wp_unit_{uuid.uuid4().hex}"
    os.symlink("/etc/hostname", f"/dev/shm/{name}")
    try:
        with pytest.raises(SharedMemoryError, match="cannot open"):
            region_size(f"/{name}")
    finally:
        os.unlink(f"/dev/shm/{name}")
    os.mkdir(f"/dev/shm/{name}")
    try:
        with pytest.raises(SharedMemoryError):
            region_size(f"/{name}")
    finally:
        os.rmdir(f"/dev/shm/{name}")


# -- the codec's nodes ----------------------------------------------------------------------
def test_the_codec_carries_references_and_a_workers_codec_maps_them(region):
    key, path = region
    x = np.arange(64, dtype=np.int64)
    put(path, 128, x.tobytes())
    tensor = RegionTensor(key, 128, x.nbytes, "INT64", (8, 8))
    big = np.ones(100_000, np.float32)  # a frame of its own, inside the placed call
    call = PlacedCall({"a": tensor, "b": big}, ["y"], {"y": RegionSlot(key, 4096, 256)})
    sender = Codec(allow_pickle=False, max_message_bytes=1 << 20)
    header, frames = sender.encode_call([call], {})
    assert len(frames) == 1  # the region's tensor is not in the message, the array is
    frames = [frame.tobytes() for frame in frames]  # (as they arrive)
    args, _ = sender.decode_call(header, frames)
    assert args[0].argument["a"] == tensor and args[0].slots == call.slots
    worker = Codec(allow_pickle=False, max_message_bytes=1 << 20, map_regions=True)
    args, _ = worker.decode_call(header, frames)
    np.testing.assert_array_equal(args[0].argument["a"], x.reshape(8, 8))
    np.testing.assert_array_equal(args[0].argument["b"], big)
    answer = PlacedOutput("FP32", (4, 4), 64)
    assert sender.decode(*sender.encode({"y": answer})) == {"y": answer}


def test_a_worker_reports_a_missing_region_as_itself():
    worker = Codec(allow_pickle=False, max_message_bytes=1 << 20, map_regions=True)
    header, frames = worker.encode(RegionTensor("/wp_unit_missing", 0, 4, "FP32", (1,)))
    with pytest.raises(SharedMemoryError, match="does not exist"):
        worker.decode(header, frames)


@pytest.mark.parametrize("node", [
    [b"key", 0, 4, "FP32", [1]], ["k", -1, 4, "FP32", [1]], ["k", 0, 4, "FP99", [1]],
    ["k", 0, 4, "FP32", [-1]], ["k", 0, 4, "FP32"], ["k", True, 4, "FP32", [1]]])
def test_malformed_region_nodes_are_protocol_errors(node):
    header = msgpack.packb(msgpack.ExtType(codec_module._EXT_REGION, msgpack.packb(node)))
    with pytest.raises(ProtocolError):
        Codec(allow_pickle=False, max_message_bytes=1 << 20).decode(header, [])


# -- the server's table ---------------------------------------------------------------------
def test_the_servers_table_checks_bounds_and_names(region):
    key, _ = region
    table = SystemSharedMemory()
    table.register("in", key, 1024, 4096)
    with pytest.raises(BadRequest, match="already in manager"):
        table.register("in", key, 0, 16)
    with pytest.raises(BadRequest, match="holds 1048576 bytes"):
        table.register("big", key, 1024, 1 << 20)
    assert table.status() == [{"name": "in", "key": key, "offset": 1024, "byte_size": 4096}]
    use = shared_use("input 'x'", {"shared_memory_region": "in",
                                   "shared_memory_byte_size": 64,
                                   "shared_memory_offset": 4032})
    resolved = table.resolve({"x": shared_input("x", "FP32", [16], use), "y": 1})
    assert resolved == {"x": RegionTensor(key, 1024 + 4032, 64, "FP32", (16,)), "y": 1}
    with pytest.raises(BadRequest, match="Invalid offset \\+ byte size"):
        table.slot(SharedUse("in", 64, 4033))
    with pytest.raises(BadRequest, match="unexpected shared-memory byte size 60"):
        shared_input("x", "FP32", [16], SharedUse("in", 60))
    assert isinstance(shared_input("s", "BYTES", [2], SharedUse("in", 60)), SharedInput)
    for bad in ({"shared_memory_region": "in"},
                {"shared_memory_region": "in", "shared_memory_byte_size": -1},
                {"shared_memory_region": 3, "shared_memory_byte_size": 4},
                {"shared_memory_region": "in", "shared_memory_byte_size": 4,
                 "shared_memory_offset": True}):
        with pytest.raises(BadRequest):
            shared_use("input 'x'", bad)
    table.unregister("in")
    table.unregister("in")  # (unknown: no error, as in Triton)
    with pytest.raises(BadRequest, match="Unable to find system shared memory region: 'in'"):
        table.resolve({"x": shared_input("x", "FP32", [16], use)})
