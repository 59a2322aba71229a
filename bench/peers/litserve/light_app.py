"""The light model in LitServe: bench/light.py's second baseline, beside gunicorn + FastAPI.

Run as ``python light_app.py PORT WORKERS`` with bench/ on PYTHONPATH (for light_model). As
LitServe's documentation writes an API: a LitAPI whose decode_request reads the request's
JSON, predict calls the model and encode_response returns the answer's JSON; served at the
KServe v2 path bench/light.py calls, with ``workers_per_device=WORKERS`` inference worker
processes on the CPU (LitServe's default: one uvicorn process per worker), no batching. It
answers the KServe v2 JSON body with the same JSON shape workerpool and the gunicorn app
answer. SIGTERM stops it as app.py's server stops (its handler, reused).
"""

import signal
import sys

import litserve as ls
import numpy as np

import light_model
from app import _interrupt

PATH = "/v2/models/light/infer"


class LightAPI(ls.LitAPI):
    def setup(self, device):
        self.model = light_model.load()

    def decode_request(self, request):
        tensor = request["inputs"][0]
        return np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])

    def predict(self, x):
        return light_model.predict(self.model, x)["probabilities"]

    def encode_response(self, output):
        return {"model_name": "light", "model_version": "1",
                "outputs": [{"name": "probabilities", "datatype": "FP32",
                             "shape": list(output.shape), "data": output.ravel().tolist()}]}


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    server = ls.LitServer(LightAPI(api_path=PATH), accelerator="cpu",
                          workers_per_device=workers, timeout=300)
    server.uvicorn_graceful_timeout = 5  # (app.py says why)
    signal.signal(signal.SIGTERM, _interrupt)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, access_log=False)
