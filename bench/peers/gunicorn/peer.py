"""gunicorn with uvicorn workers and --preload: the usual copy-on-write answer."""

import json

NAME = "gunicorn --preload"


def command(python, model_dir, workers, port, workdir):
    return [python, "-m", "gunicorn", "app:app", "--preload", "--workers", str(workers),
            "--worker-class", "uvicorn.workers.UvicornWorker",
            "--bind", f"127.0.0.1:{port}", "--timeout", "300"], {}


def request(inputs):
    return "/predict", json.dumps({"inputs": inputs}).encode(), {
        "Content-Type": "application/json"}


def parse(status, body):
    return json.loads(body)
