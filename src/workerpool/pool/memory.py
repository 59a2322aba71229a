"""Memory accounting of the pool's processes: PSS/USS (psutil) and the weight segment's share."""

from __future__ import annotations

import psutil

from ..ipc import memfd


def process_memory(pid: int) -> dict:
    """PSS, USS, RSS and resident shared bytes of ``pid`` (zeros if it is gone)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"pss": 0, "uss": 0, "rss": 0, "shared": 0}
    return {"pss": info.pss, "uss": info.uss, "rss": info.rss, "shared": info.shared}


def segment_mappings(pid: int) -> list[dict]:
    """Every mapping of the weight memfd in ``pid``: permissions and its smaps counters (bytes)."""
    mappings: list[dict] = []
    current = None
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                    current = None
                    if len(fields) >= 6 and f"memfd:{memfd.MEMFD_NAME}" in line:
                        current = {"perms": fields[1]}
                        mappings.append(current)
                elif current is not None and len(fields) == 3 and fields[2] == "kB":
                    current[fields[0].rstrip(":").lower()] = int(fields[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return mappings
