"""How bench/report.py drives Ray Serve (standard library only)."""

from __future__ import annotations

import json
import os

NAME = "Ray Serve"
HERE = os.path.dirname(os.path.abspath(__file__))


def command(python, model_dir, workers, port, workdir):
    """`python app.py` in the foreground: a local Ray node and `workers` Serve replicas
    behind Serve's HTTP proxy on 127.0.0.1:`port`."""
    env = {
        "PEER_MODEL_DIR": str(model_dir),
        "PEER_WORKERS": str(workers),
        "PEER_PORT": str(port),
        "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting, no prompt
        "RAY_DEDUP_LOGS": "0",
    }
    return [str(python), os.path.join(HERE, "app.py")], env


def command_many(python, models, port, workdir):
    """One Serve application per model (app.py reads PEER_MODELS), one replica each."""
    return command(python, "", 1, port, workdir)


def request(inputs, model=None):
    body = json.dumps({"inputs": inputs}).encode()
    return "/" if model is None else f"/{model}", body, {"Content-Type": "application/json"}


def parse(status, body):
    if status != 200:
        raise RuntimeError(f"Ray Serve answered {status}: {body[:200]!r}")
    answer = json.loads(body)
    return {"y": answer["y"], "pid": int(answer["pid"]), "batch": answer.get("batch", 1)}
