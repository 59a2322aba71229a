"""README.md's benchmark block, written from the report's data (report.py --publish puts it
between README's markers): the servers' table for the first model at the largest N, then
one line for each wider row the report ran (many models, a light model, streaming, the
embedded overhead, what an extra worker costs and how soon a killed one is replaced).
Every number is the report's; every place another server or baseline did better is said."""

from __future__ import annotations

import statistics
import textwrap

from reporting.render import BASELINE, BATCHED, EMBEDDED_BASELINE, LABELS, Report, fmt, \
    ratio

WIDTH = 92


def readme(report: Report, model: str | None = None) -> str:
    """The block's markdown (without README's markers)."""
    model = model or report.models[0]
    servers = [c for c in report.contenders if c not in LABELS and not c.endswith(BATCHED)
               and report.groups.get((model, c, max(report.workers)))]
    lines = servers_table(report, model, servers)
    beside = [line for line in (many_models(report, servers), light(report.data),
                                streaming(report.data), embedded(report.data),
                                workers(report, model, servers)) if line]
    if beside:
        lines += ["", "Beside it, in the same report:", ""] + beside
    return "\n".join(wrap(line) for line in lines)


def wrap(line: str) -> str:
    if line.startswith("|"):
        return line
    if line.startswith("- "):
        return textwrap.fill(line, WIDTH, subsequent_indent="  ", break_on_hyphens=False)
    return textwrap.fill(line, WIDTH, break_on_hyphens=False)


def listed(things: list[str]) -> str:
    return "; ".join(things)


def span(values: list[float], digits: int, unit: str, median: bool = False) -> str:
    """min-max (one value when they agree), the median after it if asked."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    text = f"{low} {unit}" if low == high else f"{low}-{high} {unit}"
    if median and low != high:
        text += f" (median {statistics.median(values):.{digits}f})"
    return text


def seconds(values: list) -> str:
    """Recovery times, a None being a replacement that never answered in time."""
    timed = [v for v in values if v is not None]
    never = len(values) - len(timed)
    text = span(timed, 2, "s", median=True) if timed else ""
    if never:
        text += f"{', and ' if text else ''}never in {never} of {len(values)} trials"
    return text


def servers_table(report: Report, model: str, servers: list[str]) -> list[str]:
    """The first model at the largest N: workerpool serve's own numbers, the others' as
    ratios to them, and every column where another server did better, in words."""
    top = max(report.workers)
    info = report.data["model_info"].get(model, {})
    reps = min(len(report.groups[(model, c, top)]) for c in servers)
    clients = report.settings(model)["clients"]
    sources = sorted({t["workerpool_source"].split()[0]
                      for t in report.groups.get((model, BASELINE, top), [])
                      if t.get("workerpool_source")})
    kind = ("torch MLP" if info.get("config", {}).get("kind") == "mlp"
            else "BERT-base-sized encoder")
    lines = [f"Measured on our {report.data['machine']['cpus']}-core machine, {top} "
             f"workers serving a {info.get('mib', 0):.0f} MiB {kind}, each server over "
             f"its own HTTP API, medians of {reps} interleaved "
             f"{'repetitions' if reps > 1 else 'repetition'} "
             "([docs/benchmarks.md](docs/benchmarks.md), `make report`, run from "
             f"{report.data['started'][:10]} to "
             f"{(report.data.get('finished') or '?')[:10]}"
             + (f"; workerpool's rows ran commit {', '.join(sources)}" if sources else "")
             + "):", "",
             f"| server | total memory (PSS) | req/s, {clients} clients | "
             f"p99 latency, {clients} clients | a worker SIGKILLed under load: requests "
             "failed |", "|---|---|---|---|---|"]
    ours = {path: report.value(model, BASELINE, top, path)
            for path in ("pss_mib", "load.rps", "load.p99_ms", "restart.failed")}
    better = []
    for contender in servers:
        values = {path: report.value(model, contender, top, path) for path in ours}
        failed = fmt(values["restart.failed"], 0)
        never = sum(1 for t in report.groups[(model, contender, top)]
                    if isinstance(t.get("restart"), dict)
                    and t["restart"].get("recover_s") is None)
        if never:
            failed += f" ({never} of {reps} never recovered)"
        if contender == BASELINE:
            lines.append(f"| {report.name(contender)} | {fmt(values['pss_mib'])} MiB | "
                         f"{fmt(values['load.rps'])} | {fmt(values['load.p99_ms'], 0)} ms "
                         f"| {failed} |")
            continue
        lines.append(f"| {report.name(contender)} | "
                     + " | ".join(ratio(values[p], ours[p])
                                  for p in ("pss_mib", "load.rps", "load.p99_ms"))
                     + f" | {failed} |")
        for path, what, wins in (("pss_mib", "memory", lambda a, b: a < b),
                                 ("load.rps", "req/s", lambda a, b: a > b),
                                 ("load.p99_ms", "p99", lambda a, b: a < b),
                                 ("restart.failed", "requests failed on a kill",
                                  lambda a, b: a < b)):
            if values[path] is not None and ours[path] is not None \
                    and wins(values[path], ours[path]):
                shown = fmt(values[path], 0) if path == "restart.failed" else \
                    ratio(values[path], ours[path]) + " ours"
                better.append(f"{report.name(contender)}'s {what} ({shown})")
    return lines + ["", ("Where another server did better in this run: " + listed(better)
                         + "." if better else "No other server did better on these "
                         "columns in this run.") + " The other models, worker counts, the "
                    "1-client latency, start and restart times and the batching rows are in "
                    "the report."]


def many_models(report: Report, servers: list[str]) -> str:
    if not report.many:
        return ""
    setting = report.data.get("many_models_setting", report.many[0].get("many", "?"))
    count, _, size = setting.partition("x")
    pss = {c: report.many_values(c, "pss_mib") for c in servers}
    if not pss.get(BASELINE):
        return ""
    base = statistics.median(pss[BASELINE])
    others = {c: statistics.median(v) for c, v in pss.items() if v and c != BASELINE}
    less = [f"{report.name(c)} ({ratio(v, base)})" for c, v in others.items() if v < base]
    return (f"- {count} distinct models of {size} MiB in one server, one worker each: "
            f"workerpool serve {base:,.0f} MiB of PSS in all; "
            + ", ".join(f"{report.name(c)} {ratio(v, base)}" for c, v in others.items())
            + " (the report's many-models table)."
            + (f" Less memory than ours: {listed(less)}." if less else ""))


def extra_rows(data: dict, name: str) -> list[dict]:
    record = (data.get("extras") or {}).get(name) or {}
    return (record.get("result") or {}).get("rows") or []


def light(data: dict) -> str:
    """bench/light.py's rows: one-row JSON against gunicorn + FastAPI."""
    rows = extra_rows(data, "light")
    gunicorn = next((r["server"] for r in rows if r["server"].startswith("gunicorn")), None)
    if gunicorn is None:
        return ""

    def row(server: str, clients: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["body"] == "json"
                     and r["clients"] == clients), None)
    servers = {"workerpool serve": "workerpool serve (a worker per call)",
               "workerpool serve, inline": "`inline = true`",
               "workerpool serve, inline --http-workers 2":
                   "`inline = true` with `--http-workers 2`"}
    rps, p50, behind = [], [], []
    for server, said in servers.items():
        busy, alone = row(server, 32), row(server, 1)
        if busy:
            rps.append(f"{said} {busy['rps_vs_gunicorn']:.2f}x")
            if busy["rps_vs_gunicorn"] < 1:
                behind.append(f"{said}'s req/s ({busy['rps_vs_gunicorn']:.2f}x)")
        if alone:
            p50.append(f"{said} {alone['p50_vs_gunicorn']:.2f}x")
            if alone["p50_vs_gunicorn"] > 1:
                behind.append(f"{said}'s 1-client p50 ({alone['p50_vs_gunicorn']:.2f}x)")
    if not rps:
        return ""
    return (f"- A light model (logistic regression, one-row JSON; the report's light-model "
            f"rows, `bench/light.py`): req/s at 32 clients against {gunicorn}'s: "
            + ", ".join(rps) + "; p50 at 1 client against gunicorn's: " + ", ".join(p50) + "."
            + (f" Where {gunicorn} did better: {listed(behind)}." if behind else ""))


def streaming(data: dict) -> str:
    """bench/streaming.py's rows: the first item and each further one against LitServe."""
    rows = extra_rows(data, "streaming")
    ours = next((r for r in rows if r["path"] == "workerpool serve"), None)
    if not ours or "first item vs LitServe" not in ours:
        return ""
    first, per_item = ours["first item vs LitServe"], ours["per item vs LitServe"]
    # (ratios of our time to LitServe's: above 1, LitServe was faster)
    behind = [f"{what} ({1 / value:.2f}x ours)" for what, value in
              (("its first item", first), ("each further item", per_item)) if value > 1]
    return (f"- Streaming (Triton's generate_stream, a generator that computes nothing; "
            f"`bench/streaming.py`): the first item in {ours['first item ms']:.2f} ms, "
            f"{first:.2f}x LitServe's time; each further item {per_item:.2f}x LitServe's."
            + (f" LitServe did better on {listed(behind)}." if behind else ""))


def embedded(data: dict) -> str:
    """bench/overhead.py's rows: the Pool against multiprocessing.Pool with a no-op model,
    and its sequential round trip against a raw pyzmq echo (no pool: ZeroMQ's floor)."""
    rows = {r.get("row"): r for r in data.get("overhead") or []}
    parts, behind = [], {}
    for key, said, what, higher_is_better, rival in (
            ("3b", "`Pool.map` {value:,.0f} req/s, {ratio:.2f}x multiprocessing.Pool.imap's",
             "`map`", True, "multiprocessing.Pool"),
            ("2", "a burst of `submit` calls {value:,.0f} req/s, {ratio:.2f}x "
                  "apply_async's", "a burst", True, "multiprocessing.Pool"),
            ("1", "a sequential round trip {value:.0f} us, {ratio:.2f}x a raw pyzmq echo's "
                  "(the same message over the same link, no pool)",
             "the sequential round trip", False, "The raw pyzmq echo")):
        row = rows.get(key)
        if not row or not isinstance(row.get("ratio"), (int, float)):
            continue
        parts.append(said.format(value=row["workerpool"], ratio=row["ratio"]))
        if (row["ratio"] < 1) if higher_is_better else (row["ratio"] > 1):
            behind.setdefault(rival, []).append(what)
    if not parts:
        return ""
    command = f"bench/overhead.py {data.get('overhead_args', '')}".strip()
    return (f"- Embedded, a model that does nothing (`{command}`): " + "; ".join(parts) + "."
            + "".join(f" {rival} did better on {' and '.join(whats)}."
                      for rival, whats in behind.items()))


def workers(report: Report, model: str, servers: list[str]) -> str:
    """What each worker past the first adds to workerpool's PSS (N=1 against the largest
    N, every model), and how soon a worker SIGKILLed under load had a replacement answering,
    embedded and over HTTP, against the other servers' replacements."""
    top = max(report.workers)
    if top == 1:
        return ""
    added = []
    for name in report.models:
        for contender in (BASELINE, EMBEDDED_BASELINE):
            one, many = (report.value(name, contender, n, "pss_mib") for n in (1, top))
            if one is not None and many is not None:
                added.append((many - one) / (top - 1))
    recovery = {c: [t["restart"].get("recover_s") for m in report.models
                    for n in report.workers for t in report.groups.get((m, c, n), [])
                    if isinstance(t.get("restart"), dict)]
                for c in (EMBEDDED_BASELINE, BASELINE)}
    if not added or not any(recovery.values()):
        return ""
    ours = report.value(model, BASELINE, top, "restart.recover_s")
    sooner = []
    for contender in servers:
        theirs = report.value(model, contender, top, "restart.recover_s")
        if contender != BASELINE and theirs is not None and ours is not None \
                and theirs < ours:
            lost = report.value(model, contender, top, "restart.failed")
            sooner.append(f"{report.name(contender)} ({theirs:.2f} s against our "
                          f"{ours:.2f} s, {fmt(lost, 0)} requests failed)")
    mib = report.data["model_info"].get(model, {}).get("mib", 0)
    said = {EMBEDDED_BASELINE: "embedded", BASELINE: "over HTTP, where the calls queued "
            "before the kill are answered first"}
    return (f"- Each worker past the first added {span(added, 1, 'MiB')} of PSS "
            f"(workerpool, N=1 against N={top}, every model). A worker SIGKILLed under load "
            "had its replacement answering "
            + ", ".join(f"{seconds(v)} {said[c]}" for c, v in recovery.items() if v)
            + " (every model and N)."
            + (f" A replacement answered sooner on the {mib:.0f} MiB model at N={top}: "
               f"{listed(sooner)}." if sooner else ""))
