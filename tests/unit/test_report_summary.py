"""README's benchmark block (bench/reporting/summary.py) says what the report saw: the
servers' ratios to workerpool serve, each wider row's numbers, and every place another
server or baseline did better; README.md holds the block of the published report."""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from reporting import render, summary  # noqa: E402
from report_data import SETTINGS, many, trial  # noqa: E402

NAMES = {"workerpool": "workerpool serve", "litserve": "LitServe"}


def report_data(trials: list[dict], **more) -> dict:
    return {"machine": {"cpus": 2}, "started": "2026-12-05T01:00:00",
            "finished": "2026-12-06T02:00:00", "settings": SETTINGS,
            "contenders": ["workerpool", "litserve", "workerpool-pool"], "models": ["mlp8"],
            "trials": trials, "model_info": {"mlp8": {"mib": 8, "config": {"kind": "mlp"}}},
            **more}


def one_line(text: str, starts: str) -> str:
    """The bullet that starts so, unwrapped."""
    bullet = text.split(f"- {starts}", 1)[1].split("\n- ", 1)[0]
    return " ".join(f"{starts}{bullet}".split())


def test_the_readme_summary_says_where_another_server_did_better():
    ours = [trial("workerpool", rep, 0.5, 100, 800, pss=500) for rep in range(2)]
    theirs = [trial("litserve", rep, 0.5, 90, 800, pss=1500) for rep in range(2)]
    for t in theirs:
        t["load"] = {**t["load"], "p99_ms": 10.0}  # a better tail than ours (20-21 ms)
        t["restart"]["failed"] = 3
    text = summary.readme(render.Report(report_data(ours + theirs), NAMES))
    assert "medians of 2 interleaved repetitions" in " ".join(text.split())
    assert "| workerpool serve | 500.5 MiB | 100.0 | 20 ms | 0 |" in text
    assert "| LitServe | 3.00x | 0.90x | 0.49x | 3 |" in text
    better = " ".join(text.split("Where another server did better in this run:")[1].split())
    assert better.startswith("LitServe's p99 (0.49x ours).")  # and nothing else of theirs
    assert "Beside it" not in text  # no wider rows in this report


def test_each_wider_row_has_its_line_and_says_where_we_lost():
    trials = []
    for workers, pss in ((1, 500), (2, 508)):  # 8 MiB for the second worker
        for contender, recover in (("workerpool", 2.0), ("workerpool-pool", 0.1),
                                   ("litserve", 0.5)):
            made = trial(contender, 0, recover, 100, 800, pss=pss + (900 if contender ==
                                                                    "litserve" else 0))
            made["workers"] = workers
            trials.append(made)
    trials[-1]["restart"]["failed"] = 4  # LitServe's faster replacement lost 4 calls
    light_rows = [
        {"server": "gunicorn -w 2 + FastAPI", "body": "json", "clients": c,
         "rps_vs_gunicorn": 1, "p50_vs_gunicorn": 1} for c in (32, 1)] + [
        {"server": "workerpool serve", "body": "json", "clients": 32,
         "rps_vs_gunicorn": 0.95, "p50_vs_gunicorn": 1.1},
        {"server": "workerpool serve", "body": "json", "clients": 1,
         "rps_vs_gunicorn": 0.4, "p50_vs_gunicorn": 2.66},
        {"server": "workerpool serve, inline", "body": "json", "clients": 32,
         "rps_vs_gunicorn": 1.7, "p50_vs_gunicorn": 0.6},
        {"server": "workerpool serve, inline", "body": "json", "clients": 1,
         "rps_vs_gunicorn": 1.06, "p50_vs_gunicorn": 0.97},
        {"server": "workerpool serve, inline", "body": "binary", "clients": 1,
         "rps_vs_gunicorn": 9.0, "p50_vs_gunicorn": 9.0}]  # not the one-row JSON: unused
    streaming_rows = [{"path": "LitServe", "first item ms": 1.0, "per item us": 300.0},
                      {"path": "workerpool serve", "first item ms": 1.25, "per item us": 75.0,
                       "first item vs LitServe": 1.25, "per item vs LitServe": 0.25}]
    overhead = [{"row": "1", "what": "sequential", "workerpool": 214.0, "baseline": 103.4,
                 "ratio": 2.07},
                {"row": "3b", "what": "map", "workerpool": 30096.8, "baseline": 36169.1,
                 "ratio": 0.83},
                {"row": "6", "what": "parent CPU", "workerpool": 30.7, "baseline": "",
                 "ratio": ""}]
    data = report_data(
        trials, many_models=[many("workerpool", 0, 600.0), many("litserve", 0, 1800.0)],
        many_models_setting="8x32", overhead=overhead, overhead_args="--rounds 3",
        extras={"light": {"result": {"rows": light_rows}},
                "streaming": {"result": {"rows": streaming_rows}},
                "protocols": {"error": "exited with 1"}})
    text = summary.readme(render.Report(data, NAMES))
    assert one_line(text, "8 distinct models") == (
        "8 distinct models of 32 MiB in one server, one worker each: workerpool serve 600 "
        "MiB of PSS in all; LitServe 3.00x (the report's many-models table).")
    assert one_line(text, "A light model") == (
        "A light model (logistic regression, one-row JSON; the report's light-model rows, "
        "`bench/light.py`): req/s at 32 clients against gunicorn -w 2 + FastAPI's: "
        "workerpool serve (a worker per call) 0.95x, `inline = true` 1.70x; p50 at 1 client "
        "against gunicorn's: workerpool serve (a worker per call) 2.66x, `inline = true` 0.97x. "
        "Where gunicorn -w 2 + FastAPI did better: workerpool serve (a worker per call)'s "
        "req/s (0.95x); workerpool serve (a worker per call)'s 1-client p50 (2.66x).")
    assert one_line(text, "Streaming") == (
        "Streaming (Triton's generate_stream, a generator that computes nothing; "
        "`bench/streaming.py`): the first item in 1.25 ms, 1.25x LitServe's time; each "
        "further item 0.25x LitServe's. LitServe did better on its first item (0.80x ours).")
    assert one_line(text, "Embedded") == (
        "Embedded, a model that does nothing (`bench/overhead.py --rounds 3`): `Pool.map` "
        "30,097 req/s, 0.83x multiprocessing.Pool.imap's; a sequential round trip 214 us, "
        "2.07x a raw pyzmq echo's (the same message over the same link, no pool). "
        "multiprocessing.Pool did better on `map`. The raw pyzmq echo did better on the "
        "sequential round trip.")
    assert one_line(text, "Each worker") == (
        "Each worker past the first added 8.0 MiB of PSS (workerpool, N=1 against N=2, "
        "every model). A worker SIGKILLed under load had its replacement answering "
        "0.10 s embedded, 2.00 s over HTTP, where "
        "the calls queued before the kill are answered first (every model and N). A "
        "replacement answered sooner on the 8 MiB model at N=2: LitServe (0.50 s against "
        "our 2.00 s, 4 requests failed).")


def test_a_restart_that_never_recovered_is_said_so():
    trials = []
    for workers, recover in ((1, 0.2), (2, None)):
        for contender in ("workerpool", "workerpool-pool"):
            made = trial(contender, 0, recover, 100, 800)
            made["workers"] = workers
            trials.append(made)
    text = summary.readme(render.Report(report_data(trials), NAMES))
    assert ("replacement answering 0.20 s, and never in 1 of 2 trials embedded, 0.20 s, "
            "and never in 1 of 2 trials over HTTP") in one_line(text, "Each worker")


def test_the_readmes_summary_is_the_published_reports():
    """README.md's numbers come from docs/benchmarks.json, as `report.py --publish` wrote
    them: a hand edit of either shows here."""
    import report  # bench/report.py (bench is on the path)
    data = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    assert report.readme_summary(data) in (ROOT / "README.md").read_text()


def test_publish_copies_the_report_into_docs_and_rewrites_only_readmes_block(tmp_path,
                                                                               monkeypatch):
    import report
    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    docs.mkdir()
    data = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    data["plots"] = {"mlp256": ["report-mlp256-load.png"]}
    (out / "report.json").write_text(json.dumps(data))
    (out / "report.md").write_text("# the report\n")
    (out / "report-mlp256-load.png").write_bytes(b"\x89PNG")
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.SUMMARY_START}\nold numbers\n{report.SUMMARY_END}\n"
                      "after\n")
    monkeypatch.setattr(report, "DOCS", docs)
    monkeypatch.setattr(report, "README", readme)
    report.publish(data, out)
    assert (docs / "benchmarks.md").read_text() == "# the report\n"
    assert json.loads((docs / "benchmarks.json").read_text()) == data
    assert (docs / "report-mlp256-load.png").read_bytes() == b"\x89PNG"
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n")
    assert "old numbers" not in text and report.readme_summary(data) in text
