"""Trials and many-models rows as bench/report.py writes them, for the report's unit tests
(tests/unit/test_report_render.py, test_report_summary.py)."""

from __future__ import annotations

SETTINGS = {"seconds": 8, "per_worker": 100, "clients": 32, "recover_timeout": 60,
            "min_samples": 300, "max_seconds": 120}


def trial(contender: str, rep: int, recover_s, rps: float, samples: int, wrong: int = 0,
          pss: float = 500.0) -> dict:
    load = {"rps": rps, "p50_ms": 10.0, "p99_ms": 20.0 + rep, "requests": samples,
            "failed": 0, "samples": samples, "pids": 1, "checked": samples, "wrong": wrong}
    return {"contender": contender, "model": "mlp8", "workers": 1, "rep": rep,
            "settings": SETTINGS, "start_s": 2.0 + rep, "pss_mib": pss + rep,
            "processes": 3, "max_abs_diff": 0.0, "load": load,
            "single": {**load, "checked": 10, "wrong": 0},
            "restart": {"recover_s": recover_s, "failed": 0},
            "harness": "abc1234", "left_running": []}


def many(contender: str, rep: int, pss: float, wrong: int = 0, samples: int = 400) -> dict:
    load = {"rps": 50.0 + rep, "p50_ms": 10.0, "p99_ms": 30.0, "requests": samples,
            "failed": 0, "samples": samples, "pids": 8, "checked": samples, "wrong": wrong}
    return {"contender": contender, "many": "8x32", "models": 8, "rep": rep,
            "settings": SETTINGS, "start_s": 9.0, "pss_mib": pss, "processes": 10,
            "max_abs_diff": 0.0, "load": load, "single": {**load, "wrong": 0},
            "left_running": []}
