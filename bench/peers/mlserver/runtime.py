"""MLServer's custom inference runtime for the shared peer model, written as MLServer's
documentation says to write one: an ``MLModel`` subclass with ``load`` and ``predict``.

With ``parallel_workers`` > 0 the main process only instantiates this class (its
``load`` is not called there: MLServer wraps it in a ``ParallelModel`` that forwards
``predict`` to the pool); every worker process of the inference pool runs ``load`` and
serves ``predict`` for the requests the main process round-robins to it.

With adaptive batching (an ``mlserver+batch`` contender) MLServer stacks the gathered
requests' tensors along the first axis into one request and cuts the outputs back by it:
``predict`` answers every row in one forward pass (``peer_model.predict_rows``).
"""

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

import peer_model


class PeerRuntime(MLModel):
    async def load(self) -> bool:
        # the model's directory: its model-settings.json's parameters.uri
        self._model = peer_model.load(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = NumpyCodec.decode_input(payload.inputs[0])  # "inputs": FP32 or INT64
        if inputs.shape[0] > 1:  # requests batched by MLServer: one row each
            rows = peer_model.predict_rows(self._model, inputs)
            y, pids = rows["y"].reshape(-1).tolist(), rows["pid"].tolist()
            batch = rows["batch"].tolist()
        else:
            answer = peer_model.predict(self._model, inputs)  # one request, one forward pass
            y, pids, batch = answer["y"], [answer["pid"]], [1]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                ResponseOutput(name="y", shape=[len(pids), len(y) // len(pids)],
                               datatype="FP32", data=y),
                ResponseOutput(name="pid", shape=[len(pids)], datatype="INT64", data=pids),
                # rows of the forward pass that answered (the harness counts it)
                ResponseOutput(name="batch", shape=[len(pids)], datatype="INT64", data=batch),
            ],
        )
