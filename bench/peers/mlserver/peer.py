"""MLServer (Seldon) as a contender: a custom runtime (runtime.PeerRuntime) served by
``mlserver start`` with ``parallel_workers`` = the workers, over the V2 (KServe) REST API.

Standard library only: the harness imports this file in workerpool's environment.
"""

import json
import os
import pathlib

import peer_model  # bench/peers/: standard library only at import (loadgen.load_peer)

NAME = "MLServer"
MODEL = "peer"


def command(python, model_dir, workers, port, workdir):
    """Write settings.json and model-settings.json into ``workdir`` and run
    ``mlserver start workdir`` in the foreground. The main process serves HTTP on
    ``port`` and gRPC on ``port + 1`` (MLServer 1.7 always starts gRPC); the Prometheus
    metrics server is disabled. Inference runs in ``workers`` pool processes
    (multiprocessing, spawn; the main process never loads the model), which the main
    process restarts when one dies and stops on SIGTERM.

    Known MLServer 1.7.1 behaviour, left as it is: once a worker has been SIGKILLed with
    requests queued to it, the main process's feeder thread for that worker's request
    queue stays blocked on the full pipe, and on SIGTERM the main process stops every
    server and worker but then hangs in multiprocessing's exit handler joining that thread
    (with MLP payloads of ~10 KiB and more; BERT's 128 ids stay below the pipe's 64 KiB)."""
    workdir = pathlib.Path(workdir)
    # an mlserver+batch contender: adaptive batching of PEER_MAX_BATCH requests, waiting
    # up to PEER_BATCH_WAIT_MS for them
    batch, wait_ms = peer_model.batch_settings()
    _model_settings(workdir, MODEL, model_dir, batch, wait_ms / 1000)
    return _start(python, workers, port, workdir)


def command_many(python, models, port, workdir):
    """MLServer's multi-model serving: a model-settings.json per model in its own folder
    of the repository. MLServer has no per-model workers: each of its
    ``parallel_workers`` (1 here) loads every model."""
    workdir = pathlib.Path(workdir)
    for name, model_dir in models.items():
        _model_settings(workdir / name, name, model_dir, 1, 0)
    return _start(python, 1, port, workdir)


def _model_settings(folder, name, model_dir, batch, wait_s):
    """``folder``/model-settings.json: the model's files at ``parameters.uri``, where
    MLServer's settings say a runtime finds them (the runtime loads from there)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "name": name,
        "implementation": "runtime.PeerRuntime",
        "max_batch_size": batch if batch > 1 else 0,  # 0: no adaptive batching
        "max_batch_time": wait_s if batch > 1 else 0,
        "parameters": {"uri": str(model_dir)},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))


def _start(python, workers, port, workdir):
    settings = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": port + 1,
        "metrics_endpoint": None,        # no metrics server (it would take port + 2)
        "parallel_workers": workers,
        "debug": False,                  # no per-request access log
        "load_models_at_startup": True,
    }
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2))
    mlserver = os.path.join(os.path.dirname(python), "mlserver")
    return [python, mlserver, "start", str(workdir)], {}


def request(inputs, model=None):
    """One V2 inference request: the payload as the tensor "inputs" (FP32 for an MLP's
    floats, INT64 for token ids), JSON-encoded."""
    datatype = "FP32" if isinstance(inputs[0], float) else "INT64"
    body = {"inputs": [{"name": "inputs", "shape": [1, len(inputs)],
                        "datatype": datatype, "data": inputs}]}
    return (f"/v2/models/{model or MODEL}/infer", json.dumps(body).encode(),
            {"Content-Type": "application/json"})


def parse(status, body):
    if status != 200:
        raise ValueError(f"MLServer answered {status}: {body[:200]!r}")
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    return {"y": [float(v) for v in outputs["y"]], "pid": int(outputs["pid"][0]),
            "batch": int(outputs["batch"][0]) if "batch" in outputs else 1}
