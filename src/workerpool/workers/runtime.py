"""The runtime: one process per server whose imports every model's zygote shares.

    parent (pool/runtime.py) ──runtime channel──> runtime ──fork──> zygote of model A ──> workers
                                                         └─fork──> zygote of model B ──> workers

A zygote spawned fresh imports its framework itself: a torch runtime (~90 MiB) per model.
Forked from this process instead, every zygote (and so every worker) shares one copy of the
frameworks' pages; each zygote then attaches its own model's weights exactly as a spawned one
does (workers/zygote.py, over its own channel), so a crash still touches one model.

    parent -> runtime   {"op": "fork", "modules", "as": "zygote" | "loader"}
                        + the child's channel end (SCM_RIGHTS)
    runtime -> parent   {"op": "forked", "pid"} + a pidfd of that child (SCM_RIGHTS)
                        | {"op": "fork_error", "traceback"}

A loader forked here (``load_in="loader"``, workers/loader.py) runs ``load()`` without
importing its framework again: a server's second model loads in a fraction of the first's
time. It is a child like a zygote: forked, watched, reaped, gone once it has published.

``modules``: frameworks to import before forking (only those the zygote may preimport),
imported once and then frozen out of the cyclic GC, so no child's collection copies them.
The runtime stays single-threaded and never runs a model op: it only imports and forks.
It reaps the zygotes it forked; when the parent dies or closes the channel it waits a
moment for them to leave (each watches the parent and its own channel), kills what is left,
and exits.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import time
import traceback

from ..ipc import control
from ..modules import PREIMPORTABLE
from . import loader, zygote
from . import main as worker_main
from .output import HeldBack, is_quiet

from ..ipc.wire import EXIT_PARENT_GONE

LEAVING_GRACE_S = 10.0  # what zygotes get to finish once the runtime is told to go


class Runtime:
    def __init__(self, ctl: socket.socket, parent_pid: int):
        self.ctl = ctl
        self.parent_pid = parent_pid
        self.parent_pidfd = os.pidfd_open(parent_pid)
        self.children: dict[int, int] = {}  # pidfd -> pid: the zygotes and loaders forked
        self.frozen = False  # the workers' own modules imported and frozen, once

    def import_frameworks(self, modules: list[str]) -> None:
        missing = [m for m in modules if m in PREIMPORTABLE and m not in sys.modules]
        if not missing and self.frozen:
            return
        held = HeldBack("[workerpool runtime] ") if is_quiet() else None
        try:
            if missing:
                zygote.preimport(",".join(missing))
        finally:
            if held is not None:
                held.release()
        worker_main.import_worker_modules()
        gc.collect()
        gc.freeze()
        self.frozen = True

    def fork_child(self, channel_fd: int, role: str) -> None:
        """A zygote or a loader (``role``) over ``channel_fd``; its pid and a pidfd back."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.ctl.close()
                os.close(self.parent_pidfd)
                for pidfd in self.children:
                    os.close(pidfd)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                channel = socket.socket(fileno=channel_fd)
                if role == "loader":
                    code = loader.serve_channel(channel, self.parent_pid)
                else:
                    code = zygote.serve_channel(channel, None)
            except BaseException:
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # noqa: BLE001 - exiting regardless
                        pass
                os._exit(code)
        os.close(channel_fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        control.send(self.ctl, {"op": "forked", "pid": pid})
        control.send_fds(self.ctl, [pidfd])

    def reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        os.close(pidfd)
        os.waitpid(pid, 0)

    def run(self) -> int:
        while True:
            # poll(), not select(): a runtime of many models holds descriptors past 1024
            waiter = select.poll()
            for fd in (self.ctl.fileno(), self.parent_pidfd, *self.children):
                waiter.register(fd, select.POLLIN)
            for fd, _ in waiter.poll():
                if fd == self.ctl.fileno():
                    message = control.recv(self.ctl)
                    if message is None:
                        self.leave(LEAVING_GRACE_S)
                        return 0
                    self.handle(message)
                elif fd == self.parent_pidfd:
                    self.leave(LEAVING_GRACE_S)
                    return EXIT_PARENT_GONE
                elif fd in self.children:
                    self.reap(fd)

    def handle(self, message: dict) -> None:
        if message["op"] != "fork":
            return
        channel_fd = control.recv_fds(self.ctl, 1)[0]
        try:
            self.import_frameworks(message.get("modules", []))
            self.fork_child(channel_fd, message.get("as", "zygote"))
        except Exception:
            control.send(self.ctl, {"op": "fork_error", "traceback": traceback.format_exc()})

    def leave(self, grace: float) -> None:
        """Reap every child: those still there after ``grace`` seconds are killed."""
        remaining = dict(self.children)
        deadline = time.monotonic() + grace
        while remaining and time.monotonic() < deadline:
            waiter = select.poll()
            for pidfd in remaining:
                waiter.register(pidfd, select.POLLIN)
            for pidfd, _ in waiter.poll(int(1000 * max(0.0, deadline - time.monotonic()))):
                remaining.pop(pidfd)
                self.reap(pidfd)
        for pidfd in list(self.children):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reap(pidfd)


def main(argv: list[str]) -> int:
    worker_main.ignore_stop_signals()
    ctl = socket.socket(fileno=int(argv[0]))
    return Runtime(ctl, int(argv[1])).run()


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
