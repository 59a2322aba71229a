"""workerpool serve: one pool of N workers sharing one copy of the weights, KServe v2 JSON."""

import json
import os

NAME = "workerpool serve"
PEERS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(PEERS, "peer_model.py")


def command(python, model_dir, workers, port, workdir):
    # threads_per_worker = 1: every contender's workers run on one intra-op thread
    # (peer_model.load sets it for the others); workerpool's default would give a single
    # worker all the cores. The option is a serve.toml key, not a command-line flag.
    config = os.path.join(workdir, f"serve-{workers}.toml")
    with open(config, "w") as file:
        file.write("[models.model]\n"
                   f"source = {json.dumps(MODEL + ':load')}\n"
                   f"predict = {json.dumps(MODEL + ':predict')}\n"
                   f"workers = {int(workers)}\n"
                   "threads_per_worker = 1\n")
    return [python, "-m", "workerpool", "serve", "--config", config,
            "--host", "127.0.0.1", "--port", str(port)], {}


def request(inputs):
    datatype = "INT64" if isinstance(inputs[0], int) else "FP32"
    body = {"inputs": [{"name": "inputs", "shape": [1, len(inputs)], "datatype": datatype,
                        "data": inputs}]}
    return "/v2/models/model/infer", json.dumps(body).encode(), {
        "Content-Type": "application/json"}


def parse(status, body):
    outputs = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}
    return {"y": outputs["y"], "pid": int(outputs["pid"][0])}
