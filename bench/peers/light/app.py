"""The light model in a plain FastAPI app, as `gunicorn -w N -k uvicorn.workers.UvicornWorker`
runs it: the model in every HTTP worker, no pool, no IPC. It answers the KServe v2 JSON body
bench/light.py sends with the same JSON shape workerpool answers."""

import numpy as np
from fastapi import FastAPI

import light_model

model = light_model.load()
app = FastAPI()


@app.post("/v2/models/light/infer")
async def infer(body: dict) -> dict:
    tensor = body["inputs"][0]
    x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
    out = light_model.predict(model, x)["probabilities"]
    return {"model_name": "light", "model_version": "1",
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": list(out.shape),
                         "data": out.ravel().tolist()}]}
