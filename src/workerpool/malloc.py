"""glibc's allocator, told what a long-lived process of ours needs (no-ops elsewhere).

glibc keeps what a process frees for later (the heap is trimmed only at its top, and a
freed large block raises the threshold under which the next ones come from the heap), and
gives each new thread an arena of its own, up to eight per core. A worker that ran a
forward pass keeps its activations' worth of heap; one with a ZeroMQ I/O thread keeps a
second arena for message buffers; and a block freed above the trim threshold, or one
that was mmap'd, goes back to the OS at once, to be faulted in again by the next one of
its size. Each setting below is measured where it is used.
"""

from __future__ import annotations

import ctypes
import functools
import gc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's (malloc.h)
# glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): blocks below it come from
# the heap
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024


@functools.cache
def _glibc():
    """This process's C library if it is glibc (it has malloc_trim), else None; loaded once:
    a worker trims each time it goes idle."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(count: int) -> None:
    """At most ``count`` malloc arenas in this process; call it before its threads exist."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, max(1, count))


def keep_freed_heap() -> None:
    """Freed blocks stay in the heap for the next ones (up to MAX_MMAP_THRESHOLD each),
    never given back on free: for a process that gives its free heap back itself when
    idle (return_free_heap). A worker answering one 1 MiB array after another otherwise
    took ~120 page faults a request (a message's buffer freed, the next one faulted in
    again): ~1.2 ms against ~0.8 a round trip."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MAX_MMAP_THRESHOLD)


def return_free_heap() -> None:
    """Give the pages of freed heap blocks back to the OS (glibc's ``malloc_trim(0)``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def collect_and_return() -> None:
    """Collect cyclic garbage, then give the heap it freed back to the OS: after work that
    leaves much behind (publishing a model, a burst of loads)."""
    gc.collect()
    return_free_heap()
