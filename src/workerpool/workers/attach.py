"""Rebuilding the model in a worker from the skeleton and the read-only weight mapping."""

from __future__ import annotations

import io
import os
import pickle

from ..errors import ProtocolError
from .. import memfd


class SkeletonUnpickler(pickle.Unpickler):
    """Resolves each weight reference to a read-only view of the memfd or a weight file."""

    def __init__(self, file, weights_fd: int, file_fds: list[int]):
        super().__init__(file)
        self._segment = memfd.map_readonly(weights_fd)
        self._file_fds = file_fds
        self._files: dict[int, memoryview] = {}  # mapped on first use

    def persistent_load(self, pid):
        if pid[0] == memfd.BUFFER_TAG and len(pid) == 3:
            return _region(self._segment, pid[1], pid[2], pid)
        if pid[0] == memfd.FILE_TAG and len(pid) == 4 and 0 <= pid[1] < len(self._file_fds):
            if pid[1] not in self._files:
                self._files[pid[1]] = memfd.map_readonly(self._file_fds[pid[1]])
            return _region(self._files[pid[1]], pid[2], pid[3], pid)
        raise ProtocolError(f"bad weight reference in the model skeleton: {pid!r}")


def _region(view: memoryview, offset: int, nbytes: int, pid) -> memoryview:
    if offset < 0 or offset + nbytes > len(view):
        raise ProtocolError(f"weight reference out of bounds in the model skeleton: {pid!r}")
    return view[offset:offset + nbytes]


def attach(skeleton: bytes, weights_fd: int, file_fds: list[int] = (),
           region_fds: list[int] = ()):
    """Map the weights read-only and rebuild ``(model, predict)`` over them, zero-copy.

    Returns ``(model, predict)``; the model's arrays keep the mappings alive, so the
    weights and file fds may be closed afterwards. ``region_fds`` (mapped TensorFlow
    constants, opened by path when a worker builds its graph) must stay open.
    """
    memfd.attached_regions[:] = region_fds
    return SkeletonUnpickler(io.BytesIO(skeleton), weights_fd, list(file_fds)).load()


def attach_boot(boot: dict, weights_fd: int):
    """:func:`attach` the model a zygote's boot message describes, over ``weights_fd``,
    then close the weights fd and the weight files' (the mappings are all a model needs;
    the region fds stay open, for TensorFlow)."""
    attached = attach(boot["skeleton"], weights_fd, boot["file_fds"], boot["region_fds"])
    for fd in [weights_fd, *boot["file_fds"]]:
        os.close(fd)
    return attached
