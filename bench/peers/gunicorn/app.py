"""A FastAPI app as gunicorn --preload runs it: the model is loaded at import, in the master,
and the forked workers share its pages copy-on-write until they touch them."""

from fastapi import FastAPI

import peer_model

model = peer_model.load()
app = FastAPI()


# async def: each worker runs one forward pass at a time, as every other contender's
# workers do (a plain def would run up to 40 at once in Starlette's thread pool).
@app.post("/predict")
async def predict(body: dict) -> dict:
    return peer_model.predict(model, body["inputs"])
