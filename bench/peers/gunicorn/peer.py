"""gunicorn with uvicorn workers and --preload: the usual copy-on-write answer."""

import json

NAME = "gunicorn --preload"


def command(python, model_dir, workers, port, workdir):
    return [python, "-m", "gunicorn", "app:app", "--preload", "--workers", str(workers),
            "--worker-class", "uvicorn.workers.UvicornWorker",
            "--bind", f"127.0.0.1:{port}", "--timeout", "300"], {}


def command_many(python, models, port, workdir):
    """Every model in one app (app.py reads PEER_MODELS): gunicorn has no per-model
    workers, so one worker process serves them all."""
    return command(python, None, 1, port, workdir)


def request(inputs, model=None):
    path = "/predict" if model is None else f"/predict/{model}"
    return path, json.dumps({"inputs": inputs}).encode(), {
        "Content-Type": "application/json"}


def parse(status, body):
    return json.loads(body)
