"""The loader: a short-lived process that runs ``load()`` and publishes the model, so the
pool's own process never imports torch or TensorFlow and never holds a copy of the weights.

    pool's process ──socketpair: {"op": "load", "call": cloudpickled (load, predict), ...}──> loader
                   <──{"op": "published", "model": the PublishedModel's data}── load(), publish()
                   <──the segment's, weight files' and constants' fds (SCM_RIGHTS)── exits
                   <──{"op": "error", type, message, traceback, pickled}── load() raised

The descriptors outlive the loader: a sealed memfd lives while any process holds it, and a
weight file stays open. A lifeline thread watches the pool's process (pidfd): when it dies
mid-load, the loader removes the pool's private directory (no zygote exists yet to do it)
and exits at once, whatever load() is doing.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys

from ..ipc import control, endpoints, wire
from ..ipc.wire import EXIT_PARENT_GONE
from .main import exit_when_any_dies

# An error's text and pickled exception together stay under this.
_MAX_ERROR_BYTES = 1024 * 1024


def start_lifeline(parent_pid: int, private_dir: list[str]) -> None:
    """When the pool's process dies, remove ``private_dir[0]`` (once known) and exit."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(EXIT_PARENT_GONE)

    def remove_private_dir():
        if private_dir:
            endpoints.remove_private_dir(private_dir[0])

    exit_when_any_dies([pidfd], remove_private_dir)


def run_load(request: dict):
    """``(PublishedModel, weights_source)`` of the request's ``load``."""
    from ..publishing import publish, weights_source

    load, predict = pickle.loads(request["call"])
    model = load()
    published = publish(model, predict, use_files=request["use_files"],
                        options=request["options"])
    return published, weights_source(model, request["start_method"], published)


def main(argv: list[str]) -> int:
    return serve_channel(socket.socket(fileno=int(argv[0])), int(argv[1]))


def serve_channel(sock: socket.socket, parent_pid: int) -> int:
    """Take one load request on ``sock``, load and publish, hand the result back. Also
    run in a child the runtime forked (workers/runtime.py), whose frameworks are imported."""
    private_dir: list[str] = []
    start_lifeline(parent_pid, private_dir)
    request = control.recv(sock)
    if request is None:  # the pool's process gave up on us
        return 0
    private_dir.append(request["options"]["private_dir"])
    sys.path[:] = request["sys_path"]
    try:
        published, source = run_load(request)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        control.send(sock, {"op": "error", **wire.describe_error(exc, _MAX_ERROR_BYTES)})
        return 1
    control.send(sock, {"op": "published", "model": published.described(),
                        "weights_source": source})
    control.send_fds(sock, published.all_fds())
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: the model's memory goes with the process
