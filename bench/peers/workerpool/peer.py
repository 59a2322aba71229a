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


def request(inputs):
    datatype = "INT64" if isinstance(inputs[0], int) else "FP32"
    body = {"inputs": [{"name": "inputs", "shape": [1, len(inputs)], "datatype": datatype,
                        "data": inputs}]}
    return "/v2/models/model/infer", json.dumps(body).encode(), {
        "Content-Type": "application/json"}


def parse(status, body):
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    return {"y": outputs["y"], "pid": int(outputs["pid"][0]),
            "batch": int(outputs["batch"][0]) if "batch" in outputs else 1}
