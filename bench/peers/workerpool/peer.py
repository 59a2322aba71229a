"""workerpool serve: one pool of N workers sharing one copy of the weights, KServe v2 JSON."""

import json
import os

import peer_model  # bench/peers/: standard library only at import (loadgen.load_peer)

NAME = "workerpool serve"
PEERS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(PEERS, "peer_model.py")


def command(python, model_dir, workers, port, workdir):
    # --threads-per-worker 1: every contender's workers run on one intra-op thread
    # (peer_model.load sets it for the others); workerpool's default would give a single
    # worker all the cores.
    batch, wait_ms = peer_model.batch_settings()
    predict = ["--predict", f"{MODEL}:predict"] if batch <= 1 else [
        # dynamic batching: queued requests' rows stacked, one predict_rows call, cut back
        "--predict", f"{MODEL}:predict_rows", "--max-batch-size", str(batch),
        "--max-wait-ms", str(wait_ms)]
    return [python, "-m", "workerpool", "serve", f"{MODEL}:load", *predict,
            "--name", "model", "--workers", str(workers),
            "--threads-per-worker", "1", "--host", "127.0.0.1", "--port", str(port)], {}


def command_many(python, models, port, workdir):
    """``workerpool serve --config``: a [models.NAME] table per model, one worker each,
    each loaded by its own function of a generated loaders module (a source names a
    function that takes no arguments)."""
    loaders = ["# A many-models trial's loaders (bench/peers/workerpool/peer.py wrote them)",
               "import sys", f"sys.path.insert(0, {PEERS!r})", "import peer_model", ""]
    tables = []
    for name, model_dir in models.items():
        loaders += [f"def load_{name}():", f"    return peer_model.load({str(model_dir)!r})",
                    ""]
        tables += [f"[models.{name}]", f'source = "loaders.py:load_{name}"',
                   f"predict = {MODEL + ':predict'!r}", "workers = 1",
                   "threads_per_worker = 1", ""]
    with open(os.path.join(workdir, "loaders.py"), "w") as file:
        file.write("\n".join(loaders))
    config = os.path.join(workdir, "serve.toml")
    with open(config, "w") as file:
        file.write("\n".join(tables))
    return [python, "-m", "workerpool", "serve", "--config", config,
            "--host", "127.0.0.1", "--port", str(port)], {}


def request(inputs, model=None):
    datatype = "INT64" if isinstance(inputs[0], int) else "FP32"
    body = {"inputs": [{"name": "inputs", "shape": [1, len(inputs)], "datatype": datatype,
                        "data": inputs}]}
    return f"/v2/models/{model or 'model'}/infer", json.dumps(body).encode(), {
        "Content-Type": "application/json"}


def parse(status, body):
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    return {"y": outputs["y"], "pid": int(outputs["pid"][0]),
            "batch": int(outputs["batch"][0]) if "batch" in outputs else 1}
