"""The zygote: the one process that starts workers, and the one that reaps them.

    parent (supervisor) ──control socketpair──> zygote ──fork──> worker (zygote mode)
                                                       └─spawn─> worker (spawn mode)

The parent spawns the zygote fresh (never forked from the parent, which may have run
multi-threaded torch ops and hosts the dispatcher thread). In zygote mode it imports the
user's code, maps the weights read-only and rebuilds the model once; then it only forks, so
each worker starts with the model already attached: no import, no load, milliseconds. The
zygote must stay single-threaded and must never run a model op (a child forked after a
multi-threaded op can hang in OpenMP forever).

In spawn mode it keeps the weights fd and starts ``python -m workerpool.workers.main`` with
that fd passed on, for libraries where fork is unsafe.

Either way it reaps its children and reports each exit status to the parent, and relays
what they write to stderr, a line at a time with the worker's id (workers/output.py). When the
parent dies (pidfd) or closes the channel it kills every worker; on its way out it removes
the pool's private directory.

SIGINT and SIGTERM are ignored here and in the workers: a Ctrl-C or a SIGTERM to the whole
process group (systemd's stop, ``kill -TERM -PGID``) is the pool's process's to act on. It
closes the pool (a server drains first) or dies, and then the zygote, which outlives it by
design, kills the workers and removes the private directory: nothing is left either way.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import traceback

from ..ipc import control, endpoints
from ..modules import PREIMPORTABLE
from . import main as worker_main
from .output import Relay, held_back_when_quiet, is_quiet

from ..ipc.wire import EXIT_BOOT_ERROR, EXIT_PARENT_GONE


class Zygote:
    """One pool's zygote: a process of its own, which attaches the model once and forks
    workers that have it; or a role the runtime plays for a pool (``host``,
    workers/runtime.py), which attaches nothing: each worker it forks attaches the weights
    after the fork."""

    def __init__(self, ctl: socket.socket, boot: dict, weights_fd: int, host=None):
        self.ctl = ctl
        self.boot = boot
        self.weights_fd = weights_fd
        self.host = host
        # a hosted zygote's process is the runtime, which watches the pool's process itself
        self.parent_pidfd = os.pidfd_open(boot["parent_pid"]) if host is None else -1
        self.children: dict[int, tuple[int, int, subprocess.Popen | None]] = {}  # pidfd ->
        self.output_of: dict[int, int] = {}  # pidfd -> read end of the worker's stderr pipe
        self.relay = Relay(is_quiet())
        self.exiting = False
        self.model = self.predict = None

    # -- lifecycle verbs -----------------------------------------------------------------
    def attach_model(self) -> None:
        if self.boot["start_method"] != "zygote":
            return
        from .attach import attach_boot

        self.model, self.predict = attach_boot(self.boot, self.weights_fd)
        self.weights_fd = -1
        worker_main.import_worker_modules()  # (the adapter of the model's framework too)
        # Everything built so far is read-only for the workers: freeze it out of the cyclic
        # GC, whose full collections in a worker would otherwise write to every object's
        # header and copy the zygote's heap page by page (measured, a SavedModel's worker
        # after its first request: 92 MiB private, 37 MiB frozen).
        gc.collect()
        gc.freeze()

    def start_worker(self, worker_id: int, identity: bytes, cpus: list[int] | None) -> None:
        boot = dict(self.boot, worker_id=worker_id, identity=identity, cpus=cpus)
        read_fd, write_fd = self.relay.open()
        try:
            if self.boot["start_method"] == "zygote":
                pid = os.fork()
                if pid == 0:
                    os.dup2(write_fd, 2)
                    os.close(write_fd)
                    os.close(read_fd)
                    self._become_worker(boot)  # never returns
                popen = None
            else:
                popen = self._spawn_worker(boot, stderr=write_fd)
                pid = popen.pid
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.relay.watch(read_fd, f"[worker {worker_id} pid {pid}] ")
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (worker_id, pid, popen)
        self.output_of[pidfd] = read_fd
        control.send(self.ctl, {"op": "started", "worker_id": worker_id, "pid": pid})

    def reap_worker(self, pidfd: int) -> None:
        worker_id, pid, popen = self.children.pop(pidfd)
        os.close(pidfd)
        if popen is not None:
            status = popen.wait()
        else:
            _, wait_status = os.waitpid(pid, 0)
            status = os.waitstatus_to_exitcode(wait_status)
        self.relay.finish(self.output_of.pop(pidfd))
        control.send(self.ctl, {"op": "exited", "worker_id": worker_id, "pid": pid,
                                "status": status})

    def kill_workers(self) -> None:
        for pidfd, (_, pid, popen) in list(self.children.items()):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if popen is not None:
                popen.wait()
            else:
                os.waitpid(pid, 0)
            os.close(pidfd)
        self.children.clear()
        self.output_of.clear()
        self.relay.close_all()

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        while True:
            if self.exiting and not self.children:
                return 0
            readable, _, _ = select.select([self.parent_pidfd, *self.watched()], [], [])
            for fd in readable:
                if fd == self.parent_pidfd:
                    self.kill_workers()
                    return EXIT_PARENT_GONE
                if not self.on_readable(fd):
                    return 0

    def watched(self) -> list[int]:
        """What this zygote waits on besides the pool's process: its channel, its
        workers' pidfds and their stderr pipes."""
        return [self.ctl.fileno(), *self.children, *self.relay.fds()]

    def on_readable(self, fd: int) -> bool:
        """Handle ``fd`` (one of :meth:`watched`); False once this zygote is done (the
        parent closed the channel: its workers are killed; or told to exit: all reaped)."""
        if fd == self.ctl.fileno():
            message = control.recv(self.ctl)
            if message is None:  # the parent closed the channel or died
                self.kill_workers()
                return False
            self.handle(message)
        elif fd in self.children:
            self.reap_worker(fd)
        elif fd in self.output_of.values():
            self.relay.read(fd)
        return not (self.exiting and not self.children)

    def close_in_child(self) -> None:
        """In a worker forked by the runtime for another pool: nothing of ours is its."""
        self.ctl.close()
        for pidfd in self.children:
            os.close(pidfd)
        self._close_model_fds()
        self.relay.close_in_child()

    def release(self, remove_private_dir: bool = True) -> None:
        """A hosted zygote that is done: its workers killed, its descriptors closed (the
        parent's end of the channel then reads end of file) and the pool's private
        directory removed, as a zygote process does on its way out."""
        self.kill_workers()
        self._close_model_fds()
        self.ctl.close()
        if remove_private_dir:
            endpoints.remove_private_dir(self.boot["private_dir"])

    def _close_model_fds(self) -> None:
        """The weights', weight files' and mapped constants' fds a hosted zygote keeps for
        the workers it will fork."""
        for fd in [self.weights_fd, *self.boot["file_fds"], *self.boot["region_fds"]]:
            if fd >= 0:
                os.close(fd)
        self.weights_fd = -1
        self.boot["file_fds"] = self.boot["region_fds"] = []

    def handle(self, message: dict) -> None:
        op = message["op"]
        if op == "start":
            try:
                self.start_worker(message["worker_id"], message["identity"],
                                  message.get("cpus"))
            except Exception:
                control.send(self.ctl, {"op": "start_error", "worker_id": message["worker_id"],
                                        "traceback": traceback.format_exc()})
        elif op == "signal":
            for pidfd, (worker_id, _, _) in self.children.items():
                if worker_id == message["worker_id"]:
                    signal.pidfd_send_signal(pidfd, message["signum"])
        elif op == "exit":
            self.exiting = True

    # -- the two ways a worker comes to be ---------------------------------------------
    def _become_worker(self, boot: dict) -> None:
        code = EXIT_BOOT_ERROR
        try:
            self.ctl.close()
            if self.host is not None:
                self.host.close_in_child(keep=self)
                model, predict = self.attach_in_worker()
            else:
                os.close(self.parent_pidfd)
                model, predict = self.model, self.predict
            for pidfd in self.children:
                os.close(pidfd)
            self.relay.close_in_child()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = worker_main.serve(model, predict, boot)
        except BaseException:
            worker_main.write_boot_error(boot)
        finally:
            os._exit(code)

    def attach_in_worker(self):
        """``(model, predict)`` in a worker the runtime forked for this pool: its weights
        mapped here, after the fork (the runtime attaches no model: two pools' modules
        could share a name)."""
        from .attach import attach_boot

        sys.path[:] = self.boot["sys_path"]
        return attach_boot(self.boot, self.weights_fd)

    def _spawn_worker(self, boot: dict, stderr: int) -> subprocess.Popen:
        threads = str(self.boot["threads_per_worker"])
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        popen = subprocess.Popen(
            [sys.executable, "-m", "workerpool.workers.main", str(self.weights_fd)],
            stdin=subprocess.PIPE, stderr=stderr, env=env,
            pass_fds=[self.weights_fd, *self.boot["file_fds"], *self.boot["region_fds"]])
        popen.stdin.write(pickle.dumps(boot, protocol=pickle.HIGHEST_PROTOCOL))
        popen.stdin.close()
        return popen


# What a prestarted zygote may import before its boot message: the frameworks the zygote
# it replaces had imported (importing them is most of a zygote's start-up time).
PREIMPORT_ENV = "WORKERPOOL_ZYGOTE_PREIMPORT"


def preimport(names: str) -> None:
    for name in names.split(","):
        if name in PREIMPORTABLE:
            try:
                __import__(name)
            except Exception:  # noqa: BLE001 - attach imports it again and reports
                pass


def receive_fds(ctl: socket.socket, boot: dict) -> int:
    """The weights fd, weight-file fds and region fds, sent after the boot message
    (SCM_RIGHTS); the boot message's fds are renumbered to ours. Returns the weights fd."""
    n_files = len(boot["file_fds"])
    expected = 1 + n_files + len(boot["region_fds"])
    fds = control.recv_fds(ctl, expected)
    boot["file_fds"] = fds[1:1 + n_files]
    boot["region_fds"] = fds[1 + n_files:]
    return fds[0]


def os_thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def booted_message() -> dict:
    """What a zygote (a process, or the runtime for a hosted pool) says once the model is
    attached: the process that forks the pool's workers, its thread count (stats'
    threads_at_boot) and the frameworks it has imported (a successor preimports them)."""
    return {"op": "booted", "pid": os.getpid(), "threads": os_thread_count(),
            "modules": [m for m in PREIMPORTABLE if m in sys.modules]}


def main(argv: list[str]) -> int:
    worker_main.ignore_stop_signals()
    ctl = socket.socket(fileno=int(argv[0]))
    prestarted = argv[1] == "-"
    return serve_channel(ctl, None if prestarted else int(argv[1]),
                         os.environ.get(PREIMPORT_ENV, "") if prestarted else "")


def serve_channel(ctl: socket.socket, weights_fd: int | None, preimports: str = "") -> int:
    """Be one pool's zygote over ``ctl``: boot message in, attach, then start and reap
    workers until told to exit. ``weights_fd`` None: the fds come over ``ctl`` after the
    boot message (a prestarted zygote, or one forked by a runtime: workers/runtime.py)."""
    # Importing a framework prints before its log level applies: held back, then filtered.
    with held_back_when_quiet("[workerpool zygote] "):
        if preimports:  # started before its model existed: import while the parent loads it
            preimport(preimports)
        boot = control.recv(ctl)
        if boot is None:
            return 0
        sys.path[:] = boot["sys_path"]
        try:
            if weights_fd is None:
                weights_fd = receive_fds(ctl, boot)
            zygote = Zygote(ctl, boot, weights_fd)
            zygote.attach_model()
        except BaseException:
            control.send(ctl, {"op": "boot_error", "traceback": traceback.format_exc()})
            return EXIT_BOOT_ERROR
    control.send(ctl, booted_message())
    try:
        return zygote.run()
    finally:
        # Whoever leaves last cleans up: after a SIGKILL of the parent that is us.
        endpoints.remove_private_dir(boot["private_dir"])


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))
