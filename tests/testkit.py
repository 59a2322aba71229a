"""Helpers for assertions about processes, mappings and things that happen eventually."""

from __future__ import annotations

import glob
import os
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
