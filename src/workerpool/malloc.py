"""glibc's allocator, told what a long-lived process of ours needs (no-ops elsewhere).

glibc keeps what a process frees for later (the heap is trimmed only at its top, and a
freed large block raises the threshold under which the next ones come from the heap), and
gives each new thread an arena of its own, up to eight per core. A worker that ran a
forward pass keeps its activations' worth of heap; one with a ZeroMQ I/O thread keeps a
second arena for message buffers. Both settings below are measured in their callers.
"""

from __future__ import annotations

import ctypes
import functools
import gc

M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


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
