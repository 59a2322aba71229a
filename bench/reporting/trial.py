"""One trial: one contender serving one model with N workers, measured from launch to stop.

0. cold start (a server, with ``cold_start``): the kernel's page cache dropped (root only),
   seconds from launch to the first answer; that server is then stopped;
1. start: seconds from launch to the first successful answer (polled), whose output is
   checked against the model run in-process (a warm page cache: the files were just read);
2. memory: every worker serves >= ``per_worker`` requests (32 clients), then the total PSS
   of the whole process tree (copy-on-write decay shows here);
3. throughput/latency: 32 clients (req/s, p50, p99), then 1 client (p50, p99), each for
   ``seconds`` or longer, until ``min_samples`` answers were timed; every answer under
   load is checked against the model run in-process (loadgen's ``wrong``);
4. restart: under load, SIGKILL the worker that answered last; seconds until a new worker
   answers, and the requests that failed meanwhile;
5. stop: SIGTERM to the tree (SIGKILL after 30 s); any process left is reported and killed.

``run_many``: one server serving several distinct models at once (start, latency with the
models called in turn, memory). The load generator runs as its own process
(``reporting.loadgen``). Each trial keeps what ran it: the contender's command line and
environment, a digest of its peer folder, and when it started and ended."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil

from reporting.loadgen import load_peer
from reporting.models import reference
from reporting.venvs import BENCH, PEERS, Unavailable

WORK = BENCH / ".work"
STOP_GRACE = 30.0


class Settings:
    """How long each phase runs; the smoke run in CI shrinks them."""

    def __init__(self, seconds: float = 10.0, per_worker: int = 100, clients: int = 32,
                 start_timeout: float = 600.0, recover_timeout: float = 60.0,
                 min_samples: int = 300, max_seconds: float = 120.0,
                 cold_start: bool = True, max_batch: int = 8, batch_wait_ms: float = 5.0):
        self.seconds = seconds
        self.max_batch = max_batch  # a +batch contender's dynamic batching ...
        self.batch_wait_ms = batch_wait_ms  # ... and how long a batch waits to fill
        self.cold_start = cold_start
        self.min_samples = min_samples  # a p99 rests on at least this many answers
        self.max_seconds = max_seconds  # ... unless that takes longer than this
        self.per_worker = per_worker
        self.clients = clients
        self.start_timeout = start_timeout
        self.recover_timeout = recover_timeout


def tree(root: int) -> list[psutil.Process]:
    """``root`` and its descendants, and any process that kept its session (a daemon that
    re-parented itself to init but never called setsid)."""
    found: dict[int, psutil.Process] = {}
    try:
        parent = psutil.Process(root)
        for process in [parent, *parent.children(recursive=True)]:
            found[process.pid] = process
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if process.pid not in found and os.getsid(process.pid) == root:
                found[process.pid] = process
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return list(found.values())


def tree_pss(root: int) -> tuple[float, list[list]]:
    """(total PSS in MiB, [[command, PSS MiB], ...] per process) of the tree."""
    total, each = 0, []
    for process in tree(root):
        try:
            pss = process.memory_full_info().pss
            command = " ".join(process.cmdline())[-100:] or process.name()
        except psutil.Error:
            continue
        total += pss
        each.append([command, round(pss / 2**20, 1)])
    return total / 2**20, each


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def peer_digest(folder: pathlib.Path) -> str:
    """sha256 (16 hex digits) of the peer folder's files: its app, handler, requirements
    and settings as this trial ran them."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()
                       and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def configuration(argv: list[str], env: dict, folder: pathlib.Path) -> dict:
    """What a trial ran: command line and extra environment (this checkout's paths
    shortened to ./), and the peer folder's digest."""
    root = str(BENCH.parent) + os.sep
    return {"argv": [str(a).replace(root, "./") for a in argv],
            "env": {k: str(v).replace(root, "./") for k, v in env.items()},
            "peer_digest": peer_digest(folder)}


def drop_page_cache() -> str | None:
    """Write back and drop the kernel's page cache (root only): None, or why not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
    except OSError as error:
        return f"the page cache cannot be dropped here: {error}"
    return None


def post_once(peer, port: int, inputs: list, timeout: float = 60.0, model: str | None = None):
    path, body, headers = peer.request(inputs, model=model)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers=dict(headers), method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return peer.parse(response.status, response.read())


def wait_first_answer(peer, process, port: int, inputs: list, timeout: float,
                      model: str | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Unavailable(f"the server exited with {process.returncode} before answering")
        try:
            return post_once(peer, port, inputs, model=model)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError, KeyError):
            time.sleep(0.1)
    raise Unavailable(f"no successful answer within {timeout:.0f} s of launch")


def loadgen(folder: pathlib.Path, port: int, model_dir: pathlib.Path | None, mode: str,
            **options) -> dict:
    """reporting.loadgen in its own process: ``model_dir``'s payload, each answer checked
    against its reference (None: ``targets_json=PATH`` among the options, several models)."""
    argv = [sys.executable, "-m", "reporting.loadgen", "--peer", str(folder),
            "--port", str(port), "--mode", mode]
    if model_dir is not None:
        argv += ["--inputs-json", str(model_dir / "input.json"),
                 "--reference-json", str(model_dir / "reference.json")]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"loadgen {mode} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def stop(process: subprocess.Popen) -> list[str]:
    """SIGTERM the tree, wait, SIGKILL what is left; the names of processes that outlived
    the grace period (or escaped the tree)."""
    members = tree(process.pid)
    process.send_signal(signal.SIGTERM)  # the server stops its own workers, as in production
    try:
        process.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(members, timeout=5)
    left = [_command(member) for member in alive]
    # multiprocessing's resource tracker goes last: once every process using it is dead it
    # unlinks the semaphores they left in /dev/shm and exits by itself.
    trackers = [m for m in alive if "resource_tracker" in _command(m)]
    for member in alive:
        if member not in trackers:
            _kill(member)
    for member in psutil.wait_procs(trackers, timeout=5)[1]:
        _kill(member)
    if process.poll() is None:
        process.kill()
        process.wait()
    return left


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:120] or process.name()
    except psutil.Error:
        return "?"


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.Error:
        pass


def prepare_once(peer, name: str, python: str, model_dir: pathlib.Path) -> pathlib.Path:
    """The contender's working directory for this model, prepared once (an archive)."""
    workdir = WORK / name / model_dir.name
    stamp = workdir / ".prepared"
    if not stamp.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        if hasattr(peer, "prepare"):
            peer.prepare(python, str(model_dir), str(workdir))
        stamp.touch()
    return workdir


BATCHED = "+batch"  # NAME+batch: contender NAME with its own dynamic batching on


def peer_folder(name: str) -> pathlib.Path:
    """bench/peers/NAME of a contender (NAME+batch: NAME's)."""
    return PEERS / name.removesuffix(BATCHED)


def server_env(extra_env: dict, folder: pathlib.Path, workers: int, port: int) -> dict:
    """The environment a contender's server runs in: ours, its command's, the PEER_
    variables, and PYTHONPATH holding bench/peers and its folder (no VIRTUAL_ENV: it runs
    its own venv's interpreter)."""
    env = {**os.environ, **extra_env, "PEER_WORKERS": str(workers), "PEER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join([str(PEERS), str(folder)])}
    env.pop("VIRTUAL_ENV", None)
    return env


def run(name: str, python: str, model_dir: pathlib.Path, workers: int, port: int,
        settings: Settings, log) -> dict:
    """Measure one contender at ``workers`` workers; raises Unavailable when it cannot run."""
    folder = peer_folder(name)
    peer = load_peer(str(folder))
    inputs = json.loads((model_dir / "input.json").read_text())
    workdir = prepare_once(peer, name, python, model_dir)
    batching = {"PEER_MAX_BATCH": str(settings.max_batch),
                "PEER_BATCH_WAIT_MS": str(settings.batch_wait_ms)} \
        if name.endswith(BATCHED) else {}
    os.environ.update(batching)  # (peer.command reads them too)
    try:
        argv, extra_env = peer.command(python, str(model_dir), workers, port, str(workdir))
    finally:
        for key in batching:
            del os.environ[key]
    extra_env = {**extra_env, **batching}
    env = {**server_env(extra_env, folder, workers, port), "PEER_MODEL_DIR": str(model_dir)}
    result: dict = {"contender": name, "workers": workers, "model": model_dir.name,
                    "started_at": now(), "config": configuration(argv, extra_env, folder)}

    def launch() -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=workdir, env=env, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    if settings.cold_start:
        result["cold"] = cold_start(launch, peer, port, inputs, settings.start_timeout)
    launched = time.perf_counter()
    process = launch()
    try:
        first = wait_first_answer(peer, process, port, inputs, settings.start_timeout)
        result["start_s"] = time.perf_counter() - launched
        result["max_abs_diff"] = max(abs(a - b) for a, b in zip(first["y"], reference(model_dir)))
        spread = loadgen(folder, port, model_dir, "spread", clients=settings.clients,
                         workers=workers, per_worker=settings.per_worker,
                         max_requests=settings.per_worker * workers * 4)
        result["served"] = spread
        result["pss_mib"], result["pss_by_process"] = tree_pss(process.pid)
        result["processes"] = len(result["pss_by_process"])
        timed = {"min_samples": settings.min_samples, "max_seconds": settings.max_seconds}
        result["load"] = loadgen(folder, port, model_dir, "load", clients=settings.clients,
                                 seconds=settings.seconds, **timed)
        result["single"] = loadgen(folder, port, model_dir, "load", clients=1,
                                   seconds=settings.seconds / 2, **timed)
        result["restart"] = loadgen(folder, port, model_dir, "restart",
                                    clients=settings.clients, seconds=2,
                                    recover_timeout=settings.recover_timeout)
    finally:
        result["left_running"] = stop(process)
        result["finished_at"] = now()
    return result


def cold_start(launch, peer, port: int, inputs: list, timeout: float) -> dict:
    """Seconds from launch to the first answer with the page cache dropped first (the
    model's files, the framework's libraries: all read from disk), then a stop."""
    why = drop_page_cache()
    if why is not None:
        return {"error": why}
    launched = time.perf_counter()
    process = launch()
    try:
        wait_first_answer(peer, process, port, inputs, timeout)
        outcome = {"start_s": time.perf_counter() - launched}
    except Unavailable as error:
        outcome = {"error": str(error)}
    finally:
        left = stop(process)
    return {**outcome, "left_running": left}


def run_many(name: str, python: str, model_dirs: dict[str, pathlib.Path], port: int,
             settings: Settings, log) -> dict:
    """Several distinct models in one server, started as that server's documentation says
    to serve many (``peer.command_many``: one worker per model where the server has
    per-model workers): launch to every model's first answer (each checked), then
    ``settings.clients`` clients and 1 client calling the models in turn (every answer
    checked against its own model's), then the total PSS of the tree; then stop."""
    folder = peer_folder(name)
    peer = load_peer(str(folder))
    if not hasattr(peer, "command_many"):
        raise Unavailable(f"bench/peers/{folder.name} has no many-models mode (command_many)")
    workdir = WORK / name / f"many-{len(model_dirs)}x{next(iter(model_dirs.values())).name}"
    workdir.mkdir(parents=True, exist_ok=True)
    served = {model: str(directory) for model, directory in model_dirs.items()}
    argv, extra_env = peer.command_many(python, served, port, str(workdir))
    extra_env = {**extra_env, "PEER_MODELS": json.dumps(served)}
    env = server_env(extra_env, folder, 1, port)
    result: dict = {"contender": name, "models": len(model_dirs), "started_at": now(),
                    "config": configuration(argv, extra_env, folder)}
    launched = time.perf_counter()
    process = subprocess.Popen(argv, cwd=workdir, env=env, stdout=log, stderr=log,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        targets, diffs = [], []
        for model, directory in model_dirs.items():
            inputs = json.loads((directory / "input.json").read_text())
            expected = reference(directory)
            first = wait_first_answer(peer, process, port, inputs,
                                      max(1.0, settings.start_timeout
                                          - (time.perf_counter() - launched)), model=model)
            diffs.append(max(abs(a - b) for a, b in zip(first["y"], expected)))
            targets.append({"model": model, "inputs": inputs, "reference": expected})
        result["start_s"] = time.perf_counter() - launched  # every model answered
        result["max_abs_diff"] = max(diffs)
        targets_json = workdir / "targets.json"
        targets_json.write_text(json.dumps(targets))
        timed = {"min_samples": settings.min_samples, "max_seconds": settings.max_seconds,
                 "targets_json": targets_json}
        result["load"] = loadgen(folder, port, None, "load", clients=settings.clients,
                                 seconds=settings.seconds, **timed)
        result["single"] = loadgen(folder, port, None, "load", clients=1,
                                   seconds=settings.seconds / 2, **timed)
        # after every model has answered many times: what serving them all costs
        result["pss_mib"], result["pss_by_process"] = tree_pss(process.pid)
        result["processes"] = len(result["pss_by_process"])
    finally:
        result["left_running"] = stop(process)
        result["finished_at"] = now()
    return result


EMBEDDED = ("workerpool-pool", "multiprocessing")


def run_embedded(name: str, python: str, model_dir: pathlib.Path, workers: int,
                 settings: Settings, log) -> dict:
    """An embedded contender (reporting.embedded): start, memory after every worker served
    ``per_worker`` calls, restart; no HTTP, so no throughput rows."""
    kind = "workerpool" if name == "workerpool-pool" else "multiprocessing"
    argv = [python, "-m", "reporting.embedded", "--kind", kind, "--model-dir",
            str(model_dir), "--workers", str(workers), "--per-worker",
            str(settings.per_worker), "--recover-timeout", str(settings.recover_timeout),
            "--clients", str(settings.clients)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), str(PEERS)])}
    result: dict = {"contender": name, "workers": workers, "model": model_dir.name,
                    "started_at": now(),
                    "config": configuration(argv, {}, BENCH / "reporting")}
    process = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=log, text=True, start_new_session=True)
    try:
        line = process.stdout.readline()
        if not line:
            raise Unavailable(f"the embedded driver exited with {process.wait()} before "
                              "answering")
        warm = json.loads(line)
        result["start_s"] = warm["start_s"]
        result["max_abs_diff"] = max(abs(a - b) for a, b in zip(warm["y"], reference(model_dir)))
        result["served"] = {"pids": warm["served"]}
        result["pss_mib"], result["pss_by_process"] = tree_pss(process.pid)
        result["processes"] = len(result["pss_by_process"])
        process.stdin.write("go\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if line:
            result["restart"] = json.loads(line)
        try:
            process.wait(STOP_GRACE)  # it closes its pool itself after that line
        except subprocess.TimeoutExpired:
            pass
    finally:
        result["left_running"] = stop(process)
        result["finished_at"] = now()
    return result
