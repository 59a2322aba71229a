"""Sealed memfd segments: the one copy of a model's weights.

The parent writes every weight buffer into a memfd, then seals it against writing, growing
and shrinking. A memfd has no name in /dev/shm, so nothing is left behind when every process
is killed at once: the memory goes away with the last fd and the last mapping. Workers map it
read-only (a stray write is a SIGSEGV in that worker, never a silent corruption of the model
for everyone); the parent maps it copy-on-write so its own object stays usable.
"""

from __future__ import annotations

import fcntl
import mmap
import os

MEMFD_NAME = "workerpool-weights"
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
ALIGNMENT = 64  # bytes; what torch's CPU allocator guarantees, enough for any SIMD load


def align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def create_sealed(size: int, chunks) -> int:
    """Create a memfd of ``size`` bytes, write ``chunks`` ((offset, buffer) pairs), seal it.

    Returns the fd (close-on-exec; pass it on explicitly with ``pass_fds``).
    """
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, max(size, 1))
        for offset, buf in chunks:
            _pwrite_all(fd, memoryview(buf).cast("B"), offset)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def map_readonly(fd: int) -> mmap.mmap:
    """Map the whole segment shared and read-only (what workers do)."""
    return mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


def map_copy_on_write(fd: int) -> mmap.mmap:
    """Map the whole segment private and writable: reads share the pages, writes copy them."""
    return mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_PRIVATE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def is_sealed(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS == _SEALS

# Persistent-id tag of a weight region inside a pickled model skeleton.
BUFFER_TAG = "workerpool-buffer"
