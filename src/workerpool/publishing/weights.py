"""Publishing a loaded model: its weights into one sealed memfd, the rest into a skeleton.

    load() ──> model object ──SkeletonPickler──> skeleton bytes (small: structure, configs,
                                  │                tokenizers; each array is a reference)
                                  ├─ tensor / ndarray in private memory ──> sealed memfd
                                  └─ tensor / ndarray already in an mmap'd weight file
                                       (safetensors, torch.load(mmap=True)) ──> that file

Workers unpickle the skeleton with each reference resolved to a read-only view of the memfd
or of the weight file (``workers/attach.py``), so attaching copies no weight: for a file, the
page cache is the one copy. The parent's own torch tensors in the memfd are re-pointed at a
copy-on-write mapping of it, so its private copy is freed as soon as nothing else holds it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle

import cloudpickle

from .. import frameworks, malloc, memfd
from ..errors import PoolStartError, WorkerpoolError
from ..sources import files
from . import filemaps


class BufferRef:
    """A region of the weight segment; pickled as a persistent id, never by value."""

    __slots__ = ("offset", "nbytes")

    def __init__(self, offset: int, nbytes: int):
        self.offset = offset
        self.nbytes = nbytes

    def persistent_id(self) -> tuple:
        return (memfd.BUFFER_TAG, self.offset, self.nbytes)


class FileRef:
    """A region of a published weight file (index into the layout's files)."""

    __slots__ = ("file_index", "offset", "nbytes")

    def __init__(self, file_index: int, offset: int, nbytes: int):
        self.file_index = file_index
        self.offset = offset
        self.nbytes = nbytes

    def persistent_id(self) -> tuple:
        return (memfd.FILE_TAG, self.file_index, self.offset, self.nbytes)


class SegmentLayout:
    """Assigns each distinct buffer a place, once: a region of its weight file when it
    already lives in an unmodified file mapping (and ``use_files``), else of the memfd."""

    def __init__(self, use_files: bool = True, options: dict | None = None):
        self.options = options or {}  # engine choices of the framework adapters
        self.notes: list[str] = []  # what adapters did, for stats()
        self.source: dict | None = None  # where an adapter read the model from, for stats()
        self.signature: dict | None = None  # what an adapter learnt the model takes/returns
        self.region_fds: list[int] = []  # one sealed memfd per mapped TF constant
        self.region_bytes = 0
        self.size = 0
        self.chunks: list[tuple[int, object]] = []  # (offset, buffer): keeps buffers alive
        self._refs: dict[tuple, BufferRef | FileRef] = {}
        self._repoints: list[tuple] = []
        self.file_mappings = filemaps.FileMappings() if use_files else None
        self.file_fds: list[int] = []
        self.file_paths: list[str] = []
        self.file_bytes = 0
        self._file_index: dict[tuple, int] = {}  # (device, inode) -> index

    def place(self, key: tuple, buffer, nbytes: int, address: int = 0):
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = self._file_region(address, nbytes) or \
                self._segment_region(buffer, nbytes)
        return ref

    def _segment_region(self, buffer, nbytes: int) -> BufferRef:
        offset = memfd.align(self.size)
        self.chunks.append((offset, buffer))
        self.size = offset + nbytes
        return BufferRef(offset, nbytes)

    def _file_region(self, address: int, nbytes: int) -> FileRef | None:
        if self.file_mappings is None or not address:
            return None
        mapping = self.file_mappings.find(address, nbytes)
        if mapping is None:
            return None
        identity = (mapping.device, mapping.inode)
        if identity not in self._file_index:
            fd = filemaps.open_mapped_file(mapping)
            if fd is None:
                return None
            self._file_index[identity] = len(self.file_fds)
            self.file_fds.append(fd)
            self.file_paths.append(mapping.path)
        self.file_bytes += nbytes
        return FileRef(self._file_index[identity],
                       mapping.file_offset + address - mapping.start, nbytes)

    def add_region(self, buffer) -> str:
        """A sealed memfd of its own holding exactly ``buffer`` (for mappers that map whole
        files, like TensorFlow's ImmutableConst). Returns its name (``memfd.region_path``
        gives the path to open in a process that attached the model)."""
        return self._add_region_fd(memfd.create_sealed(buffer.nbytes, [(0, buffer)]),
                                   buffer.nbytes)

    def add_region_from_file(self, path: str, offset: int, nbytes: int) -> str:
        """``add_region`` of ``nbytes`` of the file ``path`` from ``offset``, copied by the
        kernel: they never enter this process's memory."""
        return self._add_region_fd(memfd.create_sealed_from_file(path, offset, nbytes),
                                   nbytes)

    def _add_region_fd(self, fd: int, nbytes: int) -> str:
        self.region_fds.append(fd)
        self.region_bytes += nbytes
        return memfd.region_name(len(self.region_fds) - 1)

    def repoint_later(self, repoint, obj, ref, *args) -> None:
        """After sealing, call ``repoint(view_of_ref, obj, *args)`` in the parent (memfd
        regions only: a file region is shared already)."""
        if isinstance(ref, BufferRef):
            self._repoints.append((repoint, obj, ref, args))

    def repoint_all(self, mapping: memoryview) -> None:
        for repoint, obj, ref, args in self._repoints:
            repoint(mapping[ref.offset:ref.offset + ref.nbytes], obj, *args)
        self._repoints.clear()


class SkeletonPickler(cloudpickle.Pickler):
    """cloudpickle (so classes and functions from ``__main__`` travel by value) whose
    arrays go to the segment layout instead of the stream."""

    def __init__(self, file, layout: SegmentLayout):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.layout = layout
        self.adapters = [a for a in frameworks.active_adapters() if hasattr(a, "reduce")]

    def reducer_override(self, obj):
        for adapter in self.adapters:
            reduced = adapter.reduce(obj, self.layout)
            if reduced is not NotImplemented:
                return reduced
        return super().reducer_override(obj)

    def persistent_id(self, obj):
        if type(obj) in (BufferRef, FileRef):
            return obj.persistent_id()
        return None


@dataclasses.dataclass
class PublishedModel:
    """The shared form of a model: a sealed memfd of weights, the weight files it refers
    to (open read-only), and the pickled skeleton."""

    fd: int
    weight_bytes: int  # in the memfd
    n_buffers: int
    skeleton: bytes
    file_fds: list[int] = dataclasses.field(default_factory=list)
    file_paths: list[str] = dataclasses.field(default_factory=list)
    file_bytes: int = 0  # served straight from the weight files' mappings
    region_fds: list[int] = dataclasses.field(default_factory=list)
    region_bytes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    source: dict | None = None
    # What the model says it takes and returns ({"inputs": [...], "outputs": [...]}, each a
    # TensorSpec as a dict; a SavedModel's other signatures as {"named": {name: {...}}}),
    # where its framework adapter knows (Keras, SavedModel): None
    signature: dict | None = None

    def all_fds(self) -> list[int]:
        """The segment's fd, then the weight files', then the mapped constants'."""
        return [self.fd, *self.file_fds, *self.region_fds]

    def described(self) -> dict:
        """Everything but the descriptors (what a loader process sends as data)."""
        fields = dataclasses.asdict(self)
        for name in ("fd", "file_fds", "region_fds"):
            fields.pop(name)
        return {**fields, "n_file_fds": len(self.file_fds),
                "n_region_fds": len(self.region_fds)}

    @staticmethod
    def fd_count(described: dict) -> int:
        """How many descriptors go with ``described`` (``all_fds()``'s length)."""
        return 1 + described["n_file_fds"] + described["n_region_fds"]

    @classmethod
    def received(cls, described: dict, fds: list[int]) -> "PublishedModel":
        """The inverse of ``described`` given ``all_fds()`` as this process numbers them."""
        if len(fds) != cls.fd_count(described):
            raise ValueError(f"expected {cls.fd_count(described)} descriptors, got {len(fds)}")
        fields = dict(described)
        n_files = fields.pop("n_file_fds")
        fields.pop("n_region_fds")
        return cls(fd=fds[0], file_fds=fds[1:1 + n_files], region_fds=fds[1 + n_files:],
                   **fields)

    def close(self) -> None:
        for fd in self.all_fds():
            if fd >= 0:
                os.close(fd)
        self.fd, self.file_fds, self.region_fds = -1, [], []


def publish(model, predict, use_files: bool = True,
            options: dict | None = None) -> PublishedModel:
    """Publish ``(model, predict)``: weights into a sealed memfd (or, when they already
    live in an mmap'd weight file and ``use_files``, that file), the rest into a skeleton.

    The parent's own torch tensors placed in the memfd are re-pointed at a copy-on-write
    mapping of it (unmapped when the last of them is gone)."""
    layout = SegmentLayout(use_files, options)
    stream = io.BytesIO()
    try:
        try:
            SkeletonPickler(stream, layout).dump((model, predict))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            if isinstance(exc, WorkerpoolError):
                raise  # an adapter's own error already says what to do
            raise PoolStartError(
                f"cannot publish the object returned by load(): {exc}. Return torch modules, "
                "tensors, numpy arrays and picklable objects; define classes and functions at "
                "module level (or in __main__ under an `if __name__ == '__main__':` guard)"
            ) from exc
    except BaseException:
        for fd in layout.file_fds + layout.region_fds:
            os.close(fd)
        raise
    fd = memfd.create_sealed(layout.size, layout.chunks)
    n_buffers = len(layout.chunks)
    layout.chunks.clear()  # the private originals may go now
    if layout.size:
        layout.repoint_all(memfd.map_copy_on_write(fd))
    return_freed_memory()
    return PublishedModel(fd, layout.size, n_buffers, stream.getvalue(), layout.file_fds,
                          layout.file_paths, layout.file_bytes, layout.region_fds,
                          layout.region_bytes, layout.notes, layout.source, layout.signature)


def return_freed_memory() -> None:
    """Hand the heap freed by publishing (private originals, a frozen TF graph's copies of
    the weights) back to the OS: glibc keeps it otherwise (measured: +131 MiB retained in
    the parent after freezing a 64 MiB Keras model, 5 MiB after this)."""
    malloc.collect_and_return()


def weights_source(model, start_method: str, published: PublishedModel) -> str:
    """Where the workers' weights live, in words for stats()."""
    if isinstance(model, files.ZygoteLoaded):
        return ("loaded by the zygote, shared copy-on-write by its workers"
                if start_method == "zygote" else "loaded by each worker (a copy per worker)")
    places = [name for name, size in (("shared memfd", published.weight_bytes),
                                      ("mapped weight file", published.file_bytes)) if size]
    return "; ".join([" + ".join(places), *published.notes]).strip("; ") or \
        "none (no arrays in the model)"
