"""The supervisor <-> zygote control channel: length-prefixed pickles over a socketpair.

The socketpair is private to the two processes (inherited, never named), so pickle is safe.
    parent -> zygote   {"op": "boot", ...}      once: what to attach and how to start workers
                       then, to a prestarted zygote only: one byte carrying the weights fd,
                       the weight-file fds and the region fds (SCM_RIGHTS)
                       {"op": "start", "worker_id", "identity", "cpus"}
                       {"op": "signal", "worker_id", "signum"}
                       {"op": "exit"}           no more workers: reap them and leave
    zygote -> parent   {"op": "booted", "pid", "threads", "modules"}
                       | {"op": "boot_error", "traceback"}
                       {"op": "started", "worker_id", "pid"}
                       {"op": "start_error", "worker_id", "traceback"}
                       {"op": "exited", "worker_id", "pid", "status"}
"""

from __future__ import annotations

import os
import pickle
import socket
import struct

_LENGTH = struct.Struct("!Q")
# The kernel passes at most 253 descriptors per message (SCM_MAX_FD); a TensorFlow model
# can have more mapped constants than that.
_FDS_PER_MESSAGE = 250


def send(sock: socket.socket, message: dict) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def recv(sock: socket.socket) -> dict | None:
    """The next message, or None when the other side has closed the channel."""
    head = _recv_exactly(sock, _LENGTH.size)
    if head is None:
        return None
    body = _recv_exactly(sock, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(n - len(chunks))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    """Pass ``fds`` (SCM_RIGHTS), as many messages as it takes; ``recv_fds`` takes them."""
    for start in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], fds[start:start + _FDS_PER_MESSAGE])


def recv_fds(sock: socket.socket, count: int) -> list[int]:
    """The ``count`` descriptors sent by ``send_fds``, numbered for this process."""
    fds: list[int] = []
    while len(fds) < count:
        want = min(_FDS_PER_MESSAGE, count - len(fds))
        data, got, _, _ = socket.recv_fds(sock, 1, want)
        fds += got
        if not data or len(got) != want:
            for fd in fds:
                os.close(fd)
            raise ConnectionError(f"expected {count} descriptors, the other side sent "
                                  f"{len(fds)} and {'closed' if not data else 'stopped'}")
    return fds
