"""TorchServe as a contender: its Java frontend and N Python backend workers per model.

``prepare`` packs the model once into a model store under ``workdir`` with
``torch-model-archiver --archive-format no-archive`` (a directory, not a zip, so a 1 GiB
model is copied rather than compressed): ``handler.py`` as the handler and
``model.safetensors``, ``config.json`` and ``peer_model.py`` as extra files.
``command`` writes ``config.properties`` into ``workdir`` and runs ``torchserve
--foreground`` through ``foreground.py``, which forwards SIGTERM to the Java frontend
(torchserve's own foreground wrapper just waits on it, so a SIGTERM to the wrapper alone
would leave Java and its workers running).
"""

import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import peer_model  # bench/peers/: standard library only at import (loadgen.load_peer)

NAME = "TorchServe"
MODEL = "peer"
HERE = pathlib.Path(__file__).resolve().parent
PEER_MODEL = HERE.parent / "peer_model.py"
STORE = "model_store"


def _tool(python, name):
    """A console script of the contender's venv, next to its interpreter."""
    return str(pathlib.Path(python).parent / name)


def prepare(python, model_dir, workdir, name=MODEL):
    model_dir = pathlib.Path(model_dir)
    store = pathlib.Path(workdir) / STORE
    store.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(store / name, ignore_errors=True)
    files = [model_dir / "model.safetensors", model_dir / "config.json", PEER_MODEL]
    subprocess.run([_tool(python, "torch-model-archiver"),
                    "--model-name", name, "--version", "1.0",
                    "--handler", str(HERE / "handler.py"),
                    "--extra-files", ",".join(str(f) for f in files),
                    "--export-path", str(store),
                    "--archive-format", "no-archive", "--force"],
                   check=True, cwd=workdir)


def _tmpdir(workdir):
    """Where the frontend puts its worker sockets (``<tmp>/.ts.sock.<n>``) and the wrapper
    its pid file: the workdir, unless its path is too long for a Unix socket."""
    if len(os.path.join(os.path.abspath(workdir), ".ts.sock.65535")) < 100:
        return os.path.abspath(workdir)
    return tempfile.mkdtemp(prefix="ts-")


def command(python, model_dir, workers, port, workdir):
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(os.path.join(workdir, STORE, MODEL)):
        prepare(python, model_dir, workdir)
    return _serve(python, {MODEL: workers}, port, workdir)


def command_many(python, models, port, workdir):
    """Every model of ``models`` ({name: directory}) archived under its name and
    registered at start, each with one worker."""
    workdir = os.path.abspath(workdir)
    for name, model_dir in models.items():
        if not os.path.isdir(os.path.join(workdir, STORE, name)):
            prepare(python, model_dir, workdir, name)
    return _serve(python, dict.fromkeys(models, 1), port, workdir)


def _serve(python, workers, port, workdir):
    """config.properties for the archived models ({name: workers}) and the command."""
    store = os.path.join(workdir, STORE)
    # a torchserve+batch contender: PEER_MAX_BATCH requests per forward pass, waiting up
    # to PEER_BATCH_WAIT_MS for them (TorchServe's batchSize and maxBatchDelay)
    batch, wait_ms = peer_model.batch_settings()
    delay_ms = int(wait_ms) if batch > 1 else 0
    settings = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{port + 1}",
        "metrics_address": f"http://127.0.0.1:{port + 2}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": port + 3,
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": port + 4,
        "model_store": store,
        "load_models": ",".join(workers),
        "default_workers_per_model": max(workers.values()),
        # per model: exactly its workers, one request per forward pass unless asked
        "models": json.dumps({name: {"1.0": {
            "defaultVersion": True, "marName": name,
            "minWorkers": count, "maxWorkers": count,
            "batchSize": batch, "maxBatchDelay": delay_ms, "responseTimeout": 300,
            "startupTimeout": 600}} for name, count in workers.items()}),
        "job_queue_size": 1000,
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "default_response_timeout": 300,
        "default_startup_timeout": 600,
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
        # TorchServe's documented throughput setting: its per-request log lines are
        # written by a background thread instead of the Netty and worker threads
        "async_logging": "true",
    }
    config = os.path.join(workdir, "config.properties")
    with open(config, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in settings.items())
    tmp = _tmpdir(workdir)
    env = {"TEMP": tmp, "TMPDIR": tmp}
    argv = [python, str(HERE / "foreground.py"), "--foreground", "--ncs",
            "--disable-token-auth", "--ts-config", config, "--model-store", store]
    return argv, env


def request(inputs, model=None):
    body = json.dumps({"inputs": inputs}).encode()
    return f"/predictions/{model or MODEL}", body, {"Content-Type": "application/json"}


def parse(status, body):
    if status != 200:
        raise RuntimeError(f"TorchServe answered {status}: {body[:200]!r}")
    answer = json.loads(body)
    return {"y": answer["y"], "pid": int(answer["pid"]), "batch": answer.get("batch", 1)}
