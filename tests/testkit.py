"""Helpers for assertions about processes, mappings and things that happen eventually."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import threading
import time

import psutil


def segment_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the weight memfd."""
    with open("/proc/self/maps") as maps:
        lines = [line for line in maps if "memfd:workerpool-weights" in line]
    return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in lines]


def our_memfds() -> list[str]:
    """This process's open fds of weight memfds."""
    found = []
    for fd in glob.glob("/proc/self/fd/*"):
        try:
            if "memfd:workerpool" in os.readlink(fd):
                found.append(fd)
        except OSError:
            pass
    return found


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition, timeout: float = 30.0) -> bool:
    """Poll ``condition()`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Traffic:
    """``threads`` callers running ``request(i)`` (i: the caller's index) back to back while
    the ``with`` block runs. Each answer is kept with the ``floor`` read just before its
    request was sent (a test raises it when no later request may see what came before);
    every exception is kept in ``failures``."""

    def __init__(self, request, threads: int, floor=0):
        self.request = request
        self.floor = floor
        self.answers: list[tuple] = []  # (floor when sent, answer)
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            floor = self.floor
            try:
                self.answers.append((floor, self.request(index)))
            except BaseException as exc:  # noqa: BLE001 - every failure is the test's
                self.failures.append(exc)

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def one_tensorflow_thread(tf) -> None:
    """One intra-op and one inter-op TensorFlow thread in this process, as the pools' workers
    run (TF's results depend on it), so references computed here compare bit for bit. Must
    come before this process's first op; where TF already ran one (a server importing a test
    module to load a model while another model started TF), nothing changes."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass


def kill_a_worker_and_wait_for_its_replacement(pool) -> int:
    """SIGKILL the pool's first worker; return its pid once a replacement took its place
    and every worker is ready (asserted)."""
    import signal

    victim = pool.pids[0]
    workers = len(pool.pids)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in pool.pids and len(pool.pids) == workers and all(
        w["state"] == "ready" for w in pool.stats(memory_usage=False)["workers"]))
    return victim


@contextlib.contextmanager
def ctrl_c_once(ready, timeout: float = 10.0):
    """Ctrl-C to this (the main) thread while the body runs, once ``ready()`` holds: again
    every 0.2 s until the body is done (in two full-suite runs a single SIGINT on a timer
    came to nothing, which no run of one module alone reproduced). Python's own handler is
    installed meanwhile, whatever this process inherited: a test run started in the
    background by a non-interactive shell ignores SIGINT (POSIX), and Python then installs
    none, so no KeyboardInterrupt would ever come."""
    main, done = threading.get_ident(), threading.Event()

    def interrupt():
        assert wait_until(ready, timeout)
        while not done.is_set():
            time.sleep(0.2)
            if not done.is_set():
                signal.pthread_kill(main, signal.SIGINT)

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, lambda *_: None)  # a late one lands here
        done.set()
        interrupter.join(5)
        signal.signal(signal.SIGINT, inherited)
