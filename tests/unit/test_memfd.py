"""Sealing a weight segment whose pages the kernel holds pinned for a while.

A page spliced into a pipe (vmsplice) keeps a reference until the pipe is read: the same
kind of extra reference page migration or compaction takes on a busy machine, which made
F_SEAL_WRITE fail with EBUSY in CI.
"""

import ctypes
import errno
import mmap
import os
import threading

import numpy as np
import pytest

from workerpool import memfd

_libc = ctypes.CDLL(None, use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def pinned_segment():
    """A one-page memfd whose page sits in a pipe; returns (fd, pipe read end)."""
    fd = os.memfd_create("test-pinned", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, mmap.PAGESIZE)
    os.pwrite(fd, b"w" * mmap.PAGESIZE, 0)
    mapping = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    view = np.frombuffer(mapping, dtype=np.uint8)
    read_end, write_end = os.pipe()
    iov = _IoVec(view.ctypes.data, mmap.PAGESIZE)
    assert _libc.vmsplice(write_end, ctypes.byref(iov), 1, 0) == mmap.PAGESIZE
    del view
    mapping.close()
    os.close(write_end)
    return fd, read_end


def test_sealing_waits_out_a_transient_pin():
    fd, pipe = pinned_segment()
    try:
        # the kernel alone gives up on this page
        with pytest.raises(OSError) as refused:
            memfd.seal(fd, patience_s=0)
        assert refused.value.errno == errno.EBUSY
        unpin = threading.Timer(0.5, os.read, (pipe, mmap.PAGESIZE))
        unpin.start()
        memfd.seal(fd)
        unpin.join()
        assert memfd.is_sealed(fd)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)
        os.close(pipe)


def test_a_pin_that_stays_is_a_clear_error():
    fd, pipe = pinned_segment()
    try:
        with pytest.raises(OSError, match="pinned for 0.3 s") as refused:
            memfd.seal(fd, patience_s=0.3)
        assert refused.value.errno == errno.EBUSY
        assert not memfd.is_sealed(fd)
    finally:
        os.close(fd)
        os.close(pipe)
