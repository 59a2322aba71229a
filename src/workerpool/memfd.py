"""Sealed memfd segments: the one copy of a model's weights.

The parent writes every weight buffer into a memfd, then seals it against writing, growing
and shrinking. A memfd has no name in /dev/shm, so nothing is left behind when every process
is killed at once: the memory goes away with the last fd and the last mapping. Workers map it
read-only (a stray write is a SIGSEGV in that worker, never a silent corruption of the model
for everyone); the parent maps it copy-on-write so its own object stays usable.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import errno
import os
import time
import weakref

MEMFD_NAME = "workerpool-weights"
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
ALIGNMENT = 64  # bytes; what torch's CPU allocator guarantees, enough for any SIMD load
# How long sealing waits out pages the kernel holds pinned (see seal).
SEAL_PATIENCE_S = 10.0


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
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_sealed_from_file(path: str, offset: int, nbytes: int) -> int:
    """A sealed memfd holding ``nbytes`` of the file ``path`` from ``offset``, copied inside
    the kernel (sendfile): the bytes never pass through this process's memory."""
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        with open(path, "rb") as source:
            copied = 0
            while copied < nbytes:
                sent = os.sendfile(fd, source.fileno(), offset + copied, nbytes - copied)
                if sent == 0:
                    raise OSError(f"{path} ends before byte {offset + nbytes}")
                copied += sent
        seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seal(fd: int, patience_s: float = SEAL_PATIENCE_S) -> None:
    """Seal ``fd`` against writing, growing and shrinking, waiting out transient pins.

    The kernel refuses F_SEAL_WRITE (EBUSY) while any page of the memfd has a reference
    beyond its mappings, and itself waits only ~0.15 s for them to go. Such references are
    transient on a busy machine (page migration, compaction, a pipe still holding a spliced
    page), so a refusal is retried with growing pauses for up to ``patience_s`` seconds.
    """
    give_up_at = time.monotonic() + patience_s
    pause = 0.01
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() + pause > give_up_at:
                if error.errno == errno.EBUSY:
                    raise OSError(errno.EBUSY, "the kernel kept pages of the weight segment "
                                  f"pinned for {patience_s:g} s and would not seal it; "
                                  "retry once the machine is less busy") from error
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def map_readonly(fd: int) -> memoryview:
    """Map the whole segment (or weight file) shared and read-only (what workers do)."""
    return _map(fd, mmap.PROT_READ, mmap.MAP_SHARED).toreadonly()


def map_copy_on_write(fd: int) -> memoryview:
    """Map the whole segment private and writable: reads share the pages, writes copy them."""
    return _map(fd, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE)


# Python's mmap.mmap keeps a dup of the fd open for as long as the mapping lives; the
# weights must leave no fd behind once the pool is closed, so map through libc. The pages
# are unmapped when the last array or tensor viewing them is gone.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(fd: int, prot: int, flags: int) -> memoryview:
    size = os.fstat(fd).st_size
    if size == 0:
        return memoryview(b"")
    address = _libc.mmap(None, size, prot, flags, fd, 0)
    if address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the weight segment failed: {os.strerror(err)}")
    pages = type("Pages", (ctypes.c_ubyte * size,), {}).from_address(address)
    weakref.finalize(pages, _libc.munmap, address, size)
    return memoryview(pages).cast("B")


def is_sealed(fd: int) -> bool:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS == _SEALS

# Mapped TensorFlow constants: each is a sealed memfd of its own, named in a graph by its
# index ("workerpool-region:3"), never by fd number, since the process that published it
# (the pool's, or a loader's) and the processes that map it hold it at different numbers.
REGION_PREFIX = "workerpool-region:"
attached_regions: list[int] = []  # this process's fd of each region, by index


def region_name(index: int) -> str:
    return f"{REGION_PREFIX}{index}"


def region_path(name: str) -> str:
    """The path a worker opens for the region named ``name`` (see ``attach``)."""
    if not name.startswith(REGION_PREFIX):
        return name
    index = int(name[len(REGION_PREFIX):])
    if not 0 <= index < len(attached_regions):
        raise ValueError(f"mapped constant {name!r}: this process attached "
                         f"{len(attached_regions)} regions")
    return f"/proc/self/fd/{attached_regions[index]}"


# Persistent-id tags of weight regions inside a pickled model skeleton: a region of the
# memfd, or of one of the published weight files.
BUFFER_TAG = "workerpool-buffer"
FILE_TAG = "workerpool-file"
