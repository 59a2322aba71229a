"""Values <-> (header bytes, raw frames): how requests and results cross the ZeroMQ link.

The header is msgpack; arrays (numpy, torch CPU tensors) become an extension node holding
their bytes (up to INLINE_ARRAY_BYTES) or naming a frame index, with dtype and shape; larger
arrays travel as their own frame, without a copy above ``zero_copy_threshold``. Arrays of
bytes or of str (object arrays, as Triton's clients and Python backend hold BYTES tensors,
and numpy's fixed-width S/U arrays) travel in a framing of their own: every element's
length (u32, little-endian), then the elements, never pickled; they arrive as object
arrays of bytes (or str). A tensor in a client's shared-memory region, a call whose outputs
go to regions, and an output written into one travel as references (ipc/regions.py); a
worker's codec (``map_regions``) decodes the first as the array in the region, read in
place. Tuples keep their type. Other objects are pickled, and only when
the codec is built with ``allow_pickle=True``: the pool's own ipc link (a 0700 directory of
the same user); an object whose unpickling raises gives its own exception, with a note
saying where. Decoding validates every array node: dtype on the allow-list, frame index
used once, bytes equal to shape x itemsize.

What round-trips exactly and what is converted (docs/python-api.md, "Inputs and outputs"):
0-d arrays and tensors keep shape ``()``; a numpy scalar comes back a numpy scalar of its
dtype; arrays in non-native byte order (``>f4``) are converted to native order (same
values); ``np.matrix`` and other ndarray subclasses arrive as plain ndarrays, numpy strings
as str/bytes; tensors lose ``requires_grad`` (they are detached); bytearray and memoryview
arrive as bytes. Masked arrays are refused: dropping the mask would change the values a
model sees.
"""

from __future__ import annotations

import math
import pickle

import msgpack
import numpy as np

from ..errors import EncodeError, MessageTooLarge, ProtocolError, SharedMemoryError
from ..modules import imported
from ..signature import DATATYPES
from .regions import PlacedCall, PlacedOutput, RegionSlot, RegionTensor

_EXT_NDARRAY = 1
_EXT_TENSOR = 2
_EXT_TUPLE = 3
_EXT_PICKLE = 4
_EXT_STRINGS = 5
_EXT_REGION = 6
_EXT_PLACED_CALL = 7
_EXT_PLACED_OUTPUT = 8
_LENGTHS = np.dtype("<u4")

ALLOWED_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64", "complex64", "complex128", "bfloat16"])

_TORCH_TO_NAME = None  # filled lazily: torch dtype -> our dtype name


class Codec:
    """Encodes values for one link; one instance per process side is enough."""

    def __init__(self, *, allow_pickle: bool, max_message_bytes: int,
                 zero_copy_threshold: int = 64 * 1024, align_arrays: bool = False,
                 tensors_as_arrays: bool = False, pickle_object_arrays: bool = False,
                 map_regions: bool = False):
        self.allow_pickle = allow_pickle
        # Decode a tensor in a shared-memory region as the array there (mapped: a worker)
        # rather than as its RegionTensor reference.
        self.map_regions = map_regions
        # Object arrays (BYTES tensors) pickled whole, where both ends are this server's
        # processes (serve/relay.py); the pool's link refuses them (predict's outputs are
        # converted before they travel).
        self.pickle_object_arrays = pickle_object_arrays and allow_pickle
        # Decode torch tensors as numpy arrays (bfloat16 widened to float32, exactly): for a
        # process that must not import torch to read a result.
        self.tensors_as_arrays = tensors_as_arrays
        # Math libraries pick kernels by address alignment (MKL gave different low bits for
        # the same input at 4 bytes past a 16-byte boundary); where results must equal an
        # in-process call (in workers), arrays are moved to 64-byte aligned memory.
        self.align_arrays = align_arrays
        self.max_message_bytes = max_message_bytes
        self.zero_copy_threshold = zero_copy_threshold

    # -- encoding -----------------------------------------------------------------------
    def encode_call(self, args: tuple, kwargs: dict) -> tuple[bytes, list]:
        """:meth:`encode` of a call's arguments; :meth:`decode_call` gives them back. The
        outer pair and ``args`` travel as plain lists (``*args`` takes either), which
        spares two nested packs per request; tuples inside them keep their type."""
        return self.encode([list(args), kwargs])

    def decode_call(self, header, frames: list) -> tuple[list, dict]:
        """``(args, kwargs)`` of a call encoded by :meth:`encode_call`."""
        call = self.decode(header, frames)
        if not (isinstance(call, list) and len(call) == 2 and isinstance(call[0], list)
                and isinstance(call[1], dict)):
            raise ProtocolError("a call's body is not [args, kwargs]")
        return call[0], call[1]

    def encode(self, value) -> tuple[bytes, list]:
        """Return ``(header, frames)``; frames are buffers to send as they are."""
        frames: list = []

        def default(obj):
            if type(obj) is tuple:
                return msgpack.ExtType(_EXT_TUPLE, pack(list(obj), **NESTED))
            if _is_masked_array(obj):
                raise EncodeError(
                    "numpy masked arrays (np.ma.MaskedArray) cannot cross the pool's link: "
                    "the mask would be lost; send .filled(value) or the data and the mask "
                    "as two arrays")
            if isinstance(obj, np.ndarray):
                if obj.dtype.kind in "OSU":
                    if self.pickle_object_arrays and obj.dtype.kind == "O":
                        return self._pickle_node(obj, frames)
                    return self._strings_node(obj, frames)
                return self._array_node(_EXT_NDARRAY, obj, dtype_name(obj.dtype), frames)
            if isinstance(obj, (np.str_, np.bytes_)):
                return str(obj) if isinstance(obj, str) else bytes(obj)
            if isinstance(obj, np.generic):
                return self._array_node(_EXT_NDARRAY, np.asarray(obj), dtype_name(obj.dtype),
                                        frames, scalar=True)
            if _is_torch_tensor(obj):
                array, name = _tensor_as_array(obj)
                return self._array_node(_EXT_TENSOR, array, name, frames)
            if type(obj) is RegionTensor:
                return msgpack.ExtType(_EXT_REGION, msgpack.packb(
                    [obj.key, obj.offset, obj.nbytes, obj.datatype, list(obj.shape)],
                    **NESTED))
            if type(obj) is PlacedOutput:
                return msgpack.ExtType(_EXT_PLACED_OUTPUT, msgpack.packb(
                    [obj.datatype, list(obj.shape), obj.nbytes], **NESTED))
            if type(obj) is PlacedCall:
                slots = {name: [slot.key, slot.offset, slot.byte_size]
                         for name, slot in obj.slots.items()}
                return msgpack.ExtType(_EXT_PLACED_CALL,
                                       pack([obj.argument, obj.names, slots], **NESTED))
            # Anything else, subclasses of builtins included (IntEnum, OrderedDict,
            # namedtuple): only pickle keeps their type.
            return self._pickle_node(obj, frames)

        def pack(obj, **buffer):
            return msgpack.packb(obj, default=default, strict_types=True, use_bin_type=True,
                                 **buffer)

        try:
            header = pack(value)
        except (EncodeError, MessageTooLarge):
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"cannot encode a value of type {type(value).__name__}: {exc}") \
                from exc
        finally:
            # default and pack hold each other (a reference cycle per message): broken
            # here, they die now, not in a garbage collection (through workers, the
            # collector's passes were ~9 us of each light request's CPU)
            default = pack = None  # noqa: F841
        total = len(header) + sum(frame_nbytes(f) for f in frames)
        if total > self.max_message_bytes:
            raise MessageTooLarge(
                f"message of {total} bytes exceeds max_message_bytes={self.max_message_bytes}; "
                "split the input into smaller requests or raise max_message_bytes")
        return header, frames

    def _array_node(self, ext, array: np.ndarray, dtype_name: str, frames: list,
                    scalar: bool = False):
        if dtype_name not in ALLOWED_DTYPES:
            raise EncodeError(
                f"arrays of dtype {dtype_name} cannot cross the pool's link; use one of "
                f"{sorted(ALLOWED_DTYPES)}")
        array = _native_contiguous(array)
        if array.nbytes <= INLINE_ARRAY_BYTES:
            where = array.tobytes()  # in the header: no frame of its own
        else:
            frames.append(array if array.nbytes >= self.zero_copy_threshold
                          else array.tobytes())
            where = len(frames) - 1
        node = [where, dtype_name, list(array.shape)]
        if scalar:
            node.append(True)
        return msgpack.ExtType(ext, msgpack.packb(node, **NESTED))

    def _strings_node(self, array: np.ndarray, frames: list):
        """An array of bytes or of str: the elements' lengths, then the elements."""
        items = np.asarray(array).ravel().tolist()
        if all(isinstance(item, bytes) for item in items):
            kind = "bytes"
        elif all(isinstance(item, str) for item in items):
            kind, items = "str", [item.encode("utf-8", "surrogatepass") for item in items]
        else:
            kinds = sorted({type(item).__name__ for item in items})
            raise EncodeError(
                f"arrays of dtype object cross the pool's link only as BYTES tensors, every "
                f"element bytes (or every one str); this one holds {kinds[:5]}: send such "
                "values in a list, or as arrays of a numeric dtype")
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        if lengths.size and lengths.max() >= 1 << 32:
            raise EncodeError("an element of a bytes array is 4 GiB or more")
        payload = lengths.astype(_LENGTHS).tobytes() + b"".join(items)
        if len(payload) <= INLINE_ARRAY_BYTES:
            where = payload
        else:
            frames.append(payload)
            where = len(frames) - 1
        return msgpack.ExtType(_EXT_STRINGS, msgpack.packb([where, kind, list(array.shape)],
                                                           **NESTED))

    def _pickle_node(self, obj, frames: list):
        if not self.allow_pickle:
            raise EncodeError(f"values of type {type(obj).__name__} cannot be sent here; "
                              "send arrays, numbers, strings, lists and dicts")
        try:
            frames.append(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as exc:
            raise EncodeError(f"cannot pickle a value of type {type(obj).__name__}: {exc}") \
                from exc
        return msgpack.ExtType(_EXT_PICKLE, msgpack.packb(len(frames) - 1, **NESTED))

    # -- decoding -----------------------------------------------------------------------
    def decode(self, header, frames: list):
        """Inverse of :meth:`encode`; ``frames`` are zmq Frames or bytes-like objects."""
        used: set[int] = set()

        def take(index):
            if not isinstance(index, int) or not 0 <= index < len(frames) or index in used:
                raise ProtocolError(f"bad frame reference {index!r}")
            used.add(index)
            frame = frames[index]
            return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)

        def ext_hook(code, data):
            if code == _EXT_TUPLE:
                return tuple(unpack(data))
            if code in (_EXT_NDARRAY, _EXT_TENSOR):
                where, dtype_name, shape, *flags = msgpack.unpackb(data)
                buffer = where if isinstance(where, bytes) else take(where)
                array = _array_from_buffer(buffer, dtype_name, shape)
                if self.align_arrays and array.ctypes.data % ARRAY_ALIGNMENT:
                    array = aligned_copy(array)
                if code == _EXT_TENSOR:
                    if self.tensors_as_arrays:
                        return bfloat16_as_float32(array) if dtype_name == "bfloat16" \
                            else array
                    return _array_as_tensor(array, dtype_name)
                return array[()] if flags == [True] and not shape else array
            if code == _EXT_STRINGS:
                where, kind, shape = msgpack.unpackb(data)
                buffer = where if isinstance(where, bytes) else take(where)
                return _strings_from_buffer(buffer, kind, shape)
            if code in (_EXT_REGION, _EXT_PLACED_CALL, _EXT_PLACED_OUTPUT):
                return self._region_value(code, data, unpack)
            if code == _EXT_PICKLE:
                if not self.allow_pickle:
                    raise ProtocolError("pickled values are refused on this link")
                frame = take(msgpack.unpackb(data))
                try:
                    return pickle.loads(frame)
                except Exception as exc:  # the object's own code failed: its error, as is
                    raise _UnpicklingFailed(exc) from exc
            raise ProtocolError(f"unknown extension type {code}")

        def unpack(data):
            return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False,
                                   use_list=True)

        try:
            value = unpack(header)
        except _UnpicklingFailed as failed:
            failed.error.add_note("(raised while unpickling a value sent through the pool)")
            raise failed.error from None
        except (ProtocolError, SharedMemoryError):
            raise
        except Exception as exc:
            raise ProtocolError(f"undecodable message: {exc}") from exc
        finally:
            ext_hook = unpack = None  # noqa: F841 - they hold each other: see encode
        return value

    def _region_value(self, code: int, data: bytes, unpack):
        """A shared-memory node: a region's tensor (read there with ``map_regions``), a
        call whose outputs go to regions, or an output written into one."""
        if code == _EXT_PLACED_CALL:
            argument, names, slots = unpack(data)
            return PlacedCall(argument, names, {
                name: RegionSlot(*_region_fields(slot, (str, int, int)))
                for name, slot in slots.items()})
        fields = msgpack.unpackb(data)
        if code == _EXT_PLACED_OUTPUT:
            datatype, shape, nbytes = _region_fields(fields, (str, list, int))
            return PlacedOutput(datatype, _checked_shape(shape), nbytes)
        key, offset, nbytes, datatype, shape = _region_fields(fields, (str, int, int, str, list))
        if datatype not in DATATYPES:
            raise ProtocolError(f"bad datatype {datatype!r} of a shared-memory tensor")
        tensor = RegionTensor(key, offset, nbytes, datatype, _checked_shape(shape))
        return tensor.read() if self.map_regions else tensor


class _UnpicklingFailed(Exception):
    """Carries an exception raised by a pickled object's own reconstruction out of msgpack."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


# What a pack made inside another pack's ``default`` (an array's, a tuple's node) starts
# with. With msgpack's own first buffer (256 KiB), allocated while the outer pack holds
# its own, a worker's encode of a light model's result (a dict of one array) took 16.4 us
# p50 against 5.5 with this one (the pool's parent: 6 either way); the buffer grows as a
# node needs.
NESTED = {"buf_size": 1024}

ARRAY_ALIGNMENT = 64
# Arrays up to this size travel inside the header (a frame each would cost more than the copy).
INLINE_ARRAY_BYTES = 4096


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` whose data starts on an ARRAY_ALIGNMENT boundary."""
    raw = np.empty(array.nbytes + ARRAY_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ARRAY_ALIGNMENT
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def _native_contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous base-class ndarray in native byte order, with the same values and
    shape (``np.ascontiguousarray`` would turn a 0-d array into shape (1,))."""
    array = np.asarray(array)  # np.matrix and other subclasses: plain ndarray
    if not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="), order="C")
    return array if array.flags.c_contiguous else np.array(array, order="C")


def frame_nbytes(frame) -> int:
    return frame.nbytes if isinstance(frame, np.ndarray) else len(frame)


def _array_from_buffer(buffer, dtype_name, shape) -> np.ndarray:
    if dtype_name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {dtype_name!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"bad shape {shape!r}")
    # bfloat16 has no numpy dtype: it travels as its 16-bit pattern.
    dtype = np.dtype("uint16") if dtype_name == "bfloat16" else np.dtype(dtype_name)
    if math.prod(shape) * dtype.itemsize != len(buffer):
        raise ProtocolError(
            f"array of shape {shape} and dtype {dtype_name} does not match its "
            f"{len(buffer)}-byte frame")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _strings_from_buffer(buffer, kind, shape) -> np.ndarray:
    """The object array of bytes (or str) a strings node carries, checked against its
    shape and its buffer's length."""
    if kind not in ("bytes", "str"):
        raise ProtocolError(f"bad strings kind {kind!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"bad shape {shape!r}")
    count = math.prod(shape)
    view = memoryview(buffer).cast("B")
    if 4 * count > len(view):
        raise ProtocolError(f"a bytes array of {count} elements in {len(view)} bytes")
    lengths = np.frombuffer(view[:4 * count], dtype=_LENGTHS).astype(np.int64)
    ends = 4 * count + np.cumsum(lengths)
    if (ends[-1] if count else 4 * count) != len(view):
        raise ProtocolError("a bytes array whose lengths do not add up to its frame")
    starts = ends - lengths
    data = view.tobytes()
    items = [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
    if kind == "str":
        items = [item.decode("utf-8", "surrogatepass") for item in items]
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _region_fields(fields, types: tuple) -> list:
    if not isinstance(fields, list) or len(fields) != len(types) or not all(
            isinstance(field, kind) and not isinstance(field, bool)
            for field, kind in zip(fields, types)):
        raise ProtocolError(f"bad shared-memory node {fields!r}")
    if any(isinstance(field, int) and field < 0 for field in fields):
        raise ProtocolError(f"negative offset or size in a shared-memory node {fields!r}")
    return fields


def _checked_shape(shape) -> tuple:
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"bad shape {shape!r}")
    return tuple(shape)


def bfloat16_as_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values, given as their 16-bit patterns, as the float32 numbers they are."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


_DTYPE_NAMES: dict = {}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, remembered: numpy works it out in Python on every access (measured,
    2-4% of the server's CPU for a light model's request)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        name = dtype.name
        if len(_DTYPE_NAMES) < 256:  # structured dtypes could be endless
            _DTYPE_NAMES[dtype] = name
        return name


def _is_masked_array(obj) -> bool:
    """Asked without ``np.ma``, whose first use imports numpy.ma: 1.2 MiB in every worker
    (measured), for a type that cannot exist until something has imported it."""
    masked = imported("numpy.ma")
    return masked is not None and isinstance(obj, masked.MaskedArray)


def _is_torch_tensor(obj) -> bool:
    torch = imported("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _torch_dtype_names():
    global _TORCH_TO_NAME
    if _TORCH_TO_NAME is None:
        import torch

        _TORCH_TO_NAME = {getattr(torch, name): name for name in ALLOWED_DTYPES}
    return _TORCH_TO_NAME


def _tensor_as_array(tensor) -> tuple[np.ndarray, str]:
    import torch

    name = _torch_dtype_names().get(tensor.dtype)
    if name is None:
        raise EncodeError(f"torch tensors of dtype {tensor.dtype} cannot cross the pool's link")
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    if name == "bfloat16":
        tensor = tensor.view(torch.uint16)
    return tensor.numpy(), name


def _array_as_tensor(array: np.ndarray, dtype_name: str):
    import torch

    if not array.flags.writeable:
        array = array.copy()  # torch has no read-only tensors
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype_name == "bfloat16" else tensor
