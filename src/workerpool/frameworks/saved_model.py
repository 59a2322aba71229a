"""SavedModel directories, TF Serving's format: read without restoring their variables.

    model/                      a base path of numbered versions (TF Serving's layout):
      1/ saved_model.pb ...     the highest number is served
      2/ saved_model.pb
        variables/variables.{index,data-*}

``tf.saved_model.load`` would restore every variable into TensorFlow's heap, and the frozen
graph would then copy each into a memfd: two copies of the model in the parent. Instead the
objects and functions are loaded with ``experimental_skip_checkpoint`` (variables exist but
hold no memory) and each captured variable's bytes go from the checkpoint's data file into
its memfd inside the kernel (sendfile) when the freezer maps it (frameworks/tf_freeze.py):
the parent never holds a weight. Where each tensor lies comes from the checkpoint's
``.index``, a LevelDB-format table of ``BundleEntryProto`` (dtype, shape, shard, offset,
size) read here; tensors it cannot place (strings, partitioned variables) are read whole
through TensorFlow's checkpoint reader instead. The variable -> checkpoint key match walks
the checkpoint's object graph and the loaded objects together from the root, as
TensorFlow's own restore does.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from ..errors import ModelSourceError

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
SERVING_DEFAULT = "serving_default"  # the signature TF Serving serves when none is named


def is_saved_model(path: str) -> bool:
    """A SavedModel directory, or a base path holding numbered SavedModel versions."""
    return _has_saved_model(path) or bool(versions(path))


def _has_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in SAVED_MODEL_FILES)


def versions(base: str) -> list[int]:
    """The version numbers under a base path (subdirectories named by an integer that hold
    a SavedModel), in increasing order; [] for anything else."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return sorted(int(name) for name in names
                  if name.isdigit() and _has_saved_model(os.path.join(base, name)))


def resolve(path: str) -> tuple[str, int | None]:
    """The SavedModel directory to serve at ``path`` and its version number (None when
    ``path`` is itself a SavedModel directory)."""
    if _has_saved_model(path):
        return path, None
    found = versions(path)
    if not found:
        raise ModelSourceError(f"{path} holds no saved_model.pb and no numbered version "
                               "directories (1/, 2/, ...) that do")
    return os.path.join(path, str(found[-1])), found[-1]


class SavedSignature:
    """The signatures of a SavedModel whose variables were not restored: ``function`` is
    ``serving_default``, ``signatures`` every one by name (``serving_default`` first; they
    share the model's variables). ``value_of(variable)`` reads one variable's value from the
    checkpoint."""

    def __init__(self, path: str, version: int | None, signatures: dict, owner, keys: dict,
                 reader):
        self.path = path  # the directory served
        self.version = version
        self.signatures = signatures
        self.function = signatures[SERVING_DEFAULT]
        self._owner = owner  # the loaded object: its variables' handles live as long as it
        self._keys = keys  # id(variable) -> checkpoint key
        self._reader = reader
        self._index = None
        if reader is not None:
            try:
                self._index = CheckpointIndex(os.path.join(path, "variables", "variables"))
            except (OSError, ValueError):
                pass  # an index we cannot parse: every value goes through the reader

    def value_of(self, variable):
        """The variable's value: a TensorSlice of the checkpoint's data file where the
        index places it, else a numpy array read through TensorFlow."""
        key = self._keys.get(id(variable))
        if key is None:
            raise ModelSourceError(
                f"{self.path}: variable {variable.name} of a serving signature has no "
                "value in the SavedModel's checkpoint")
        placed = self._index.get(key) if self._index is not None else None
        return placed if placed is not None else self._reader.get_tensor(key)

    def describe(self) -> str:
        where = self.path if self.version is None else f"{self.path} (version {self.version})"
        return f"SavedModel {where}"


def load(path: str) -> SavedSignature:
    """The signatures of the SavedModel at ``path`` (or its highest version)."""
    import tensorflow as tf
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    directory, version = resolve(path)
    options = tf.saved_model.LoadOptions(experimental_skip_checkpoint=True)
    loaded = tf.saved_model.load(directory, options=options)
    signatures = dict(getattr(loaded, "signatures", {}))
    if SERVING_DEFAULT not in signatures:
        raise ModelSourceError(f"{directory} has no {SERVING_DEFAULT!r} signature; export one "
                               f"(found: {sorted(signatures)})")
    signatures = {SERVING_DEFAULT: signatures.pop(SERVING_DEFAULT),
                  **{name: signatures[name] for name in sorted(signatures)}}
    prefix = os.path.join(directory, "variables", "variables")
    keys, reader = {}, None
    if os.path.exists(prefix + ".index"):
        reader = tf.train.load_checkpoint(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
        keys = checkpoint_keys(graph, loaded)
    return SavedSignature(directory, version, signatures, loaded, keys, reader)


def checkpoint_keys(graph, root) -> dict:
    """id(object) -> checkpoint key of its VARIABLE_VALUE, for every object reachable from
    ``root`` through the checkpoint's object graph ``graph`` (node 0 is ``root``)."""
    keys = {}
    pending, seen = [(0, root)], {0}
    while pending:
        node_id, obj = pending.pop()
        for attribute in graph.nodes[node_id].attributes:
            if attribute.name == "VARIABLE_VALUE":
                keys[id(obj)] = attribute.checkpoint_key
        for child in graph.nodes[node_id].children:
            if child.node_id in seen:
                continue
            found = obj._lookup_dependency(child.local_name)  # how TF's restore matches
            if found is not None:
                seen.add(child.node_id)
                pending.append((child.node_id, found))
    return keys


@dataclasses.dataclass
class TensorSlice:
    """A tensor's raw bytes (C order, little-endian) at ``offset`` of the file ``path``."""

    path: str
    offset: int
    nbytes: int
    dtype: object  # numpy dtype
    shape: tuple

    def read(self):
        """The bytes as a numpy array (for small tensors that stay inline)."""
        import numpy as np

        with open(self.path, "rb") as data:
            data.seek(self.offset)
            raw = data.read(self.nbytes)
        return np.frombuffer(raw, self.dtype).reshape(self.shape)


class CheckpointIndex:
    """Where each tensor of a TF2 checkpoint lies: its ``.index`` file, a LevelDB table
    (uncompressed blocks) mapping checkpoint keys to BundleEntryProto."""

    _MAGIC = 0xdb4775248b80fb57
    _FOOTER = 48

    def __init__(self, prefix: str):
        from tensorflow.core.protobuf import tensor_bundle_pb2

        with open(prefix + ".index", "rb") as index:
            table = index.read()
        entries = dict(self._table_entries(table))
        header = tensor_bundle_pb2.BundleHeaderProto.FromString(entries.pop(b""))
        if header.endianness != tensor_bundle_pb2.BundleHeaderProto.LITTLE:
            raise ValueError("a big-endian checkpoint")
        self._prefix, self._shards = prefix, header.num_shards
        self._entries = entries
        self._proto = tensor_bundle_pb2.BundleEntryProto

    def get(self, key: str) -> TensorSlice | None:
        """The slice of ``key``'s bytes, or None where they are not one plain slice."""
        import numpy as np
        import tensorflow as tf

        raw = self._entries.get(key.encode())
        if raw is None:
            return None
        entry = self._proto.FromString(raw)
        dtype = tf.as_dtype(entry.dtype)
        if entry.slices or dtype == tf.string or not dtype.is_numpy_compatible:
            return None
        shape = tuple(dim.size for dim in entry.shape.dim)
        numpy_dtype = np.dtype(dtype.as_numpy_dtype)
        if entry.size != numpy_dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            return None
        path = f"{self._prefix}.data-{entry.shard_id:05d}-of-{self._shards:05d}"
        return TensorSlice(path, entry.offset, entry.size, numpy_dtype, shape)

    @classmethod
    def _table_entries(cls, table: bytes):
        if len(table) < cls._FOOTER or struct.unpack_from("<Q", table, len(table) - 8)[0] \
                != cls._MAGIC:
            raise ValueError("not a LevelDB table")
        position = len(table) - cls._FOOTER
        _, position = _block_handle(table, position)  # the metaindex block: unused
        index, _ = _block_handle(table, position)
        for _, handle in cls._block_entries(table, *index):
            block, _ = _block_handle(handle, 0)
            yield from cls._block_entries(table, *block)

    @staticmethod
    def _block_entries(table: bytes, offset: int, size: int):
        """(key, value) of one block: prefix-compressed keys, then restart points."""
        if table[offset + size] != 0:  # the trailer's compression type
            raise ValueError("a compressed table block")
        restarts = struct.unpack_from("<I", table, offset + size - 4)[0]
        end = offset + size - 4 * (restarts + 1)
        position, key = offset, b""
        while position < end:
            shared, position = _varint(table, position)
            unshared, position = _varint(table, position)
            length, position = _varint(table, position)
            key = key[:shared] + table[position:position + unshared]
            position += unshared
            yield key, table[position:position + length]
            position += length


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _block_handle(data: bytes, position: int) -> tuple[tuple[int, int], int]:
    offset, position = _varint(data, position)
    size, position = _varint(data, position)
    return (offset, size), position
