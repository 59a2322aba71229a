"""Tensors in shared-memory regions a client created (Triton's system shared memory): the
worker reads inputs in place and writes outputs there; the server only names them.

    server (serving/shared_memory.py)          worker (ipc/codec.py, workers/runner.py)
      a registered region + a request's use
        --RegionTensor(key, offset, nbytes, -->  mapped read-only: predict gets a numpy view
                       datatype, shape)          of the client's pages (no copy anywhere)
        --PlacedCall(argument, output names, --> predict(argument); each placed output is
                     {output: RegionSlot})       written into its region, and
        <--PlacedOutput(datatype, shape, nbytes)  travels back in its place

A key is a POSIX shared-memory name as ``shm_open`` takes it ("/name"; the file
/dev/shm/name). Every mapping is opened by name when a request uses it and unmapped when
the last array over it is dropped: a region its client unregisters or unlinks meanwhile
stays valid for the request that has it mapped, and the next request that names it gets
SharedMemoryError. The file's size is checked before mapping (a read past its end would be
SIGBUS in the worker).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import stat

import numpy as np

from ..errors import SharedMemoryError
from ..signature import DATATYPES, datatype_of
from ..tensors import (as_tensor, bytes_tensor, output_items, serialized_bytes,
                       split_serialized_bytes)

SHM_DIR = "/dev/shm"


def shm_path(key: str) -> str:
    """The file of the POSIX shared-memory object ``key``; SharedMemoryError for a name
    shm_open would refuse (or one that would leave /dev/shm)."""
    name = key.lstrip("/") if isinstance(key, str) else ""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise SharedMemoryError(f"{key!r} is not a POSIX shared-memory name: give the key "
                                "the region was created with ('/name', as shm_open takes)")
    return os.path.join(SHM_DIR, name)


def region_size(key: str) -> int:
    """The size in bytes of the shared-memory object ``key`` (it is opened, not mapped)."""
    fd, size = _open(key, writable=False)
    os.close(fd)
    return size


def _open(key: str, writable: bool) -> tuple[int, int]:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(shm_path(key), flags)
    except FileNotFoundError:
        raise SharedMemoryError(f"shared memory {key!r} does not exist (was it unlinked by "
                                "its creator?)") from None
    except OSError as exc:
        raise SharedMemoryError(f"cannot open shared memory {key!r}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SharedMemoryError(f"{key!r} is not a shared-memory object")
    return fd, info.st_size


def _map(key: str, offset: int, nbytes: int, writable: bool) -> tuple[mmap.mmap, int]:
    """A mapping of ``nbytes`` at ``offset`` of ``key``, and where they start in it."""
    fd, size = _open(key, writable)
    try:
        if offset + nbytes > size:
            raise SharedMemoryError(
                f"shared memory {key!r} holds {size} bytes: {nbytes} bytes at offset {offset} "
                "do not fit (was it shrunk after it was registered?)")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        access = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapping = mmap.mmap(fd, offset + nbytes - start, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                            access, offset=start)
    finally:
        os.close(fd)
    return mapping, offset - start


@dataclasses.dataclass(frozen=True)
class RegionTensor:
    """An input tensor in a client's region: ``nbytes`` at ``offset`` of the object
    ``key``, of a KServe ``datatype`` (BYTES: serialized as Triton lays it out)."""

    key: str
    offset: int
    nbytes: int
    datatype: str
    shape: tuple

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]

    def read(self) -> np.ndarray:
        """The tensor: a read-only view of the region's pages (BYTES: an object array of
        bytes, copied out of them)."""
        count = math.prod(self.shape)
        if self.nbytes == 0:
            return np.empty(self.shape, dtype=self.dtype)
        mapping, start = _map(self.key, self.offset, self.nbytes, writable=False)
        if self.datatype == "BYTES":
            with memoryview(mapping) as view:
                try:
                    items = split_serialized_bytes(view[start:start + self.nbytes], count)
                except ValueError as exc:
                    raise SharedMemoryError(f"the BYTES tensor in shared memory {self.key!r}: "
                                            f"{exc}") from None
            mapping.close()
            return bytes_tensor(items, list(self.shape))
        dtype = self.dtype.newbyteorder("<")
        return np.frombuffer(mapping, dtype=dtype, count=count, offset=start).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class RegionSlot:
    """Where an output goes: at most ``byte_size`` bytes at ``offset`` of ``key``."""

    key: str
    offset: int
    byte_size: int


@dataclasses.dataclass(frozen=True)
class PlacedOutput:
    """An output a worker wrote into its region: what the answer says of it."""

    datatype: str
    shape: tuple
    nbytes: int

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]


@dataclasses.dataclass(frozen=True)
class PlacedCall:
    """A call whose outputs named in ``slots`` are written into regions by the worker.
    ``names``: the model's output names, to name a tuple's outputs (None: output_0..k)."""

    argument: object
    names: list | None
    slots: dict

    def place(self, output) -> dict:
        """predict's ``output`` by name, the placed ones written and replaced by their
        PlacedOutput."""
        return {name: write(self.slots[name], name, value) if name in self.slots else value
                for name, value in output_items(output, self.names)}


def write(slot: RegionSlot, name: str, value) -> PlacedOutput:
    """Write the output ``name`` into ``slot``; SharedMemoryError if it does not fit."""
    try:
        array = as_tensor(name, value)
    except ValueError as exc:
        raise SharedMemoryError(str(exc)) from None
    datatype = datatype_of(array.dtype)
    if datatype == "BYTES":
        data = np.frombuffer(serialized_bytes(array), dtype=np.uint8)
    else:
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1)
        data = data.view(np.uint8)
    if data.nbytes > slot.byte_size:
        raise SharedMemoryError(
            f"output {name!r} takes {data.nbytes} bytes but its shared memory gives it "
            f"{slot.byte_size}: register a larger region, or ask for the output without one")
    if data.nbytes:
        mapping, start = _map(slot.key, slot.offset, data.nbytes, writable=True)
        target = np.frombuffer(mapping, dtype=np.uint8, count=data.nbytes, offset=start)
        target[:] = data
        del target
        mapping.close()
    return PlacedOutput(datatype, tuple(array.shape), int(data.nbytes))
