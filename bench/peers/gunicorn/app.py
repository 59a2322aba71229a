"""A FastAPI app as gunicorn --preload runs it: the model is loaded at import, in the master,
and the forked workers share its pages copy-on-write until they touch them. In a
many-models trial (PEER_MODELS) every model is loaded so, each at /predict/NAME."""

from fastapi import FastAPI, HTTPException

import peer_model

SERVED = peer_model.served_models()
models = {name: peer_model.load(directory) for name, directory in SERVED.items()}
model = None if SERVED else peer_model.load()
app = FastAPI()


# async def: each worker runs one forward pass at a time, as every other contender's
# workers do (a plain def would run up to 40 at once in Starlette's thread pool).
@app.post("/predict")
async def predict(body: dict) -> dict:
    return peer_model.predict(model, body["inputs"])


@app.post("/predict/{name}")
async def predict_named(name: str, body: dict) -> dict:
    if name not in models:
        raise HTTPException(404, f"no model named {name!r}")
    return peer_model.predict(models[name], body["inputs"])
