"""One runtime process per server, whose imports every model's workers share.

    Runtime().zygote_channel(skeleton)  ──> one pool's zygote (workers/runtime.py): played
        by the runtime itself (Hosted: it forks the pool's workers, each attaching the
        weights after the fork), or, for a model loaded as it is attached (TorchScript), a
        zygote process forked from it (Forked); with this side of its control channel,
        over which the Supervisor boots it exactly as a zygote it spawned itself
    Runtime().loader_channel()  ──fork──> a loader (load_in="loader"), which then loads and
        publishes as a spawned one does, minus the framework import

Pools given the same ``Runtime`` (``Pool(..., runtime=r)``; ``workerpool serve`` gives all
its models one) start their workers from one process that has imported the frameworks
once: N torch models cost one torch runtime, not N. The runtime process starts on first
use and again if it died (the workers it forked leave with it; each pool then starts new
ones from the new runtime; zygote processes already forked live on); closing it reaps it
(close the pools first).
"""

from __future__ import annotations

import os
import pickletools
import select
import signal
import socket
import subprocess
import threading

from ..errors import PoolStartError
from ..ipc import control
from ..modules import PREIMPORTABLE

# Where a skeleton names workerpool's own adapter, the framework it imports when attached.
_ADAPTER_FRAMEWORKS = {
    "workerpool.frameworks.torch": "torch",
    "workerpool.frameworks.tensorflow": "tensorflow",
    "workerpool.frameworks.saved_model": "tensorflow",
}


def skeleton_strings(skeleton: bytes) -> set[str]:
    """Every string a pickled skeleton holds: the modules and names its classes come from
    among them (STACK_GLOBAL's "module" and "name", or GLOBAL's "module name")."""
    return {argument for _, argument, _ in pickletools.genops(skeleton)
            if isinstance(argument, str)}


def frameworks_in(skeleton: bytes, known: tuple[str, ...]) -> set[str]:
    """The frameworks among ``known`` whose classes a model's skeleton names: what its
    zygote would import to attach it (imported in the runtime instead, once)."""
    return frameworks_named(skeleton_strings(skeleton), known)


def frameworks_named(strings: set[str], known: tuple[str, ...]) -> set[str]:
    """:func:`frameworks_in`, from the skeleton's :func:`skeleton_strings`."""
    found: set[str] = set()
    for argument in strings:
        name = argument.split(" ")[0]  # GLOBAL's argument is "module name"
        top = name.split(".")[0]
        if top in known:
            found.add(top)
        elif name in _ADAPTER_FRAMEWORKS:
            found.add(_ADAPTER_FRAMEWORKS[name])
    return found


def loads_on_attach(strings: set[str]) -> bool:
    """Whether attaching the model loads it (TorchScript, torch.export: sources/files.py's
    ZygoteLoaded), from its skeleton's :func:`skeleton_strings`: a zygote of its own then
    loads it once for all its workers."""
    return {"workerpool.sources.files", "_load_in_worker"} <= strings or \
        "workerpool.sources.files _load_in_worker" in strings


class Forked:
    """A zygote or loader the runtime forked: not our child, so watched and signalled
    through a pidfd (never a pid that could be recycled) and reaped by the runtime. Offers
    what the Supervisor and the loading code use of ``subprocess.Popen``; its exit status
    went to the runtime (``status_known`` False; ``returncode`` -1 once it has exited)."""

    status_known = False

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self._pidfd = pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """None while it runs; once it has exited, -1 (its status went to the runtime)."""
        if self.returncode is None and self._has_exited(0):
            self._exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._has_exited(timeout):
                raise subprocess.TimeoutExpired("workerpool zygote", timeout)
            self._exited()
        return self.returncode

    def _has_exited(self, timeout: float | None) -> bool:
        # poll(), not select(): a server with many models has descriptors past 1024
        waiter = select.poll()
        waiter.register(self._pidfd, select.POLLIN)
        return bool(waiter.poll(None if timeout is None else int(timeout * 1000)))

    def kill(self) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _exited(self) -> None:
        self.returncode = -1
        os.close(self._pidfd)
        self._pidfd = -1


class Hosted(Forked):
    """A pool's zygote played by the runtime process (no process of its own): what Forked
    offers, told through the pool's channel. It has "exited" once the runtime has closed
    its end (the pool's workers are then gone, or going: each watches the runtime);
    killing it closes ours, and the runtime kills them."""

    def __init__(self, pid: int, channel: socket.socket):
        super().__init__(pid, -1)  # pid: the runtime's, the parent of the pool's workers
        self._channel = channel

    def _exited(self) -> None:
        self.returncode = -1

    def _has_exited(self, timeout: float | None) -> bool:
        if self._channel.fileno() < 0:  # the Supervisor closed it: done with it
            return True
        waiter = select.poll()
        waiter.register(self._channel, 0)  # POLLHUP: the runtime's end is closed
        return bool(waiter.poll(None if timeout is None else int(timeout * 1000)))

    def kill(self) -> None:
        if self.returncode is None and self._channel.fileno() >= 0:
            try:
                self._channel.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Runtime:
    """The process that imports the frameworks once and plays (or forks) the zygote of
    every pool that shares it. Thread-safe: pools of a server start in threads of their
    own."""

    def __init__(self, start_timeout: float = 300.0):
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._learned: set[str] = set()  # frameworks zygotes reported importing
        self.forks = 0
        self._spawned = False  # a runtime process was spawned once: the next is a restart
        self.restarts = 0
        self.closed = False

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def learn(self, modules: list[str]) -> None:
        """Frameworks a zygote imported: the runtime imports them before its next fork."""
        with self._lock:
            self._learned.update(modules)

    def zygote_channel(self, skeleton: bytes, start_method: str = "zygote"
                       ) -> tuple["Forked | Hosted", socket.socket]:
        """The pool's zygote, not yet booted, and our end of its channel: played by the
        runtime itself where the model attaches zero-copy (workers/runtime.py says why),
        else a process forked from it."""
        strings = skeleton_strings(skeleton)
        role = "host" if start_method == "zygote" and not loads_on_attach(strings) \
            else "zygote"
        return self._fork(role, frameworks_named(strings, PREIMPORTABLE))

    def loader_channel(self) -> tuple["Forked", socket.socket]:
        """A loader forked from the runtime (workers/loader.py), waiting for its request,
        and our end of its channel: load() runs there without importing the frameworks
        the runtime has."""
        return self._fork("loader", set())

    def _fork(self, role: str, named: set[str]) -> tuple["Forked", socket.socket]:
        with self._lock:
            modules = sorted(named | self._learned)
            if self.closed:
                raise PoolStartError("this runtime is closed: no zygote can start from it")
            for attempt in range(2):  # a runtime that died is started again, once
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    self._ensure_running()
                    try:
                        control.send(self._ctl, {"op": "fork", "modules": modules,
                                                 "as": role})
                        control.send_fds(self._ctl, [theirs.fileno()])
                        self._ctl.settimeout(self.start_timeout)
                        reply = control.recv(self._ctl)
                        pidfd = control.recv_fds(self._ctl, 1)[0] \
                            if reply and reply["op"] == "forked" else None
                        if reply is not None and reply["op"] == "hosted":
                            self.forks += 1
                            return Hosted(reply["pid"], ours), ours
                    except (OSError, ConnectionError):
                        reply = None
                    finally:
                        if self._ctl is not None:
                            self._ctl.settimeout(None)
                finally:
                    theirs.close()
                if reply is not None and reply["op"] == "forked":
                    self.forks += 1
                    return Forked(reply["pid"], pidfd), ours
                ours.close()
                if reply is not None:  # it answered: an import failed, say which
                    raise PoolStartError(f"the runtime could not fork a {role}:\n"
                                         f"{reply['traceback']}")
                self._discard()
            raise PoolStartError(f"the runtime process died twice while forking a {role}")

    def _ensure_running(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:
            self._discard()
        # Counted here, not where a dead one is found: a runtime SIGKILLed a moment ago
        # may still poll as running, fail the fork's send, and be discarded by _fork
        if self._spawned:
            self.restarts += 1
        from .supervisor import spawn_runtime

        self._process, self._ctl = spawn_runtime()
        self._spawned = True

    def _discard(self, timeout: float = 5.0) -> None:
        """Close our channel (the runtime leaves once its children have) and reap it,
        killed past ``timeout``."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def close(self, timeout: float = 15.0) -> None:
        """Let the runtime go once its zygotes have (close the pools first); kill it past
        ``timeout``. Always reaps. Idempotent; no pool can start from it afterwards."""
        with self._lock:
            self.closed = True
            self._discard(timeout)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
