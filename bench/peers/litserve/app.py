"""LitServe: one LitAPI, N inference worker processes on the CPU (workers_per_device=N).

Run in the foreground as ``python app.py``; it reads PEER_MODEL_DIR, PEER_WORKERS and
PEER_PORT. LitServe's main process spawns the inference workers and forks one uvicorn
process per worker (its default num_api_servers), plus a multiprocessing manager; all of
them are its children.

Settings beyond LitServe's defaults, each for a reason:
- restart_workers=True: with the default (False) LitServe's monitor shuts the whole server
  down when one inference worker dies; with it, the monitor spawns a replacement.
- timeout=300 (default 30 s, counted from arrival to when a worker picks the request up):
  one fp32 BERT pass on one thread takes about a second here, so a deep queue would
  otherwise be answered 504 (gunicorn's row runs with --timeout 300 too).
- dynamic batching (a ``litserve+batch`` contender: PEER_MAX_BATCH above 1): LitAPI's
  max_batch_size and batch_timeout; predict then gets the gathered requests' inputs as a
  list (LitAPI.batch keeps lists as they are) and answers a list (its unbatch).
- many models (PEER_MODELS, a many-models trial): one LitAPI per model, each at
  /predict/NAME with one inference worker (LitServer takes a list of LitAPIs, and
  workers_per_device counts per API); LitServe's default num_api_servers is then one
  uvicorn process per worker, as with one model.
- SIGTERM: LitServe installs no handler, so its main process would die on SIGTERM and
  leave every child running. It is turned into the KeyboardInterrupt that LitServer.run
  answers with its graceful shutdown.
"""

import multiprocessing
import os
import signal

import litserve as ls

import peer_model


class PeerAPI(ls.LitAPI):
    def __init__(self, model_dir=None, **options):
        super().__init__(**options)
        self.model_dir = model_dir or os.environ["PEER_MODEL_DIR"]

    def setup(self, device):
        self.model = peer_model.load(self.model_dir)

    def decode_request(self, request):
        return request["inputs"]

    def predict(self, inputs):
        if self.max_batch_size > 1:  # the batch's inputs, one list each
            return peer_model.predict_batch(self.model, inputs)
        return peer_model.predict(self.model, inputs)

    def encode_response(self, output):
        return output


_MAIN = os.getpid()


def _interrupt(signum, frame):
    if os.getpid() != _MAIN:  # a forked uvicorn process inherited this handler: plain SIGTERM
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def main():
    workers = int(os.environ.get("PEER_WORKERS", "1"))
    port = int(os.environ.get("PEER_PORT", "8000"))
    # No batching unless asked (max_batch_size defaults to 1); the default endpoint /predict.
    batch, wait_ms = peer_model.batch_settings()
    timeout_s = wait_ms / 1000 if batch > 1 else 0.0
    served = peer_model.served_models()
    apis = [PeerAPI(model_dir=directory, api_path=f"/predict/{name}")
            for name, directory in served.items()] if served else \
        PeerAPI(max_batch_size=batch, batch_timeout=timeout_s)
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=workers,
                          timeout=300, restart_workers=True)
    # How long shutdown waits for each uvicorn process to drain (LitServe's default: 30 s,
    # one after the other). A request that was in flight on a killed worker never gets an
    # answer and keeps its connection open, so at 30 s a stop would outlast the harness's
    # grace period; 5 s each keeps the whole stop well inside it.
    server.uvicorn_graceful_timeout = 5
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(host="127.0.0.1", port=port, generate_client_file=False, access_log=False)
    except KeyboardInterrupt:
        # SIGTERM before run() reached its own try (workers still loading the model): run()
        # stops nothing then, so stop the workers and the manager here rather than wait
        # for each to finish loading.
        children = multiprocessing.active_children()
        for child in children:
            child.terminate()
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()


if __name__ == "__main__":
    main()
