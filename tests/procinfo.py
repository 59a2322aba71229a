"""What /proc says about this process and others, for assertions."""

from __future__ import annotations

import psutil


def segment_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the weight memfd."""
    with open("/proc/self/maps") as maps:
        lines = [line for line in maps if "memfd:workerpool-weights" in line]
    return [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in lines]


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
