"""The runtime: one process per server whose imports every model's workers share.

    parent (pool/runtime.py) ──runtime channel──> runtime ──fork──> workers of model A
                                                         ├─fork──> workers of model B
                                                         └─fork──> zygote of model C (TorchScript) ──> workers

A zygote spawned fresh imports its framework itself: a torch runtime (~90 MiB) per model.
Forked from this process instead, every worker shares one copy of the frameworks' pages; a
worker serves one model, so a crash still touches one model.

    parent -> runtime   {"op": "fork", "modules", "as": "host" | "zygote" | "loader"}
                        + the pool's (or loader's) channel end (SCM_RIGHTS)
    runtime -> parent   {"op": "hosted", "pid"}: the runtime plays that pool's zygote
                        | {"op": "forked", "pid"} + a pidfd of that child (SCM_RIGHTS)
                        | {"op": "fork_error", "traceback"}

A loader forked here (``load_in="loader"``, workers/loader.py) runs ``load()`` without
importing its framework again: a server's second model loads in a fraction of the first's
time. It is a child like a zygote: forked, watched, reaped, gone once it has published.

``modules``: frameworks to import before forking (only those the zygote may preimport),
imported once and then frozen out of the cyclic GC, so no child's collection copies them.
The runtime stays single-threaded and never runs a model op: it only imports and forks.
It reaps what it forked; when the parent dies or closes the channel it kills the hosted
pools' workers, waits a moment for zygote processes to leave (each watches the parent and
its own channel), kills what is left, and exits.

A pool whose model attaches zero-copy (a skeleton over published weights) gets no zygote
process: the runtime plays its zygote (``"as": "host"``, replied ``{"op": "hosted", "pid"}``),
forking each of its workers from here; the worker attaches the weights after the fork (two
pools' own modules may share a name: none is imported here; the pool's channel carries the
same messages as a zygote process's, workers/zygote.py). A zygote process per model
cost its own pages and, once its worker had written to them, a second copy of those it
shared with it (measured, 5.8 MiB per 32 MiB torch model with one worker). Before "booted",
a probe child attaches once, so a model that cannot attach fails its pool's start as
before, and the installed packages it imported (transformers, say) are imported here, so
no worker imports them again. Models loaded where they are unpickled (TorchScript) keep a
zygote of their own: its workers share that one load.
"""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass

from ..ipc import control
from ..modules import PREIMPORTABLE
from . import loader, zygote
from . import main as worker_main
from .output import held_back_when_quiet

from ..ipc.wire import EXIT_PARENT_GONE

LEAVING_GRACE_S = 10.0  # what zygotes get to finish once the runtime is told to go


@dataclass
class Probe:
    """A child attaching a hosted pool's model once before its pool is told "booted"."""

    zygote: zygote.Zygote
    pid: int
    report: bytearray


class Runtime:
    def __init__(self, ctl: socket.socket, parent_pid: int):
        self.ctl = ctl
        self.parent_pid = parent_pid
        self.parent_pidfd = os.pidfd_open(parent_pid)
        self.children: dict[int, int] = {}  # pidfd -> pid: the zygotes and loaders forked
        self.frozen = False  # the workers' own modules imported and frozen, once
        self.booting: dict[int, socket.socket] = {}  # channel fd -> a hosted pool's, unbooted
        self.probes: dict[int, Probe] = {}  # the probe's report pipe -> the probe
        self.hosted: dict[int, zygote.Zygote] = {}  # channel fd -> a pool's zygote, played here

    def import_frameworks(self, modules: list[str]) -> None:
        missing = [m for m in modules if m in PREIMPORTABLE and m not in sys.modules]
        if not missing and self.frozen:
            return
        if missing:
            with held_back_when_quiet("[workerpool runtime] "):
                zygote.preimport(",".join(missing))
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
                self.close_in_child(keep=None)
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

    def close_in_child(self, keep: "zygote.Zygote | None") -> None:
        """In a child forked here: the runtime's descriptors, and every pool's but
        ``keep``'s, are not its (a worker holding another pool's channel would keep that
        pool from seeing its end)."""
        self.ctl.close()
        os.close(self.parent_pidfd)
        for pidfd in self.children:
            os.close(pidfd)
        for channel in self.booting.values():
            channel.close()
        for read_fd in self.probes:
            os.close(read_fd)
        for role in [*self.hosted.values(), *(probe.zygote for probe in self.probes.values())]:
            if role is not keep:
                role.close_in_child()

    # -- pools whose zygote the runtime plays ---------------------------------------------
    def host(self, channel_fd: int) -> None:
        self.booting[channel_fd] = socket.socket(fileno=channel_fd)
        control.send(self.ctl, {"op": "hosted", "pid": os.getpid()})

    def boot_hosted(self, channel_fd: int) -> None:
        """The boot message and fds of a hosted pool: a probe attaches its model once."""
        channel = self.booting.pop(channel_fd)
        try:
            boot = control.recv(channel)
            weights_fd = zygote.receive_fds(channel, boot) if boot is not None else -1
        except (OSError, ConnectionError):
            boot = None
        if boot is None:  # the pool's process gave up on it
            channel.close()
            return
        role = zygote.Zygote(channel, boot, weights_fd, host=self)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_fd)
                self.close_in_child(keep=role)
                report = probe_attach(role)
                view = memoryview(report)
                while view:
                    view = view[os.write(write_fd, view):]
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        self.probes[read_fd] = Probe(role, pid, bytearray())

    def read_probe(self, read_fd: int) -> None:
        probe = self.probes[read_fd]
        data = os.read(read_fd, 1 << 16)
        if data:
            probe.report += data
            return
        del self.probes[read_fd]
        os.close(read_fd)
        os.waitpid(probe.pid, 0)
        try:
            report = pickle.loads(probe.report)
        except Exception:  # noqa: BLE001 - it died before reporting
            report = {"traceback": "the worker zygote died while attaching the model "
                                   "(a crash in native code?)"}
        role = probe.zygote
        try:
            if "traceback" in report:
                control.send(role.ctl, {"op": "boot_error", "traceback": report["traceback"]})
                role.release(remove_private_dir=False)  # the pool may try again
                return
            self.import_installed(report["imported"])
            control.send(role.ctl, zygote.booted_message())
        except OSError:  # the pool's process gave up on it meanwhile
            role.release(remove_private_dir=False)
            return
        self.hosted[role.ctl.fileno()] = role

    def abandon_probe(self, read_fd: int) -> None:
        probe = self.probes.pop(read_fd)
        try:
            os.kill(probe.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(probe.pid, 0)
        os.close(read_fd)
        probe.zygote.release(remove_private_dir=False)

    def import_installed(self, names: list[str]) -> None:
        """Import what a model's attach imported from installed packages, so that each
        worker forked here shares it (a model's own files are imported by its workers)."""
        missing = [name for name in names if name not in sys.modules]
        if not missing:
            return
        with held_back_when_quiet("[workerpool runtime] "):
            for name in missing:
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 - a worker imports it itself, and reports
                    pass
        gc.collect()
        gc.freeze()

    def on_hosted(self, fd: int) -> None:
        for key, role in list(self.hosted.items()):
            if fd in role.watched():
                if not role.on_readable(fd):
                    del self.hosted[key]
                    role.release()
                return

    def reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        os.close(pidfd)
        os.waitpid(pid, 0)

    def run(self) -> int:
        while True:
            # poll(), not select(): a runtime of many models holds descriptors past 1024
            waiter = select.poll()
            hosted = [fd for role in self.hosted.values() for fd in role.watched()]
            probing = {probe.zygote.ctl.fileno(): read_fd
                       for read_fd, probe in self.probes.items()}
            for fd in (self.ctl.fileno(), self.parent_pidfd, *self.children, *self.booting,
                       *self.probes, *probing, *hosted):
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
                elif fd in self.booting:
                    self.boot_hosted(fd)
                elif fd in self.probes:
                    self.read_probe(fd)
                elif fd in probing:  # the pool's process gave up waiting for "booted"
                    self.abandon_probe(probing[fd])
                else:
                    self.on_hosted(fd)
                break  # the others wait for the next poll: handling this one may have
                # closed them, or given their numbers to new descriptors

    def handle(self, message: dict) -> None:
        if message["op"] != "fork":
            return
        channel_fd = control.recv_fds(self.ctl, 1)[0]
        try:
            self.import_frameworks(message.get("modules", []))
            if message.get("as") == "host":
                self.host(channel_fd)
            else:
                self.fork_child(channel_fd, message.get("as", "zygote"))
        except Exception:
            if channel_fd not in self.booting:
                os.close(channel_fd)
            control.send(self.ctl, {"op": "fork_error", "traceback": traceback.format_exc()})

    def leave(self, grace: float) -> None:
        """Kill the hosted pools' workers; reap every child: those still there after
        ``grace`` seconds are killed."""
        for role in self.hosted.values():
            role.release()
        self.hosted.clear()
        for read_fd in list(self.probes):
            self.abandon_probe(read_fd)
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


def probe_attach(role: "zygote.Zygote") -> bytes:
    """In the probe child: attach the pool's model once; the pickled report says what
    installed modules that imported, or why it failed."""
    before = set(sys.modules)
    with held_back_when_quiet("[workerpool zygote] "):
        try:
            role.attach_in_worker()
            report = {"imported": installed_modules(set(sys.modules) - before)}
        except BaseException:  # noqa: BLE001 - the pool's start says why
            report = {"traceback": traceback.format_exc()}
    return pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)


def installed_modules(names: set[str]) -> list[str]:
    """Those of ``names`` that live in the installed packages or the standard library,
    parents first; a model's own files (anywhere else) are left to its workers."""
    places = {sysconfig.get_path(kind) for kind in ("purelib", "platlib", "stdlib",
                                                    "platstdlib")}
    places = tuple(os.path.join(place, "") for place in places if place)
    found = []
    for name in names:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path and os.path.abspath(path).startswith(places):
            found.append(name)
    return sorted(found, key=lambda name: (name.count("."), name))


def main(argv: list[str]) -> int:
    worker_main.ignore_stop_signals()
    ctl = socket.socket(fileno=int(argv[0]))
    return Runtime(ctl, int(argv[1])).run()


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
