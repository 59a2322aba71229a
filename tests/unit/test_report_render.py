"""The report's tables say what the trials saw: a restart that never recovered is shown as
never (not dropped from a median), the range of the repetitions stands beside each median,
a p99 timed from too few answers is marked, and answers under load that differed from the
model are counted and listed. Rendered from trials as report.py writes them (tests/report_data.py)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from reporting import render  # noqa: E402
from report_data import SETTINGS, many, trial  # noqa: E402


def markdown(trials: list[dict], **more) -> str:
    data = {"machine": {"cpus": 2, "cpu": "x", "memory_gib": 1, "kernel": "k", "os": "o",
                        "python": "3.11"},
            "started": "then", "commands": ["bench/report.py"], "settings": SETTINGS,
            "contenders": ["workerpool", "litserve"], "models": ["mlp8"], "trials": trials,
            "model_info": {"mlp8": {"mib": 8, "config": {"kind": "mlp", "layers": 2,
                                                          "width": 1024}}},
            **more}
    return render.Report(data, {"workerpool": "workerpool serve",
                                "litserve": "LitServe"}).markdown()


def row(text: str, starts: str, section: str) -> str:
    part = text.split(section, 1)[1]
    return next(line for line in part.splitlines() if line.startswith(f"| {starts} |"))


def test_a_restart_that_never_recovered_counts_as_never_in_the_median():
    text = markdown([trial("workerpool", 0, 0.5, 100, 800), trial("workerpool", 1, 0.7, 100, 800),
                     trial("workerpool", 2, 0.6, 100, 800),
                     trial("litserve", 0, 3.0, 90, 800), trial("litserve", 1, None, 90, 800),
                     trial("litserve", 2, None, 90, 800)])
    assert "| 0.60 (0.50-0.70) / 0 |" in row(text, "workerpool serve", "### Start and restart")
    # two of three never recovered: the median is never, not 3.00 (the one that did)
    assert "| never (3.00-never), 2 of 3 never recovered / 0 |" in row(
        text, "LitServe", "### Start and restart")


def test_medians_carry_the_range_and_a_p99_of_few_answers_is_marked():
    text = markdown([trial("workerpool", 0, 0.5, 100, 800, pss=500),
                     trial("workerpool", 1, 0.5, 120, 250, pss=500)])
    throughput = row(text, "workerpool serve", "### Throughput")
    cells = [c.strip() for c in throughput.strip("|").split("|")]
    assert cells[2] == "110.0 (100.0-120.0)"  # req/s
    assert cells[4] == "20.5 (20.0-21.0) †"  # one repetition timed 250 answers
    assert cells[6] == "20.5 (20.0-21.0) †"  # the 1-client phase: 250 there too
    assert cells[9] == "1,070 / 0"  # every answer checked: 800 + 250 + 10 + 10
    memory = row(text, "workerpool serve", "### Memory")
    assert "| 500.5 (500.0-501.0) |" in memory


def test_answers_that_differed_under_load_are_counted_and_listed():
    text = markdown([trial("workerpool", 0, 0.5, 100, 800, wrong=3)])
    assert row(text, "workerpool serve", "### Throughput").endswith("| 810 / 3 |")
    assert "workerpool serve, mlp8, N=1, repetition 0: 3 answers under load differed" in text
    assert "harness and the contenders' apps (bench/) as of commit abc1234 (1 trials)" in text


def test_a_cold_start_has_its_columns_and_one_that_could_not_run_says_why():
    cold = trial("workerpool", 0, 0.5, 100, 800)
    cold["cold"] = {"start_s": 9.25, "left_running": []}
    refused = trial("litserve", 0, 1.0, 90, 800)
    refused["cold"] = {"error": "the page cache cannot be dropped here: [Errno 13]"}
    text = markdown([cold, refused])
    assert "| start N=1 (s) | cold start N=1 (s) | restart N=1: s / failed |" in text
    assert row(text, "workerpool serve", "### Start and restart").startswith(
        "| workerpool serve | 2.00 | 9.25 | 0.50 / 0 |")
    assert "LitServe, mlp8, N=1, repetition 0: no cold start: the page cache cannot" in text
    assert "cold start" not in markdown([trial("workerpool", 0, 0.5, 100, 800)])


def test_the_many_models_table_has_medians_ratios_and_lists_what_went_wrong():
    data_trials = [trial("workerpool", 0, 0.5, 100, 800)]
    rows = [many("workerpool", 0, 400.0), many("workerpool", 1, 420.0),
            many("litserve", 0, 1600.0, wrong=3, samples=200),
            many("litserve", 1, 1700.0),
            {"contender": "litserve", "many": "8x32", "rep": 2, "error": "Unavailable: boom"}]
    data = {"machine": {"cpus": 2, "cpu": "x", "memory_gib": 1, "kernel": "k", "os": "o",
                        "python": "3.11"},
            "started": "then", "commands": ["bench/report.py"], "settings": SETTINGS,
            "contenders": ["workerpool", "litserve"], "models": ["mlp8"],
            "trials": data_trials, "many_models": rows, "many_models_setting": "8x32",
            "model_info": {"mlp8": {"mib": 8, "config": {"kind": "mlp", "layers": 2,
                                                          "width": 1024}}}}
    text = render.Report(data, {"workerpool": "workerpool serve",
                                "litserve": "LitServe"}).markdown()
    section = "## Many models in one server: 8 distinct MLPs of 32 MiB"
    assert section in text
    ours = row(text, "workerpool serve", section)
    assert ours.startswith("| workerpool serve | 410 (400-420) | 1.00x | 10 |"), ours
    theirs = row(text, "LitServe", section)
    # 1650 / 410; a p99 of 200 answers in one repetition is marked; wrong answers counted
    assert "| 1,650 (1,600-1,700) | 4.02x |" in theirs and "30.0 †" in theirs, theirs
    assert theirs.endswith("| 1,200 / 3 |"), theirs
    problems = text.split("## What did not run", 1)[1]
    assert "- LitServe, 8x32 models, repetition 2: Unavailable: boom" in problems
    assert "- LitServe, 8x32 models, repetition 0: 3 answers differed" in problems


def test_a_failed_trial_that_a_resume_ran_again_stays_listed():
    failed = {"contender": "litserve", "model": "mlp8", "workers": 1, "rep": 0,
              "error": "RuntimeError: loadgen restart failed: Traceback\n  File x\n"
                       "RuntimeError: coroutine raised StopIteration"}
    text = markdown([trial("workerpool", 0, 0.5, 100, 800), trial("litserve", 0, 0.5, 90, 800)],
                    retried=[failed])
    assert ("- LitServe, mlp8, N=1, repetition 0: failed (RuntimeError: loadgen restart "
            "failed: Traceback ... RuntimeError: coroutine raised StopIteration), then ran "
            "again (`--resume` re-runs failed trials)") in text
