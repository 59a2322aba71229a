"""numpy arrays in the weight segment: published as raw bytes, rebuilt as zero-copy views."""

from __future__ import annotations

import numpy as np


def reduce(obj, layout):
    if type(obj) not in (np.ndarray, np.memmap) or obj.dtype.hasobject:
        return NotImplemented
    contiguous = np.ascontiguousarray(obj)
    ref = layout.place(("numpy", contiguous.ctypes.data, contiguous.nbytes), contiguous,
                       contiguous.nbytes, address=contiguous.ctypes.data)
    return rebuild_array, (ref, contiguous.dtype, obj.shape)


def rebuild_array(buffer, dtype, shape):
    """An ndarray over ``buffer`` (read-only in workers: numpy then refuses writes)."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)
