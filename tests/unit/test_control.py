"""The control channel's descriptor passing, past the kernel's 253 per message."""

import os
import socket

import pytest

from workerpool.ipc import control


def test_more_descriptors_than_one_message_carries_arrive_in_order():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes = [os.pipe() for _ in range(300)]
    received = []
    try:
        control.send_fds(a, [write for _, write in pipes])
        received = control.recv_fds(b, len(pipes))
        assert len(received) == 300
        for (read, _), fd in zip(pipes, received):  # each is the same pipe, in order
            os.write(fd, b"x")
            assert os.read(read, 1) == b"x"
    finally:
        for fd in received + [fd for pair in pipes for fd in pair]:
            os.close(fd)
        a.close()
        b.close()


def test_fewer_descriptors_than_announced_is_an_error_that_leaks_none():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read, write = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    try:
        control.send_fds(a, [read])
        a.close()
        with pytest.raises(ConnectionError, match="expected 2 descriptors"):
            control.recv_fds(b, 2)
        assert len(os.listdir("/proc/self/fd")) == before - 1  # a closed; none received kept
    finally:
        os.close(read)
        os.close(write)
        b.close()
