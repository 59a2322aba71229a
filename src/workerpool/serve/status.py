"""What the operators' status page shows (GET /status), from each pool's ``stats()``.

Blocking (it reads every worker's smaps): the app calls it in a thread.
"""

from __future__ import annotations

import os
import time

from .. import __version__
from ..serving.model import ModelState
from .metrics import saved_bytes
from .registry import Registry

_STARTED = time.time()


def status_report(registry: Registry) -> dict:
    memo: dict = {}  # each process's memory read once per report (pool.stats)
    return {
        "server": {"version": __version__, "pid": os.getpid(), "ready": registry.ready,
                   "uptime_s": round(time.time() - _STARTED, 1),
                   "memory_budget": budget_report(registry.budget),
                   "http_workers": http_workers_report(registry.http_workers)},
        "models": [model_report(model, memo) for model in registry.models],
    }


def budget_report(budget) -> dict | None:
    """--max-memory: the budget, what the tree held at its latest check, workers released."""
    if budget is None:
        return None
    return {"max_bytes": budget.max_bytes, "used_bytes": budget.used,
            "workers_released": budget.releases}


def http_workers_report(http_workers) -> dict | None:
    """--http-workers: the front-end processes serving now, and how many were replaced."""
    if http_workers is None:
        return None
    return {"pids": http_workers.pids(), "restarts": http_workers.restarts}


def model_report(model, memory_memo: dict | None = None) -> dict:
    report = {"name": model.name, "version": model.version, "state": model.state,
              "ready": model.ready, "error": model.error, "swaps": model.swaps,
              "metadata_source": model.signature.source, "workers": []}
    pool = model.pool
    if pool is None or model.state != ModelState.LOADED:
        return report
    try:
        stats = pool.stats(memory_memo=memory_memo)
    except Exception as exc:  # noqa: BLE001 - closing or broken: say so, show what is known
        report["error"] = str(exc).splitlines()[0]
        return report
    report.update({
        "weights_version": stats["version"],
        "retiring_versions": stats["retiring_versions"],
        "queued": stats["queued"],
        "restarts": stats["restarts"],
        "crashes": stats["crashes"],
        "model_bytes": stats["model_bytes"],
        "total_pss": stats["total_pss"],
        "saved_bytes": saved_bytes(stats),
        "parent_pss": stats["parent"]["pss"],
        "zygote_pid": stats["zygote"]["pid"],
        "zygote_pss": stats["zygote"]["pss"],
        "min_workers": stats["min_workers"],
        "max_workers": stats["max_workers"],
        "idle_timeout": stats["idle_timeout"],
        "workers_state": workers_state(stats),
        "workers": [{"pid": w["pid"], "state": w["state"], "requests": w["requests_served"],
                     "pss": w["pss"], "uss": w["uss"]} for w in stats["workers"]],
    })
    return report


def workers_state(stats: dict) -> str:
    """In words: how many workers serve, out of what range, and whether it scaled to zero."""
    if stats.get("inline"):
        return "inline (called by the process that serves the request; no workers)"
    live = sum(w["state"] in ("ready", "starting") for w in stats["workers"])
    if stats["idle_timeout"] is None:
        return f"{live} of {stats['max_workers']} (fixed)"
    if live == 0:
        return (f"scaled to zero (wakes on the next request; {stats['min_workers']}-"
                f"{stats['max_workers']} workers, idle timeout {stats['idle_timeout']:g} s)")
    return (f"{live} ({stats['min_workers']}-{stats['max_workers']}, idle timeout "
            f"{stats['idle_timeout']:g} s)")
