"""Publishing a loaded model: its weights into one sealed memfd, the rest into a skeleton.

    load() ──> model object ──SkeletonPickler──> skeleton bytes (small: structure, configs,
                                  │                tokenizers; each array is a BufferRef)
                                  └─ every tensor / ndarray ──> SegmentLayout ──> sealed memfd

Workers unpickle the skeleton with each BufferRef resolved to a read-only view of the memfd
mapping (``workers/attach.py``), so attaching copies no weight. The parent's own torch
tensors are re-pointed at a copy-on-write mapping of the same memfd, so its private copy is
freed as soon as nothing else holds it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle

import cloudpickle

from .. import frameworks
from ..errors import PoolStartError
from ..ipc import memfd


class BufferRef:
    """A region of the weight segment; pickled as a persistent id, never by value."""

    __slots__ = ("offset", "nbytes")

    def __init__(self, offset: int, nbytes: int):
        self.offset = offset
        self.nbytes = nbytes


class SegmentLayout:
    """Assigns each distinct buffer a region of the segment, once."""

    def __init__(self):
        self.size = 0
        self.chunks: list[tuple[int, object]] = []  # (offset, buffer): keeps buffers alive
        self._refs: dict[tuple, BufferRef] = {}
        self._repoints: list[tuple] = []

    def place(self, key: tuple, buffer, nbytes: int) -> BufferRef:
        ref = self._refs.get(key)
        if ref is None:
            offset = memfd.align(self.size)
            ref = self._refs[key] = BufferRef(offset, nbytes)
            self.chunks.append((offset, buffer))
            self.size = offset + nbytes
        return ref

    def repoint_later(self, repoint, obj, ref: BufferRef, *args) -> None:
        """After sealing, call ``repoint(view_of_ref, obj, *args)`` in the parent."""
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
        self.adapters = frameworks.active_adapters()

    def reducer_override(self, obj):
        for adapter in self.adapters:
            reduced = adapter.reduce(obj, self.layout)
            if reduced is not NotImplemented:
                return reduced
        return super().reducer_override(obj)

    def persistent_id(self, obj):
        if type(obj) is BufferRef:
            return (memfd.BUFFER_TAG, obj.offset, obj.nbytes)
        return None


@dataclasses.dataclass
class PublishedModel:
    """The shared form of a model: a sealed memfd of weights plus the pickled skeleton."""

    fd: int
    weight_bytes: int
    n_buffers: int
    skeleton: bytes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def publish(model, predict) -> PublishedModel:
    """Publish ``(model, predict)``: weights into a sealed memfd, the rest into a skeleton.

    The parent's own torch tensors in ``model`` are re-pointed at a copy-on-write mapping
    of the memfd (unmapped when the last of them is gone)."""
    layout = SegmentLayout()
    stream = io.BytesIO()
    try:
        SkeletonPickler(stream, layout).dump((model, predict))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise PoolStartError(
            f"cannot publish the object returned by load(): {exc}. Return torch modules, "
            "tensors, numpy arrays and picklable objects; define classes and functions at "
            "module level (or in __main__ under an `if __name__ == '__main__':` guard)") from exc
    fd = memfd.create_sealed(layout.size, layout.chunks)
    n_buffers = len(layout.chunks)
    layout.chunks.clear()  # the private originals may go now
    if layout.size:
        layout.repoint_all(memfd.map_copy_on_write(fd))
    return PublishedModel(fd, layout.size, n_buffers, stream.getvalue())
