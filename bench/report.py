"""The benchmark report: workerpool side by side with the servers users would pick instead,
on the same machine, the same model files, in the same run.

Each contender (bench/peers/<name>/) runs from its own virtual environment, built here
from its pinned requirements file. For every repetition, model and N, each contender in
turn (interleaved, so a noisy stretch of the machine hits them all) is launched, measured
(reporting/trial.py: start, memory after every worker served, throughput and latency,
restart after a SIGKILL) and stopped; then each server serves ``--many-models`` distinct
models at once (reporting/trial.py's run_many: memory and latency, the models called in
turn). A contender that cannot be installed or run gets a row saying why. Writes
bench/results/report.json, report.md and PNG plots; the results are saved after every
trial and ``--resume`` keeps them.

Then the wider rows, each a benchmark of bench/ run once against its own baseline in the
same run (EXTRAS; ``--extra NAME=ARGS`` picks them): a light model against gunicorn +
FastAPI, streaming's first item against LitServe's, many models in one server, KServe gRPC
beside HTTP, dynamic batching on and off, and the embedded Pool's per-request overhead.

    .venv/bin/python bench/report.py                       # make report: everything
    .venv/bin/python bench/report.py --contenders workerpool,litserve --models mlp256 \
        --workers 1,2 --repeats 1 --seconds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from reporting import machine, models, plots, render, summary, trial, venvs  # noqa: E402
from reporting.loadgen import load_peer  # noqa: E402

HTTP = ["workerpool", "rayserve", "litserve", "torchserve", "mlserver", "gunicorn"]
# Dynamic batching on, each server's own (gunicorn has none), at the largest N only.
BATCHING = [f"{name}{trial.BATCHED}" for name in HTTP if name != "gunicorn"]
OURS = ("workerpool", "workerpool-pool", f"workerpool{trial.BATCHED}")  # workerpool's package
CONTENDERS = HTTP + list(trial.EMBEDDED) + BATCHING
PACKAGES = ["workerpool-serve", "torch", "ray", "litserve", "torchserve", "torch-model-archiver",
            "mlserver", "gunicorn", "uvicorn", "fastapi", "safetensors", "numpy"]
RESULTS = venvs.BENCH / "results"
# The wider rows: bench/NAME.py and its arguments, run once after the trials.
EXTRAS = {
    "light": "--rounds 3 --requests 4000 --http-workers 1,2",
    "streaming": "--rounds 5",
    "many_models": "",
    "protocols": "--rounds 3",
    "throughput": "",
}


def environment(name: str) -> str:
    """The venv that runs ``name`` (the embedded ones run in workerpool's)."""
    return "workerpool" if name in trial.EMBEDDED else trial.peer_folder(name).name


def python_for(name: str, given: dict[str, str], log) -> str:
    env = environment(name)
    return given.get(env) or venvs.build(env, log)


def names() -> dict[str, str]:
    out = {}
    for name in HTTP:
        try:
            out[name] = load_peer(str(venvs.PEERS / name)).NAME
        except (OSError, AttributeError):
            out[name] = name
    for name in BATCHING:
        out[name] = f"{out[trial.peer_folder(name).name]}, batching"
    return out


def run_bench(python: str, script: str, arguments: str, out: pathlib.Path) -> dict:
    """bench/<script>.py run once: the command, when, and its JSON and markdown (or the
    error that ended it)."""
    argv = [python, str(venvs.BENCH / f"{script}.py"), *shlex.split(arguments)]
    extras = out / "extras"  # (not bench/results/<script>.md)
    env = {**os.environ, "WORKERPOOL_BENCH_RESULTS": str(extras)}
    record = {"command": " ".join([f"bench/{script}.py", arguments]).strip(),
              "started_at": trial.now()}
    print(f"[report] {record['command']}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    record["finished_at"] = trial.now()
    if done.returncode:
        record["error"] = f"exited with {done.returncode}: {done.stderr.strip()[-1500:]}"
        print(f"[report] {record['command']} failed: {record['error']}", file=sys.stderr)
        return record
    record["result"] = json.loads(done.stdout)
    markdown = extras / f"{script}.md"
    record["markdown"] = markdown.read_text() if markdown.exists() else ""
    return record


def many_models(setting: str) -> dict[str, pathlib.Path]:
    """``COUNTxMIB``: {m0: directory, ...}, COUNT MLPs of MIB MiB, each from its own seed
    (distinct weights: nothing a server could share between them); '': none."""
    if not setting:
        return {}
    count, _, size = setting.partition("x")
    if not (count.isdigit() and size.isdigit() and int(count) > 0):
        raise SystemExit(f"--many-models {setting!r}: give COUNTxMIB, as 8x32")
    return {f"m{i}": models.ensure(f"mlp{size}", seed=i) for i in range(int(count))}


def extras_wanted(given: list[str]) -> dict[str, str]:
    """``--extra NAME=ARGS`` (or NAME alone: its usual arguments; ``none``: no extras)."""
    if not given:
        return dict(EXTRAS)  # (streaming and light build LitServe's and gunicorn's venvs)
    wanted = {}
    for item in given:
        name, _, arguments = item.partition("=")
        if name == "none":
            return {}
        if name not in EXTRAS:
            raise SystemExit(f"unknown extra {name!r}; known: {sorted(EXTRAS)}")
        wanted[name] = arguments if "=" in item else EXTRAS[name]
    return wanted


DOCS = venvs.ROOT / "docs"
README = venvs.ROOT / "README.md"
# README.md's summary of the report lies between these lines (publish() writes it)
SUMMARY_START = ("<!-- report summary: `bench/report.py --publish` writes it from "
                 "docs/benchmarks.json -->")
SUMMARY_END = "<!-- end of report summary -->"


def readme_summary(data: dict) -> str:
    """The README block, markers included, for this report's data."""
    return "\n".join([SUMMARY_START, summary.readme(render.Report(data, names())),
                      SUMMARY_END])


def publish(data: dict, out: pathlib.Path) -> None:
    """The report in OUT becomes the published one: docs/benchmarks.md and .json, its
    plots beside them, and README.md's summary block rewritten from it."""
    (DOCS / "benchmarks.md").write_text((out / "report.md").read_text())
    (DOCS / "benchmarks.json").write_text((out / "report.json").read_text())
    for plots in data.get("plots", {}).values():
        for name in plots:
            (DOCS / name).write_bytes((out / name).read_bytes())
    readme = README.read_text()
    start, end = readme.index(SUMMARY_START), readme.index(SUMMARY_END) + len(SUMMARY_END)
    README.write_text(readme[:start] + readme_summary(data) + readme[end:])
    print(f"wrote {DOCS / 'benchmarks.md'}, its JSON and plots, and {README}'s summary")


def write(data: dict, out: pathlib.Path) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(data, indent=1))
    report = render.Report(data, names())
    data["plots"] = plots.draw(report, out)
    report = render.Report(data, names())
    (out / "report.json").write_text(json.dumps(data, indent=1))
    (out / "report.md").write_text(report.markdown() + "\n")
    return out / "report.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--models", default="mlp256,mlp1024,bert",
                        help="mlp<MiB> (any size) and bert")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds of load at 32 clients (half that at 1 client)")
    parser.add_argument("--per-worker", type=int, default=100)
    parser.add_argument("--min-samples", type=int, default=300,
                        help="each latency phase goes on past --seconds until this many "
                             "answers were timed (a p99 of fewer is a guess) ...")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="... or this many seconds passed")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--recover-timeout", type=float, default=60.0,
                        help="after a worker is killed, how long calls wait for an answer "
                             "(a pool that loses the call, as multiprocessing.Pool does, "
                             "waits it out)")
    parser.add_argument("--no-cold-start", dest="cold_start", action="store_false",
                        help="skip each server trial's start from a dropped page cache "
                             "(it needs root)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="the +batch contenders' largest batch ...")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="... and how long each waits for one to fill")
    parser.add_argument("--many-models", default="8x32", metavar="COUNTxMIB",
                        help="each repetition also serves this many distinct MLPs of this "
                             "many MiB from every server at once ('' skips it)")
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--python", action="append", default=[], metavar="NAME=PATH",
                        help="run contender NAME with this interpreter instead of building "
                             "its venv (e.g. workerpool=.venv/bin/python)")
    parser.add_argument("--overhead-args", default="--rounds 3",
                        help="bench/overhead.py's arguments ('' skips it)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME[=ARGS]",
                        help=f"the wider rows to run, of {sorted(EXTRAS)} (default: all, "
                             "with their usual arguments; 'none': none)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true",
                        help="keep the trials already in OUT/report.json")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite OUT/report.md and the plots from OUT/report.json")
    parser.add_argument("--publish", action="store_true",
                        help="render OUT's report, then copy it into docs/ (benchmarks.md, "
                             "benchmarks.json, the plots) and rewrite README.md's summary "
                             "from it")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.render_only or args.publish:
        data = json.loads((out / "report.json").read_text())
        print(f"wrote {write(data, out)}")
        if args.publish:
            publish(data, out)
        return
    contenders = [c for c in args.contenders.split(",") if c]
    wanted_models = [m for m in args.models.split(",") if m]  # '': the many-models rows only
    extras = list(extras_wanted(args.extra).items())
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {CONTENDERS}")
    given = {name: str(pathlib.Path(path).absolute())
             for name, path in (item.split("=", 1) for item in args.python)}
    settings = trial.Settings(seconds=args.seconds, per_worker=args.per_worker,
                              clients=args.clients, recover_timeout=args.recover_timeout,
                              min_samples=args.min_samples, max_seconds=args.max_seconds,
                              cold_start=args.cold_start, max_batch=args.max_batch,
                              batch_wait_ms=args.batch_wait_ms)
    command = "bench/report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    data = {"commands": [command],
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine.describe(), "contenders": contenders,
            "models": wanted_models, "settings": vars(settings),
            "trials": [], "unavailable": {}, "versions": {}, "model_info": {}}
    if args.resume and (out / "report.json").exists():
        old = json.loads((out / "report.json").read_text())
        data["trials"] = [{"settings": old["settings"], **t} for t in old["trials"]
                          if "error" not in t]
        data["commands"] = old.get("commands", [old.get("command")]) + data["commands"]
        data["started"] = old["started"]
        data["models"] = list(dict.fromkeys(old["models"] + data["models"]))
        data["contenders"] = list(dict.fromkeys(old["contenders"] + data["contenders"]))
        for key in ("versions", "unavailable"):
            data[key] = {**old.get(key, {}), **data[key]}
        data["many_models"] = [t for t in old.get("many_models", []) if "error" not in t]
        # a failed trial runs again; its failure stays in the report, said as re-run
        data["retried"] = old.get("retried", []) + [
            t for t in old["trials"] + old.get("many_models", []) if "error" in t]
        for key in ("overhead", "overhead_args", "extras"):
            if key in old:
                data[key] = old[key]
    done = {(t["model"], t["contender"], t["workers"], t.get("rep")) for t in data["trials"]}
    done |= {(t["many"], t["contender"], 1, t["rep"]) for t in data.get("many_models", [])}
    log = sys.stderr
    pythons: dict[str, str] = {}
    for name in contenders:
        try:
            pythons[name] = python_for(name, given, log)
            data["versions"][name] = venvs.versions(pythons[name], PACKAGES)
            data["unavailable"].pop(name, None)  # a resumed run's old failure, now mended
        except venvs.Unavailable as error:
            data["unavailable"][name] = str(error)
            print(f"[report] {name}: {error}", file=log, flush=True)
    directories = {}
    for model in data["models"]:  # a resumed run's models too, for their descriptions
        directories[model] = models.ensure(model)
        data["model_info"][model] = models.describe(directories[model])
    workers = [int(n) for n in args.workers.split(",")]
    source = venvs.source_commit()  # workerpool's package that its rows run
    harness = venvs.harness_commit()  # the harness and the peers' apps
    many = many_models(args.many_models)
    if many:
        data["many_models_setting"] = args.many_models
        data.setdefault("many_models", [])

    def record(result: dict, name: str, rep: int, key: str) -> None:
        result["rep"] = rep
        if name in OURS:
            result["workerpool_source"] = source
        result["harness"] = harness
        result["settings"] = vars(settings)
        data[key].append(result)
        print(f"[report] {json.dumps(result)}", file=log, flush=True)
        write(data, out)
    for rep in range(args.repeats):
        for model in wanted_models:
            for n in workers:
                for name in pythons:
                    if (model, name, n, rep) in done or name in data["unavailable"]:
                        continue
                    if name in BATCHING and n != max(workers):
                        continue  # batching rows: at the largest N only
                    print(f"[report] rep {rep} {model} N={n} {name}", file=log, flush=True)
                    try:
                        if name in trial.EMBEDDED:
                            result = trial.run_embedded(name, pythons[name], directories[model],
                                                        n, settings, log)
                        else:
                            result = trial.run(name, pythons[name], directories[model], n,
                                               args.port, settings, log)
                    except Exception as error:  # one contender's failure is its row
                        traceback.print_exc(file=log)
                        result = {"contender": name, "workers": n, "model": model,
                                  "error": f"{type(error).__name__}: {error}"}
                    record(result, name, rep, "trials")
        for name in pythons if many else []:
            if name not in HTTP or (args.many_models, name, 1, rep) in done \
                    or name in data["unavailable"]:
                continue
            print(f"[report] rep {rep} {args.many_models} models {name}", file=log,
                  flush=True)
            try:
                result = trial.run_many(name, pythons[name], many, args.port, settings, log)
            except Exception as error:  # one contender's failure is its row
                traceback.print_exc(file=log)
                result = {"contender": name, "error": f"{type(error).__name__}: {error}"}
            result["many"] = args.many_models
            record(result, name, rep, "many_models")
    if args.overhead_args and "workerpool" in pythons:
        data["overhead_args"] = args.overhead_args
        data["overhead"] = run_bench(pythons["workerpool"], "overhead", args.overhead_args,
                                     out).get("result", {}).get("rows")
    if "workerpool" in pythons:
        # (with this interpreter, as `make bench` runs them: the checkout's package and
        # every extra's client, which workerpool's report venv does not hold)
        data.setdefault("extras", {})
        for name, arguments in extras:
            data["extras"][name] = {**run_bench(sys.executable, name, arguments, out),
                                    "workerpool_source": source, "harness": harness}
            write(data, out)
    data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"wrote {write(data, out)}", file=log)


if __name__ == "__main__":
    main()
