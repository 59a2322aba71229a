"""The supervisor <-> zygote control channel: length-prefixed pickles over a socketpair.

The socketpair is private to the two processes (inherited, never named), so pickle is safe.
    parent -> zygote   {"op": "boot", ...}      once: what to attach and how to start workers
                       then, to a prestarted zygote only: one byte carrying the weights fd
                       and the weight-file fds (SCM_RIGHTS)
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

import pickle
import socket
import struct

_LENGTH = struct.Struct("!Q")


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
