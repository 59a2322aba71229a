"""The parent's side of process management: the only module that starts a process.

    Supervisor ──Popen (fresh interpreter, weights fd + control socket passed)──> zygote
               or, given a Runtime (pool/runtime.py), a zygote forked from that shared process
        start_zygote()   boot message out, "booted" (or the boot traceback) back
        start_worker()   "start" out; later "started" {pid} and, when it dies, "exited" {status}
        signal_worker()  the zygote delivers it through the worker's pidfd
        stop_zygote()    "exit", wait, SIGKILL past the grace period; always reaped

The zygote forks (or spawns) and reaps the workers, so exit statuses are exact; this side
turns them into words (:func:`describe_exit`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from ..config import PoolConfig
from ..errors import PoolStartError
from ..ipc import control, endpoints, wire
from ..publishing import PublishedModel
from ..workers.output import quiet_environment

if TYPE_CHECKING:
    from .runtime import Runtime


class Supervisor:
    def __init__(self, config: PoolConfig, published: PublishedModel, private_dir: str,
                 endpoint: str, warmup: tuple[bytes, list], runtime: "Runtime | None" = None):
        self.config = config
        self.runtime = runtime  # where the zygote is forked from; None: spawned fresh
        self.warmup = warmup  # the codec-encoded warm-up inputs (header, frames)
        self.published = published
        self.private_dir = private_dir
        self.endpoint = endpoint
        self.zygote: subprocess.Popen | None = None
        # What a worker presents in READY to be admitted: only processes we started know it
        # (it travels on the zygote's private channel, never through a file or argv).
        self.secret = secrets.token_bytes(32)
        self.zygote_threads = 0
        self.zygote_modules: list[str] = []  # frameworks it imported: a successor preimports
        self.ctl: socket.socket | None = None

    def start_zygote(self, prestarted: "PrestartedZygote | None" = None) -> None:
        """Start the zygote and wait until it has attached the model (or failed to).

        ``prestarted``: a zygote process started earlier (its imports done meanwhile) to
        use instead of a fresh one; it gets the weights' fds over its socket, as does a
        zygote forked by the pool's runtime."""
        handed_fds = prestarted is not None or self.runtime is not None
        if prestarted is not None:
            self.zygote, parent_end = prestarted.take()
        elif self.runtime is not None:
            self.zygote, parent_end = self.runtime.zygote_channel(self.published.skeleton,
                                                                  self.config.start_method)
        else:
            self.zygote, parent_end = spawn_zygote(self.published.fd, self.published.all_fds())
        self.ctl = parent_end
        try:
            control.send(parent_end, self._boot_message())
            if handed_fds:
                control.send_fds(parent_end, self.published.all_fds())
        except OSError:
            pass  # it died; its reply (EOF) says so below
        parent_end.settimeout(self.config.start_timeout)
        try:
            reply = control.recv(parent_end)
        except socket.timeout:
            reply = {"op": "boot_error", "traceback":
                     f"the zygote did not attach the model within {self.config.start_timeout} s"}
        finally:
            parent_end.settimeout(None)
        if reply is None or reply["op"] != "booted":
            detail = reply["traceback"] if reply else _died_before_attaching(self.zygote)
            self.stop_zygote()
            raise PoolStartError(f"the worker zygote could not attach the model:\n{detail}")
        self.zygote_threads = reply["threads"]
        self.zygote_modules = reply.get("modules", [])
        if self.runtime is not None:
            self.runtime.learn(self.zygote_modules)

    def restart_zygote(self) -> None:
        """Reap the zygote that died and start a new one on the weights this process still
        holds (the segments and file mappings are unchanged): PoolStartError if it cannot
        attach them."""
        if self.zygote is not None:
            self.zygote.wait()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        if not os.path.isdir(self.private_dir):  # it left the usual way, and cleaned up
            raise PoolStartError("the pool's private directory is gone")
        self.start_zygote()

    def _boot_message(self) -> dict:
        config = self.config
        return {
            "op": "boot",
            "skeleton": self.published.skeleton,
            "file_fds": self.published.file_fds,  # same numbers in the zygote (pass_fds)
            "region_fds": self.published.region_fds,  # kept open: opened by path in workers
            "start_method": config.start_method,
            "sys_path": list(sys.path),
            "parent_pid": os.getpid(),
            "private_dir": self.private_dir,
            "endpoint": self.endpoint,
            "threads_per_worker": config.threads,
            "credits_per_worker": config.credits_per_worker,
            "max_message_bytes": config.max_message_bytes,
            "zero_copy_threshold": config.zero_copy_threshold,
            "heartbeat_interval": config.heartbeat_interval,
            "secret": self.secret,
            "warmup": (self.warmup[0], [bytes(f) for f in self.warmup[1]]),
        }

    @property
    def control_fd(self) -> int:
        return self.ctl.fileno()

    @property
    def zygote_pid(self) -> int | None:
        return self.zygote.pid if self.zygote else None

    def start_worker(self, worker_id: int, identity: bytes,
                     cpus: list[int] | None = None) -> None:
        self._send({"op": "start", "worker_id": worker_id, "identity": identity, "cpus": cpus})

    def signal_worker(self, worker_id: int, signum: int) -> None:
        """Delivered by the zygote through the worker's pidfd: never to a recycled pid."""
        self._send({"op": "signal", "worker_id": worker_id, "signum": signum})

    def _send(self, message: dict) -> None:
        try:
            control.send(self.ctl, message)
        except OSError:
            pass  # the zygote is gone; read_event reports that as "zygote_died"

    def read_event(self) -> dict:
        """The zygote's next report; ``{"op": "zygote_died"}`` when the channel closes."""
        message = control.recv(self.ctl)
        return message if message is not None else {"op": "zygote_died"}

    def crash_report(self, worker_id: int) -> str:
        """What the worker's faulthandler (or boot failure) left behind; removes it."""
        path = endpoints.crash_log_path(self.private_dir, worker_id)
        try:
            with open(path) as log:
                text = log.read()
            os.unlink(path)
        except FileNotFoundError:
            return ""
        return text.strip()

    def stop_zygote(self, grace: float = 5.0) -> None:
        """Let the zygote reap what is left and exit; kill it past ``grace``. Always reaps."""
        if self.zygote is None:
            return
        try:
            if self.ctl is not None:
                control.send(self.ctl, {"op": "exit"})
        except OSError:
            pass
        try:
            self.zygote.wait(grace)
        except subprocess.TimeoutExpired:
            # Its workers watch its pidfd and exit with it.
            self.zygote.kill()
            self.zygote.wait()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None

    def kill_zygote(self) -> None:
        if self.zygote is not None and self.zygote.poll() is None:
            self.zygote.kill()
        self.stop_zygote(grace=5.0)


def spawn_zygote(weights_fd: int | None, pass_fds: list[int],
                 **environment: str) -> tuple[subprocess.Popen, socket.socket]:
    """A fresh zygote interpreter and this side of its control socket. ``weights_fd``
    None: a prestarted zygote, which gets its fds over the socket later."""
    return spawn_with_channel("workerpool.workers.zygote",
                              ["-" if weights_fd is None else str(weights_fd)], pass_fds,
                              **{**worker_environment(), **environment})


def spawn_runtime() -> tuple[subprocess.Popen, socket.socket]:
    """A fresh runtime interpreter (workers/runtime.py) watching this process."""
    return spawn_with_channel("workerpool.workers.runtime", [str(os.getpid())],
                              **worker_environment())


def worker_environment() -> dict[str, str]:
    """What a zygote or a runtime starts with, and so every worker forked from it.

    One OpenMP/MKL thread: the zygote must never start a thread pool (a worker sets its
    own count). MKL's buffer cache off unless the user set MKL_DISABLE_FAST_MM: with it on,
    every worker keeps MKL's GEMM buffers for good (measured, a BERT-base worker: 4.1 MiB of
    its 11 MiB private; req/s unchanged with it off, glibc's heap reuses the buffers).
    """
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MKL_DISABLE_FAST_MM": os.environ.get("MKL_DISABLE_FAST_MM", "1")}


def _died_before_attaching(zygote) -> str:
    status = zygote.wait()
    if not getattr(zygote, "status_known", True):  # forked by a runtime, which reaped it
        return "the zygote died before attaching (a crash in native code?)"
    return f"the zygote exited with status {status} before attaching"


def spawn_with_channel(module: str, args: list[str], pass_fds: list[int] = (), stdin=None,
                       **environment: str) -> tuple[subprocess.Popen, socket.socket]:
    """``python -m module <its socket's fd> *args``, a fresh interpreter with this process's
    sys.path, the frameworks' quiet mode and ``environment``; returns it and this side of
    the socketpair between us."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(child_end.fileno()), *args],
            pass_fds=[child_end.fileno(), *pass_fds], stdin=stdin,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                     **quiet_environment(os.environ), **environment))
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    return process, parent_end


class PrestartedZygote:
    """A zygote process started before its model exists, importing ``modules`` (the
    frameworks of the zygote it will succeed) while the parent loads and publishes the
    model; ``Supervisor.start_zygote`` then hands it the boot message and the fds. Exits
    by itself when its socket closes (discard, or this process's death)."""

    def __init__(self, modules: list[str]):
        from ..workers.zygote import PREIMPORT_ENV

        self.process: subprocess.Popen | None
        self.ctl: socket.socket | None
        self.process, self.ctl = spawn_zygote(None, [],
                                              **{PREIMPORT_ENV: ",".join(modules)})

    def take(self) -> tuple[subprocess.Popen, socket.socket]:
        process, ctl = self.process, self.ctl
        self.process = self.ctl = None
        return process, ctl

    def discard(self) -> None:
        """Close its socket (it exits) and reap it. Idempotent."""
        process, ctl = self.take()
        if ctl is not None:
            ctl.close()
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


_LIKELY_CAUSE = {
    signal.SIGKILL: "killed by SIGKILL (out of memory? the kernel's OOM killer sends it)",
    signal.SIGSEGV: ("a segmentation fault. Most often an in-place write to a shared model "
                     "weight: weights are mapped read-only in workers, so clone a tensor "
                     "(t.clone()) before modifying it; otherwise a crash in native code"),
    signal.SIGBUS: "a bus error (a mapped weight file shrank, or a disk error)",
    signal.SIGABRT: "aborted (a failed assertion in native code, or stopped by the pool)",
    signal.SIGTERM: "terminated by another process",
    signal.SIGFPE: "an arithmetic fault in native code",
    signal.SIGILL: "an illegal instruction (a library built for another CPU?)",
}


def describe_exit(pid: int, status: int) -> str:
    """Words for how a worker ended: exit code or signal, and the likely cause."""
    if status < 0:
        try:
            sig = signal.Signals(-status)
        except ValueError:
            return f"worker {pid} was killed by signal {-status}"
        cause = _LIKELY_CAUSE.get(sig, "")
        return f"worker {pid} was killed by {sig.name}" + (f": {cause}" if cause else "")
    meaning = _EXIT_CODES.get(status, "predict called os._exit/sys.exit, or a library ended "
                                      "the process")
    return f"worker {pid} exited with code {status} ({meaning})"


_EXIT_CODES = {
    wire.EXIT_BOOT_ERROR: "it could not attach the model or connect to the pool",
    wire.EXIT_PARENT_GONE: "the pool's process or the zygote died",
    wire.EXIT_SERVING_ERROR: "its work loop failed after it was ready: a bug in workerpool, "
                             "please report it with the traceback below",
}
