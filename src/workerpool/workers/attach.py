"""Rebuilding the model in a worker from the skeleton and the read-only weight mapping."""

from __future__ import annotations

import io
import pickle

from ..errors import ProtocolError
from ..ipc import memfd


class SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, file, mapping):
        super().__init__(file)
        self._view = mapping

    def persistent_load(self, pid):
        tag, offset, nbytes = pid
        if tag != memfd.BUFFER_TAG or offset + nbytes > len(self._view):
            raise ProtocolError(f"bad weight reference in the model skeleton: {pid!r}")
        return self._view[offset:offset + nbytes]


def attach(skeleton: bytes, weights_fd: int):
    """Map the weights read-only and rebuild ``(model, predict)`` over them, zero-copy.

    Returns ``(model, predict)``; the model's arrays keep the mapping alive.
    """
    return SkeletonUnpickler(io.BytesIO(skeleton), memfd.map_readonly(weights_fd)).load()
