"""``--http-workers N``: the server's HTTP front-end processes, started, replaced, stopped.

    start()  N processes (http/front_end.py), each listening on the server's port with
             SO_REUSEPORT (the kernel spreads new connections over them) and connected to
             the relay; the server's own process holds the port (bound, not listening)
    a front end dies (a crash, a kill)  -> logged and replaced; its open connections end,
             and so do those the kernel had queued on its socket, not yet accepted; new
             ones go to the others meanwhile
    stop(t)  SIGTERM each: it stops accepting and finishes its requests (up to t seconds,
             while the server's relay still answers them); SIGKILL after; all reaped
    the server's process is killed -> each front end exits (a pidfd lifeline, front_end.py)

One socket per process rather than one shared socket: on a shared socket whichever process
wakes first accepts every waiting connection (measured: 16 connections opened together
all went to one front end, which ran at 96% CPU while the other idled at 1%).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from .settings import ServerSettings

log = logging.getLogger("workerpool.serve")

# A front end that dies sooner than this after its start is restarted after a pause, so a
# broken one does not spin.
_QUICK_DEATH_S = 1.0
_RESTART_PAUSE_S = 1.0


class HttpWorkers:
    def __init__(self, count: int, address: tuple[str, int], relay_path: str,
                 settings: ServerSettings):
        self.count = count
        self.boot = json.dumps({"server_pid": os.getpid(), "address": list(address),
                                "relay": relay_path,
                                "settings": dataclasses.asdict(settings)}).encode()
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watchers: list[threading.Thread] = []

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self.processes if p is not None and p.poll() is None]

    def start(self) -> None:
        for index in range(self.count):
            with self._lock:
                self._spawn(index)
            watcher = threading.Thread(target=self._watch, args=(index,),
                                       name=f"workerpool-http-worker-{index}", daemon=True)
            watcher.start()
            self._watchers.append(watcher)

    def _spawn(self, index: int) -> None:
        """(with the lock held, so stop() never misses a process)"""
        process = subprocess.Popen([sys.executable, "-m", "workerpool.serve.http.front_end"],
                                   stdin=subprocess.PIPE)
        try:
            process.stdin.write(self.boot)
            process.stdin.close()
        except OSError:
            pass  # it died at once: its watcher sees it
        self.processes[index] = process

    def _watch(self, index: int) -> None:
        while True:
            with self._lock:
                process = self.processes[index]
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            log.warning("workerpool serve: HTTP front end %d (pid %d) exited with %s; "
                        "starting another", index, process.pid, code)
            if time.monotonic() - started < _QUICK_DEATH_S \
                    and self._stopping.wait(_RESTART_PAUSE_S):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self._spawn(index)

    def stop(self, timeout: float) -> None:
        """SIGTERM every front end, wait up to ``timeout`` seconds for their requests to
        finish, SIGKILL what remains; every one reaped."""
        processes = self._stop_replacing()
        for process in processes:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + timeout + 5  # uvicorn's own graceful bound, then ours
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
                process.wait()
        for watcher in self._watchers:
            watcher.join()

    def kill(self) -> None:
        """A second Ctrl-C: no draining."""
        for process in self._stop_replacing():
            _signal(process, signal.SIGKILL)

    def _stop_replacing(self) -> list[subprocess.Popen]:
        """No front end is started from now on; those started so far."""
        with self._lock:
            self._stopping.set()
            return [p for p in self.processes if p is not None]


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass
