"""TorchServe's custom handler for the shared benchmark model.

TorchServe runs this in each backend worker (a Python process the Java frontend starts):
``initialize`` loads the model from the archive's directory (``model.safetensors`` and
``config.json`` were packed into it as extra files, beside ``peer_model.py``), and each
request is one JSON ``{"inputs": [...]}`` body answered with ``peer_model.predict``.
Without batching the model is registered with a batch size of 1, so ``data`` holds one
request; with it (a ``torchserve+batch`` contender) ``data`` holds what the frontend
gathered, answered in one forward pass (``peer_model.predict_batch``).
"""

import json

from ts.torch_handler.base_handler import BaseHandler

import peer_model


class PeerHandler(BaseHandler):
    def initialize(self, context):
        self.context = context
        self.manifest = context.manifest
        self.model = peer_model.load(context.system_properties["model_dir"])
        self.initialized = True

    def preprocess(self, data):
        inputs = []
        for row in data:
            body = row.get("body")
            if body is None:
                body = row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            elif isinstance(body, str):
                body = json.loads(body)
            inputs.append(body["inputs"])
        return inputs

    def inference(self, data, *args, **kwargs):
        if len(data) > 1:
            return peer_model.predict_batch(self.model, data)
        return [peer_model.predict(self.model, inputs) for inputs in data]

    def postprocess(self, data):
        for index in range(len(data)):
            self.context.set_response_content_type(index, "application/json")
        return [json.dumps(answer) for answer in data]
