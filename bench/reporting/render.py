"""The report as markdown: machine, headline ratios, then per model memory, start/restart
and throughput/latency tables (medians over the repetitions, min-max beside them), many
models in one server, the embedded overhead rows, and every contender that could not run
with the reason.

A restart that never recovered counts as never in its median (not dropped from it); a p99
timed from fewer than MIN_P99_SAMPLES answers is marked."""

from __future__ import annotations

import collections
import math
import statistics

BASELINE = "workerpool"           # the HTTP contenders' ratios are against workerpool serve
EMBEDDED_BASELINE = "workerpool-pool"
BATCHED = "+batch"  # a contender with its dynamic batching on: against workerpool's
MIN_P99_SAMPLES = 300  # below this a p99 is one of the few largest values: marked
EXTRA_TITLES = {  # report.py's EXTRAS
    "light": "A light model (logistic-regression size) against gunicorn + FastAPI",
    "streaming": "Streaming: first item and per-item cost against LitServe",
    "many_models": "Many models in one server",
    "protocols": "KServe v2 gRPC and TF Serving gRPC beside HTTP",
    "throughput": "Dynamic batching on and off (the embedded Pool)",
}
LABELS = {"workerpool-pool": "workerpool Pool (embedded)",
          "multiprocessing": "multiprocessing.Pool(initializer=load)"}


def dig(trial: dict, path: str):
    value = trial
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def grouped(trials: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for trial in trials:
        groups.setdefault((trial["model"], trial["contender"], trial["workers"]), []).append(trial)
    return groups


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def spread(values: list, digits: int = 1) -> str:
    """The median, and the range when there are several values (math.inf: never)."""
    def one(value) -> str:
        return "never" if value == math.inf else fmt(value, digits)
    if not values:
        return "—"
    middle = one(statistics.median(values))
    if len(values) == 1 or min(values) == max(values):
        return middle
    return f"{middle} ({one(min(values))}-{one(max(values))})"


def samples_of(load: dict) -> int | None:
    """Answers a latency phase timed (a run before loadgen counted them: requests - failed)."""
    if not isinstance(load, dict):
        return None
    if "samples" in load:
        return load["samples"]
    if isinstance(load.get("requests"), int) and isinstance(load.get("failed"), int):
        return load["requests"] - load["failed"]
    return None


def numbers(trials: list[dict], path: str) -> list:
    """The numeric values at ``path`` of these trials (those without one left out)."""
    return [v for v in (dig(t, path) for t in trials) if isinstance(v, (int, float))]


def marked_p99(trials: list[dict], phase: str) -> str:
    """The p99 cell of these trials' ``phase``, marked † when one timed fewer than
    MIN_P99_SAMPLES answers."""
    text = spread(numbers(trials, f"{phase}.p99_ms"))
    counts = [samples_of(t.get(phase)) for t in trials if t.get(phase)]
    if text != "—" and any(c is None or c < MIN_P99_SAMPLES for c in counts):
        text += " †"
    return text


def answers_checked(trials: list[dict]) -> str:
    """Answers under load checked against the in-process model / how many differed."""
    checked = wrong = 0
    for trial in trials:
        for phase in ("load", "single"):
            counted = trial.get(phase) or {}
            if counted.get("checked") is None:
                return "—"  # a run before loadgen checked answers
            checked += counted["checked"]
            wrong += counted["wrong"]
    return f"{checked:,} / {wrong}"


def ratio(value, base) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}x"


class Report:
    def __init__(self, data: dict, names: dict[str, str]):
        self.data = data
        self.names = {**names, **LABELS}
        self.trials = [t for t in data["trials"] if "error" not in t]
        self.failures = [t for t in data["trials"] if "error" in t]
        self.groups = grouped(self.trials)
        self.contenders = [c for c in data["contenders"]
                           if any(t["contender"] == c for t in self.trials)]
        self.models = [m for m in data["models"] if any(t["model"] == m for t in self.trials)]
        self.workers = sorted({t["workers"] for t in self.trials})
        many = data.get("many_models") or []
        self.many = [t for t in many if "error" not in t]
        self.many_failures = [t for t in many if "error" in t]

    def name(self, contender: str) -> str:
        return self.names.get(contender, contender)

    def value(self, model: str, contender: str, workers: int, path: str):
        """The median over the repetitions (None: no value)."""
        values = self.values(model, contender, workers, path)
        return statistics.median(values) if values else None

    def values(self, model: str, contender: str, workers: int, path: str) -> list:
        return numbers(self.groups.get((model, contender, workers), []), path)

    def cell(self, model: str, contender: str, workers: int, path: str,
             digits: int = 1) -> str:
        """Median (min-max) over the repetitions."""
        return spread(self.values(model, contender, workers, path), digits)

    def recovery(self, model: str, contender: str, workers: int) -> str:
        """Seconds to a new worker's answer after the kill, a trial that saw none counted
        as never (so a median of mostly never is never), and the requests that failed."""
        restarts = [t["restart"] for t in self.groups.get((model, contender, workers), [])
                    if isinstance(t.get("restart"), dict)]
        if not restarts:
            return "—"
        times = [math.inf if r.get("recover_s") is None else r["recover_s"] for r in restarts]
        never = times.count(math.inf)
        text = spread(times, 2)
        if never:
            text += f", {never} of {len(times)} never recovered"
        failed = spread([r["failed"] for r in restarts if isinstance(r.get("failed"), int)], 0)
        return f"{text} / {failed}"

    def p99(self, model: str, contender: str, workers: int, phase: str) -> str:
        """The p99 cell, marked † when a repetition timed fewer than MIN_P99_SAMPLES."""
        return marked_p99(self.groups.get((model, contender, workers), []), phase)

    def answers_checked(self, model: str, contender: str, workers: int) -> str:
        """Answers under load checked against the in-process model / how many differed."""
        return answers_checked(self.groups.get((model, contender, workers), []))

    def settings(self, model: str) -> dict:
        """The settings the model's trials ran with (a resumed run may have changed them)."""
        for trial in self.trials:
            if trial["model"] == model and "settings" in trial:
                return trial["settings"]
        return self.data["settings"]

    def repeats(self, model: str) -> int:
        counts = [len(v) for k, v in self.groups.items() if k[0] == model]
        return min(counts) if counts else 0

    # -- sections ------------------------------------------------------------------------
    def machine(self) -> list[str]:
        m = self.data["machine"]
        lines = ["## Machine", "",
                 f"- {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB memory, "
                 f"kernel {m['kernel']}, {m['os']}, Python {m['python']}",
                 f"- run from {self.data['started']} to {self.data.get('finished', '?')} by "
                 + "; then ".join(f"`{c}`" for c in self.data.get("commands", [])),
                 "- versions, each contender in its own virtual environment "
                 "(bench/peers/NAME/requirements.txt):"]
        for contender, versions in self.data.get("versions", {}).items():
            listed = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
            lines.append(f"  - {self.name(contender)}: {listed}")
        sources = collections.Counter(t["workerpool_source"] for t in self.data["trials"]
                                      if "workerpool_source" in t)
        if sources:
            lines.append("- workerpool's rows ran its package as of commit "
                         + ", ".join(f"{commit} ({count} trials)"
                                     for commit, count in sources.items()))
        harnesses = collections.Counter(t["harness"] for t in self.data["trials"]
                                        if "harness" in t)
        if harnesses:
            lines.append("- the harness and the contenders' apps (bench/) as of commit "
                         + ", ".join(f"{commit} ({count} trials)"
                                     for commit, count in harnesses.items())
                         + "; each trial's command line, environment, peer folder digest "
                         "and start and end times are in report.json")
        return lines + [""]

    def headline(self) -> list[str]:
        top = max(self.workers) if self.workers else 0
        lines = [f"## Headline: N = {top} workers, as ratios to workerpool", "",
                 "Total PSS of the whole process tree, requests/s and p99 latency at "
                 f"{self.data['settings']['clients']} "
                 "concurrent clients, each divided by workerpool's in the same run "
                 "(`workerpool serve` for the servers, `workerpool serve` with batching for "
                 "the rows with batching, workerpool's `Pool` for "
                 "`multiprocessing.Pool`). Memory and p99: above 1.00x is worse than "
                 "workerpool; req/s: below 1.00x is worse. Medians of "
                 + ", ".join(f"{self.repeats(m)} repetition(s) for {m}" for m in self.models)
                 + ".", ""]
        header = "| contender |" + "".join(
            f" {m}: memory | {m}: req/s | {m}: p99 |" for m in self.models)
        lines += [header, "|---|" + "---|---|---|" * len(self.models)]
        for contender in self.contenders:
            base = EMBEDDED_BASELINE if contender in LABELS else \
                BASELINE + BATCHED if contender.endswith(BATCHED) else BASELINE
            row = f"| {self.name(contender)} |"
            for model in self.models:
                row += " " + " | ".join([
                    ratio(self.value(model, contender, top, "pss_mib"),
                          self.value(model, base, top, "pss_mib")),
                    ratio(self.value(model, contender, top, "load.rps"),
                          self.value(model, base, top, "load.rps")),
                    ratio(self.value(model, contender, top, "load.p99_ms"),
                          self.value(model, base, top, "load.p99_ms"))]) + " |"
            lines.append(row)
        return lines + [""]

    def model_tables(self, model: str) -> list[str]:
        info = self.data["model_info"].get(model, {})
        config = info.get("config", {})
        shape = (f"{config.get('layers')} x {config.get('width')} fp32 Linear layers"
                 if config.get("kind") == "mlp" else
                 "BERT-base-sized encoder (12 x 768, 12 heads, 3072 FFN, 30522 tokens), "
                 f"{config.get('seq')} tokens a request")
        settings = self.settings(model)
        lines = [f"## {model}: {shape}, {info.get('mib', 0):.0f} MiB of weights", "",
                 f"Reproduce: `.venv/bin/python bench/report.py --models {model} "
                 f"--repeats {self.repeats(model)} --seconds {settings['seconds']:g}`"
                 " (add `--contenders NAME,...` for fewer rows).", "",
                 f"Medians of {self.repeats(model)} interleaved repetition(s), the "
                 "smallest and largest in brackets. Each trial's first answer is checked "
                 "against the model run in-process (the largest difference in the memory "
                 "table's last column), and so is every answer under load (the throughput "
                 "table's last column: answers checked / those that differed by more than "
                 "1e-4).", ""]
        ns = self.workers
        lines += [f"### Memory: total PSS of the process tree (MiB) after every worker "
                  f"served >= {settings['per_worker']} requests", "",
                  "| contender | " + " | ".join(f"N={n}" for n in ns) +
                  " | per extra worker | processes at N=" + str(ns[-1]) + " | max abs diff |",
                  "|---|" + "---|" * (len(ns) + 3)]
        for contender in self.contenders:
            values = [self.value(model, contender, n, "pss_mib") for n in ns]
            cells = [self.cell(model, contender, n, "pss_mib") for n in ns]
            extra = None
            if len(ns) > 1 and values[0] is not None and values[-1] is not None:
                extra = (values[-1] - values[0]) / (ns[-1] - ns[0])
            diffs = [t.get("max_abs_diff") for k, v in self.groups.items()
                     if k[0] == model and k[1] == contender for t in v]
            diffs = [d for d in diffs if d is not None]
            processes = self.value(model, contender, ns[-1], "processes")
            lines.append(f"| {self.name(contender)} | " +
                         " | ".join(cells) +
                         f" | {fmt(extra)} | {fmt(processes, 0)} | "
                         f"{f'{max(diffs):.1e}' if diffs else '—'} |")
        cold = any(isinstance(dig(t, "cold.start_s"), (int, float))
                   for k, v in self.groups.items() if k[0] == model for t in v)
        lines += ["", "### Start and restart", "",
                  "Start: launch to the first successful answer, the model's files and the "
                  "framework's libraries in the page cache (read by the launch before). "
                  + ("Cold start: the same with the kernel's page cache dropped first "
                     "(everything read from disk; embedded rows have none). " if cold else "")
                  + "Restart: under load "
                  f"({settings['clients']} clients), SIGKILL the worker that "
                  "answered last; seconds until a worker never seen before answers, and "
                  "the load's requests that failed from the kill on (never: no new worker "
                  f"answered within {settings['recover_timeout']:.0f} s; such a trial counts "
                  "as never in the median, and how many there were is said). Over HTTP the "
                  "new worker must answer a probe sent on a fresh connection every 50 ms, "
                  "so a server that queues requests in order (workerpool, TorchServe, "
                  "MLServer) adds the probe's wait behind the queued load and the odds of "
                  "it reaching an older worker; a server whose idle new worker accepts the "
                  "connection itself (gunicorn) does not. Embedded, any call's answer "
                  "from the new worker counts. A failed request is one answered with an "
                  "error or a broken connection; each client retries after 10 ms, so a "
                  "server that fails fast while it has no worker counts many.", "",
                  "| contender | " + " | ".join(f"start N={n} (s)" for n in ns) + " | " +
                  "".join(f"cold start N={n} (s) | " for n in ns if cold) +
                  " | ".join(f"restart N={n}: s / failed" for n in ns) + " |",
                  "|---|" + "---|" * ((3 if cold else 2) * len(ns))]
        for contender in self.contenders:
            starts = [self.cell(model, contender, n, "start_s", 2) for n in ns]
            colds = [self.cell(model, contender, n, "cold.start_s", 2) for n in ns] \
                if cold else []
            restarts = [self.recovery(model, contender, n) for n in ns]
            lines.append(f"| {self.name(contender)} | " +
                         " | ".join(starts + colds + restarts) + " |")
        timed = (f" and at least {settings['min_samples']} answers (at most "
                 f"{settings['max_seconds']:.0f} s)" if settings.get("min_samples") else "")
        lines += ["", "### Throughput and latency over each one's own HTTP API", "",
                  f"{settings['clients']} concurrent clients for "
                  f"{settings['seconds']:.0f} s{timed} (req/s, p50, p99), then 1 "
                  "client (p50, p99); latencies in ms. Failed requests in brackets when "
                  f"any; † marks a p99 timed from fewer than {MIN_P99_SAMPLES} answers in "
                  "some repetition (it is then one of the few slowest). Each client keeps "
                  "its connection alive, as client libraries do, "
                  "so a server whose workers share accept() serves a client from the "
                  "worker that accepted it (workers that answered). Requests per forward "
                  "pass: the mean, at the many clients, of how many requests the forward "
                  "pass that answered each one held (the model says: 1 without batching).",
                  "",
                  "| contender | N | req/s | p50 | p99 | 1 client p50 | 1 client p99 | "
                  "workers that answered | requests per forward pass | "
                  "answers checked / wrong |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for contender in self.contenders:
            if contender in LABELS:
                continue
            for n in ns:
                if not self.groups.get((model, contender, n)):
                    continue  # (batching rows run at the largest N only)
                failed = self.value(model, contender, n, "load.failed")
                note = f" ({failed:.0f} failed)" if failed else ""
                lines.append(
                    f"| {self.name(contender)} | {n} | "
                    f"{self.cell(model, contender, n, 'load.rps')}{note} | "
                    f"{self.cell(model, contender, n, 'load.p50_ms')} | "
                    f"{self.p99(model, contender, n, 'load')} | "
                    f"{self.cell(model, contender, n, 'single.p50_ms')} | "
                    f"{self.p99(model, contender, n, 'single')} | "
                    f"{fmt(self.value(model, contender, n, 'load.pids'), 0)} | "
                    f"{self.cell(model, contender, n, 'load.mean_batch', 2)} | "
                    f"{self.answers_checked(model, contender, n)} |")
        plots = self.data.get("plots", {}).get(model, [])
        lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
        return lines

    def many_trials(self, contender: str) -> list[dict]:
        return [t for t in self.many if t["contender"] == contender]

    def many_values(self, contender: str, path: str) -> list:
        return numbers(self.many_trials(contender), path)

    def many_models(self) -> list[str]:
        """Several distinct models served at once by each server (trial.run_many)."""
        if not self.many:
            return []
        setting = self.data.get("many_models_setting", self.many[0].get("many", "?"))
        count, _, size = setting.partition("x")
        settings = self.many[0].get("settings", self.data["settings"])
        contenders = [c for c in self.data["contenders"]
                      if any(t["contender"] == c for t in self.many)]
        repeats = min(len(self.many_values(c, "pss_mib")) for c in contenders)
        base = statistics.median(self.many_values(BASELINE, "pss_mib")) \
            if self.many_values(BASELINE, "pss_mib") else None
        lines = [f"## Many models in one server: {count} distinct MLPs of {size} MiB", "",
                 f"Reproduce: `.venv/bin/python bench/report.py --many-models {setting} "
                 f"--models '' --repeats {repeats} --extra none --overhead-args ''`.", "",
                 f"Each server serves {count} models of {size} MiB of fp32 weights each, "
                 "every one from its own seed (nothing to share between them), as its "
                 "documentation says to serve several (bench/peers/NAME/peer.py's "
                 "command_many): one worker per model where the server has per-model "
                 "workers (workerpool: a [models.NAME] table each; TorchServe: an archive "
                 "each; Ray Serve: an application each; LitServe: a LitAPI each, with its "
                 "default of one uvicorn process per worker), and where it has none one "
                 "process holding every model (gunicorn: one worker of one app; MLServer: "
                 "one parallel worker loading every model-settings.json). Start: launch "
                 "until every model has answered once (each answer checked). Then "
                 f"{settings['clients']} clients, and then 1, call the models in turn "
                 f"({settings['seconds']:.0f} s or longer, until {settings['min_samples']} "
                 "answers were timed; each answer checked against its own model run "
                 "in-process); then the total PSS of the process tree. Medians of "
                 f"{repeats} repetition(s), smallest and largest in brackets; latencies in "
                 "ms.", "",
                 "| contender | total PSS (MiB) | against workerpool | processes | start (s) "
                 "| req/s | p50 | p99 | 1 client p50 | answers checked / wrong |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for contender in contenders:
            pss = self.many_values(contender, "pss_mib")
            failed = self.many_values(contender, "load.failed")
            note = f" ({statistics.median(failed):.0f} failed)" if any(failed) else ""
            lines.append(
                f"| {self.name(contender)} | {spread(pss, 0)} | "
                f"{ratio(statistics.median(pss), base) if pss else '—'} | "
                f"{spread(self.many_values(contender, 'processes'), 0)} | "
                f"{spread(self.many_values(contender, 'start_s'), 1)} | "
                f"{spread(self.many_values(contender, 'load.rps'))}{note} | "
                f"{spread(self.many_values(contender, 'load.p50_ms'))} | "
                f"{marked_p99(self.many_trials(contender), 'load')} | "
                f"{spread(self.many_values(contender, 'single.p50_ms'))} | "
                f"{answers_checked(self.many_trials(contender))} |")
        return lines + [""]

    def overhead(self) -> list[str]:
        rows = self.data.get("overhead")
        if not rows:
            return []
        lines = ["## Embedded: the Pool against multiprocessing.Pool and "
                 "ProcessPoolExecutor", "",
                 "Per-request overhead with a model that does nothing (reproduce: "
                 f"`.venv/bin/python bench/overhead.py {self.data.get('overhead_args', '')}`;"
                 " its rows as it prints them, "
                 "workerpool / baseline, medians of its rounds; the baseline of rows 1 and 4 "
                 "is a raw pyzmq echo of the same message over the same kind of link, no "
                 "pool).", "",
                 "| row | what | workerpool | baseline | ratio |", "|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row.get('row', '')} | {row.get('what', '')} | "
                         f"{fmt(row.get('workerpool'))} | {fmt(row.get('baseline'))} | "
                         f"{fmt(row.get('ratio'), 2)} |")
        return lines + [""]

    def extras(self) -> list[str]:
        extras = self.data.get("extras") or {}
        if not extras:
            return []
        lines = ["## Wider rows, each against its own baseline in the same run", "",
                 "Benchmarks of bench/ run once after the trials above (the command under "
                 "each; its file's docstring says what it measures and how), on the same "
                 "machine, workerpool at the same commit. Their markdown as they wrote it.",
                 ""]
        for name, record in extras.items():
            lines += [f"### {EXTRA_TITLES.get(name, name)}", "",
                      f"`.venv/bin/python {record['command']}`, from "
                      f"{record.get('started_at', '?')} to {record.get('finished_at', '?')}"
                      + (f", workerpool {record['workerpool_source']}"
                         if record.get("workerpool_source") else "") + ".", ""]
            if "error" in record:
                lines += ["It failed (see the list of what did not run).", ""]
                continue
            lines += ["###" + line if line.startswith("#") else line
                      for line in record.get("markdown", "").strip().splitlines()] + [""]
        return lines

    def which(self, trial: dict) -> str:
        """A trial as the list of problems names it: contender, row, repetition."""
        row = (f"{trial['many']} models" if "many" in trial
               else f"{trial['model']}, N={trial['workers']}")
        return f"{self.name(trial['contender'])}, {row}, repetition {trial.get('rep')}"

    def problems(self) -> list[str]:
        lines = []
        for name, record in (self.data.get("extras") or {}).items():
            if "error" in record:
                lines.append(f"- `{record['command']}` {record['error']}")
        for contender, reason in self.data.get("unavailable", {}).items():
            lines.append(f"- {self.name(contender)}: could not be installed or run here: "
                         f"{reason}")
        for trial in self.failures + self.many_failures:
            lines.append(f"- {self.which(trial)}: {trial['error']}")
        for trial in self.data.get("retried") or []:
            lines.append(f"- {self.which(trial)}: failed ({trial['error'].splitlines()[0]} "
                         f"... {trial['error'].splitlines()[-1]}), then ran again "
                         "(`--resume` re-runs failed trials)")
        for trial in self.many:
            wrong = sum((trial.get(phase) or {}).get("wrong") or 0
                        for phase in ("load", "single"))
            if wrong:
                lines.append(f"- {self.which(trial)}: {wrong} answers differed from the "
                             "model run in-process")
            if trial.get("left_running"):
                lines.append(f"- {self.which(trial)}: still running 30 s after SIGTERM "
                             f"(then killed): {len(trial['left_running'])} processes")
        for trial in self.trials:
            if (trial.get("cold") or {}).get("error"):
                lines.append(f"- {self.which(trial)}: no cold start: "
                             f"{trial['cold']['error']}")
            wrong = sum((trial.get(phase) or {}).get("wrong") or 0
                        for phase in ("load", "single", "restart"))
            if wrong:
                lines.append(f"- {self.which(trial)}: {wrong} answers under load differed "
                             "from the model run in-process")
        by_contender_model: dict[tuple, list[dict]] = {}
        for trial in self.trials:
            by_contender_model.setdefault((trial["contender"], trial["model"]), []).append(trial)
        for (contender, model), trials in by_contender_model.items():
            left = [t for t in trials if t.get("left_running")]
            if left:
                commands = sorted({" ".join(w.rsplit("/", 1)[-1] for w in c.split()[:6])[:80]
                                   for t in left for c in t["left_running"]})
                lines.append(f"- {self.name(contender)}, {model}: still running 30 s after "
                             f"SIGTERM (then killed) in {len(left)} of {len(trials)} trials "
                             "(each stop follows the restart test): "
                             + "; ".join(f"`{c}`" for c in commands))
        if not lines:
            return []
        return ["## What did not run, answered wrong, or did not stop", ""] + lines + [""]

    def batching(self) -> str:
        settings = self.data["settings"]
        return (f"up to {settings.get('max_batch', 8)} requests, waiting up to "
                f"{settings.get('batch_wait_ms', 5):g} ms for them")

    def markdown(self) -> str:
        lines = ["# workerpool against the servers users would pick instead", "",
                 "Written by `bench/report.py`. Every contender serves the same model files "
                 "(bench/peers/peer_model.py: seeded weights saved as safetensors) with the "
                 "same predict, one torch thread per worker, no batching (except the rows "
                 "named with batching: each server's own dynamic batching, "
                 f"{self.batching()}, at the largest N, one forward pass per batch), and is "
                 "called over its own native HTTP API by one load generator "
                 "(bench/reporting/loadgen.py: asyncio + aiohttp, fixed payloads).", ""]
        lines += self.machine() + self.headline()
        for model in self.models:
            lines += self.model_tables(model)
        lines += self.many_models() + self.overhead() + self.extras() + self.problems()
        return "\n".join(lines)
