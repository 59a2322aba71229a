"""LitServe: a LitAPI served by LitServer with workers_per_device=N on the CPU."""

import json
import os

NAME = "LitServe"
APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")


def command(python, model_dir, workers, port, workdir):
    # app.py reads PEER_MODEL_DIR, PEER_WORKERS and PEER_PORT, which the harness sets.
    return [python, APP], {"PEER_WORKERS": str(workers), "PEER_PORT": str(port)}


def command_many(python, models, port, workdir):
    """One LitAPI per model (app.py reads PEER_MODELS), one inference worker each."""
    return command(python, None, 1, port, workdir)


def request(inputs, model=None):
    path = "/predict" if model is None else f"/predict/{model}"
    return path, json.dumps({"inputs": inputs}).encode(), {"Content-Type": "application/json"}


def parse(status, body):
    if status != 200:
        raise RuntimeError(f"LitServe answered {status}: {body[:200]!r}")
    answer = json.loads(body)
    return {"y": answer["y"], "pid": int(answer["pid"]), "batch": answer.get("batch", 1)}
