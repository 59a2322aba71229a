"""Triton's system shared memory extension, the server's part: the regions clients register,
and a request's tensors in them resolved to what a worker maps (ipc/regions.py).

    register(name, key, offset, byte_size)  the object must exist and hold offset +
                                            byte_size; the server opens it to check, never
                                            maps it
    unregister(name)  /  unregister()       one region, or every one
    status(name)  /  status()               [{name, key, offset, byte_size}]
    a request's input  {shared_memory_region, shared_memory_byte_size[, shared_memory_offset]}
        -> SharedInput -> resolve() -> RegionTensor (the worker reads it in place)
    a requested output with the same parameters
        -> SharedOutput -> slot() -> RegionSlot (the worker writes the output there)

A region is resolved when a request arrives: unregistering it afterwards does not touch that
request (the worker opens the key itself), and a later request naming it gets 400. The
tensor's bytes never pass through the server, so a region's tensors are not bounded by
--max-request-bytes (nor by the pool's max_message_bytes): the region bounds them. Texts
follow Triton's, which its clients show.
"""

from __future__ import annotations

import dataclasses
import math
import threading

from ..errors import SharedMemoryError
from ..ipc.regions import RegionSlot, RegionTensor, region_size
from ..signature import DATATYPES
from .errors import BadRequest

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"


@dataclasses.dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SharedUse:
    """A request's tensor in a region: ``byte_size`` bytes at ``offset`` into the region
    ``region`` (a registered name)."""

    region: str
    byte_size: int
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class SharedInput:
    """An input whose data is in a region, as a protocol decoded it."""

    use: SharedUse
    datatype: str
    shape: tuple


def shared_use(what: str, parameters: dict) -> SharedUse | None:
    """The region a tensor's parameters name (None: none); BadRequest for malformed ones.
    ``what``: "input 'x'" or "output 'y'"."""
    if REGION not in parameters:
        return None
    region = parameters[REGION]
    size = parameters.get(BYTE_SIZE)
    offset = parameters.get(OFFSET, 0)
    if not isinstance(region, str) or not region:
        raise BadRequest(f"{what}: {REGION} must be the name of a registered region")
    for field, value in ((BYTE_SIZE, size), (OFFSET, offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(f"{what}: {field} must be a non-negative int, got {value!r}")
    return SharedUse(region, size, offset)


def shared_input(name: str, datatype: str, shape: list, use: SharedUse) -> SharedInput:
    """An input in a region; its byte size must be the tensor's (BYTES: any)."""
    if datatype != "BYTES":
        expected = math.prod(shape) * DATATYPES[datatype].itemsize
        if use.byte_size != expected:
            raise BadRequest(f"input {name!r}: unexpected shared-memory byte size "
                             f"{use.byte_size}, expecting {expected} for shape {shape} of "
                             f"{datatype}")
    return SharedInput(use, datatype, tuple(shape))


class SystemSharedMemory:
    """The regions registered with this server (every protocol's, one table)."""

    def __init__(self):
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()  # (gRPC and HTTP handlers, repository threads)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not isinstance(name, str) or not name:
            raise BadRequest("a shared memory region needs a name")
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadRequest(f"shared memory region '{name}': {field} must be a "
                                 f"non-negative int, got {value!r}")
        try:
            size = region_size(key)
        except SharedMemoryError as exc:
            raise BadRequest(f"failed to register shared memory region '{name}': "
                             f"{exc}") from None
        if offset + byte_size > size:
            raise BadRequest(f"failed to register shared memory region '{name}': {key!r} "
                             f"holds {size} bytes, not offset {offset} + byte_size "
                             f"{byte_size}")
        region = Region(name, key, offset, byte_size)
        with self._lock:
            if name in self._regions:
                raise BadRequest(f"shared memory region '{name}' already in manager")
            self._regions[name] = region
        return region

    def unregister(self, name: str | None = None) -> None:
        """Forget ``name`` (every region without one); an unknown name is no error."""
        with self._lock:
            if name:
                self._regions.pop(name, None)
            else:
                self._regions.clear()

    def status(self, name: str | None = None) -> list[dict]:
        with self._lock:
            if not name:
                return [region.as_dict() for region in self._regions.values()]
            return [self._region(name).as_dict()]

    def _region(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise BadRequest(f"Unable to find system shared memory region: '{name}'")
        return region

    def _located(self, use: SharedUse, size: int) -> tuple[str, int]:
        """(key, offset in the object) of ``size`` bytes at ``use`` within its region."""
        with self._lock:
            region = self._region(use.region)
        if use.offset + size > region.byte_size:
            raise BadRequest(f"Invalid offset + byte size for shared memory region: "
                             f"'{use.region}' ({use.offset} + {size} > {region.byte_size})")
        return region.key, region.offset + use.offset

    def resolve(self, inputs: dict) -> dict:
        """``inputs`` with each SharedInput replaced by the RegionTensor a worker reads."""
        resolved = {}
        for name, value in inputs.items():
            if type(value) is SharedInput:
                key, offset = self._located(value.use, value.use.byte_size)
                value = RegionTensor(key, offset, value.use.byte_size, value.datatype,
                                     value.shape)
            resolved[name] = value
        return resolved

    def slot(self, use: SharedUse) -> RegionSlot:
        """Where a worker writes an output placed at ``use``."""
        key, offset = self._located(use, use.byte_size)
        return RegionSlot(key, offset, use.byte_size)
