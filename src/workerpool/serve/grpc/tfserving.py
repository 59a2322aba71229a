"""TensorFlow Serving's gRPC API: existing TF Serving clients change only the address.

    tensorflow.serving.PredictionService
        Predict            model_spec {name, version | version_label, signature_name},
                           inputs {name: TensorProto}, output_filter -> outputs {name: ...}
        GetModelMetadata   the model's SignatureDefs (inputs, outputs, dtypes, shapes; -1:
                           any size), packed in an Any as TF Serving does
        Classify, Regress, MultiInference: UNIMPLEMENTED (no tf.Example models here)
    tensorflow.serving.ModelService
        GetModelStatus     each version's state (AVAILABLE, LOADING, ...) and error
        HandleReloadConfigRequest: UNIMPLEMENTED (SIGHUP and the repository API reload)

``signature_name`` picks a SavedModel's signature ("" and ``serving_default``: the default).
Versions are the server's version labels; TF Serving's int64 ``version`` names the label of
that number, ``version_label`` any label.
"""

from __future__ import annotations

from google.protobuf import json_format

from ...errors import OutputEncodeError
from ...serving.errors import BadRequest, Unimplemented
from ..proto.tensor import from_array, to_array
from ..tfserving import SIGNATURE_DEF_MAP, model_spec_json, signature_def_map_json, status_json
from .server import Front

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"


class TFServingGrpc(Front):
    protocol = "tfserving_grpc"
    descriptors = "tf_serving"

    def methods(self) -> dict:
        serving = "tensorflow.serving."

        def method(handler, request: str, response: str):
            return handler, self.message(serving + request), self.message(serving + response)

        return {
            PREDICTION_SERVICE: {
                "Predict": method(self.predict, "PredictRequest", "PredictResponse"),
                "GetModelMetadata": method(self.get_model_metadata, "GetModelMetadataRequest",
                                           "GetModelMetadataResponse"),
                "Classify": method(self.unimplemented, "ClassificationRequest",
                                   "ClassificationResponse"),
                "Regress": method(self.unimplemented, "RegressionRequest",
                                  "RegressionResponse"),
                "MultiInference": method(self.unimplemented, "MultiInferenceRequest",
                                         "MultiInferenceResponse"),
            },
            MODEL_SERVICE: {
                "GetModelStatus": method(self.get_model_status, "GetModelStatusRequest",
                                         "GetModelStatusResponse"),
                "HandleReloadConfigRequest": method(self.unimplemented, "ReloadConfigRequest",
                                                    "ReloadConfigResponse"),
            },
        }

    async def predict(self, request, context):
        spec = request.model_spec
        with self.plane.inference(spec.name, version_of(spec), self.protocol) as call:
            call.signature(spec.signature_name)  # an unknown one before decoding
            if not request.inputs:
                raise BadRequest("the request has no inputs")
            inputs = {key: to_array(key, tensor, self.plane.max_tensor_bytes)
                      for key, tensor in request.inputs.items()}
            outputs = await call.run(inputs, list(request.output_filter),
                                     timeout=context.time_remaining(),
                                     signature=spec.signature_name)
            response = self.message("tensorflow.serving.PredictResponse")()
            json_format.ParseDict(model_spec_json(call.model, spec.signature_name),
                                  response.model_spec)
            try:
                for key, array in outputs.items():
                    from_array(array, response.outputs[key])
            except ValueError as exc:
                raise OutputEncodeError(f"the model's output cannot be sent: {exc}") from None
            return response

    async def get_model_metadata(self, request, context):
        fields = list(request.metadata_field)
        if fields and fields != ["signature_def"]:
            raise BadRequest(f"metadata_field {fields}: only 'signature_def' is available")
        model = self.plane.model(request.model_spec.name, version_of(request.model_spec))
        response = self.message("tensorflow.serving.GetModelMetadataResponse")()
        json_format.ParseDict(model_spec_json(model), response.model_spec)
        signatures = json_format.ParseDict(signature_def_map_json(model),
                                           self.message(SIGNATURE_DEF_MAP)())
        packed = response.metadata["signature_def"]
        # An Any names its message as TF Serving's does, so clients Unpack() it as theirs.
        packed.type_url = f"type.googleapis.com/{SIGNATURE_DEF_MAP}"
        packed.value = signatures.SerializeToString()
        return response

    async def get_model_status(self, request, context):
        spec = request.model_spec
        version = version_of(spec)
        models = [self.plane.model(spec.name, version)] if version is not None else \
            self.plane.versions(spec.name)
        return json_format.ParseDict(
            status_json(models), self.message("tensorflow.serving.GetModelStatusResponse")())

    async def unimplemented(self, request, context):
        raise Unimplemented("workerpool serves Predict, GetModelMetadata and GetModelStatus "
                            "of TF Serving's API; Classify, Regress, MultiInference and "
                            "HandleReloadConfigRequest are not offered")


def version_of(model_spec) -> str | None:
    """The version label a ModelSpec asks for (None: the newest ready one)."""
    if model_spec.HasField("version"):
        return str(model_spec.version.value)
    return model_spec.version_label or None
