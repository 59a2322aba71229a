"""MLServer's custom inference runtime for the shared peer model, written as MLServer's
documentation says to write one: an ``MLModel`` subclass with ``load`` and ``predict``.

With ``parallel_workers`` > 0 the main process only instantiates this class (its
``load`` is not called there: MLServer wraps it in a ``ParallelModel`` that forwards
``predict`` to the pool); every worker process of the inference pool runs ``load`` and
serves ``predict`` for the requests the main process round-robins to it.
"""

import os


from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

import peer_model


class PeerRuntime(MLModel):
    async def load(self) -> bool:
        self._model = peer_model.load(os.environ["PEER_MODEL_DIR"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = NumpyCodec.decode_input(payload.inputs[0])  # "inputs": FP32 or INT64
        answer = peer_model.predict(self._model, inputs)     # one request, one forward pass
        y = answer["y"]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                ResponseOutput(name="y", shape=[1, len(y)], datatype="FP32", data=y),
                ResponseOutput(name="pid", shape=[1], datatype="INT64",
                               data=[answer["pid"]]),
            ],
        )
