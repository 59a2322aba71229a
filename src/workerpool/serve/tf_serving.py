"""TensorFlow Serving's gRPC API: existing TF Serving clients change only the address.

    tensorflow.serving.PredictionService
        Predict            model_spec {name, version | version_label, signature_name},
                           inputs {name: TensorProto}, output_filter -> outputs {name: ...}
        GetModelMetadata   the ``serving_default`` SignatureDef (inputs, outputs, dtypes,
                           shapes; -1: any size), packed in an Any as TF Serving does
        Classify, Regress, MultiInference: UNIMPLEMENTED (no tf.Example models here)
    tensorflow.serving.ModelService
        GetModelStatus     each version's state (AVAILABLE, LOADING, ...) and error
        HandleReloadConfigRequest: UNIMPLEMENTED (SIGHUP and the repository API reload)

Every model has one signature, ``serving_default`` (an empty signature_name means it too).
Versions are the server's version labels; TF Serving's int64 ``version`` names the label of
that number, ``version_label`` any label.
"""

from __future__ import annotations

from .errors import BadRequest, Unimplemented
from .grpc_server import Front
from .proto import protocol
from .registry import select_outputs
from .tensor_proto import from_array, to_array, types
from .tf_model import (PREDICT_METHOD, SIGNATURE, check_signature, dtype_name,
                       state_of)

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
        name = request.model_spec.name
        with self.counted(name):
            version = version_of(request.model_spec)
            check_signature(request.model_spec.signature_name)
            self.registry.get(name, version)  # NOT_FOUND before decoding
            if not request.inputs:
                raise BadRequest("the request has no inputs")
            inputs = {key: to_array(key, tensor, self.max_request_bytes)
                      for key, tensor in request.inputs.items()}
            model, outputs = await self.registry.infer(name, version, inputs,
                                                       timeout=context.time_remaining())
            outputs = select_outputs(name, outputs, list(request.output_filter))
            response = self.message("tensorflow.serving.PredictResponse")()
            fill_model_spec(response.model_spec, model)
            try:
                for key, array in outputs.items():
                    from_array(array, response.outputs[key])
            except ValueError as exc:
                raise RuntimeError(f"the model's output cannot be sent: {exc}") from None
            return response

    async def get_model_metadata(self, request, context):
        fields = list(request.metadata_field)
        if fields and fields != ["signature_def"]:
            raise BadRequest(f"metadata_field {fields}: only 'signature_def' is available")
        model = self.registry.get(request.model_spec.name, version_of(request.model_spec))
        response = self.message("tensorflow.serving.GetModelMetadataResponse")()
        fill_model_spec(response.model_spec, model)
        signatures = self.message("tensorflow.serving.SignatureDefMap")()
        fill_signature(signatures.signature_def[SIGNATURE], model)
        packed = response.metadata["signature_def"]
        # An Any names its message as TF Serving's does, so clients Unpack() it as theirs.
        packed.type_url = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
        packed.value = signatures.SerializeToString()
        return response

    async def get_model_status(self, request, context):
        spec = request.model_spec
        version = version_of(spec)
        name = spec.name
        models = [self.registry.get(name, version)] if version is not None else [
            self.registry.get(name, label) for label in self.registry.version_labels(name)]
        response = self.message("tensorflow.serving.GetModelStatusResponse")()
        for model in models:
            status = response.model_version_status.add(
                version=int(model.version) if model.version.isdigit() else 0,
                state=state_of(model))
            if model.error:
                status.status.error_code = protocol("tf_serving").enum_values(
                    "tensorflow.error.Code")["UNKNOWN"]
                status.status.error_message = model.error
        return response

    async def unimplemented(self, request, context):
        raise Unimplemented("workerpool serves Predict, GetModelMetadata and GetModelStatus "
                            "of TF Serving's API; Classify, Regress, MultiInference and "
                            "HandleReloadConfigRequest are not offered")


def version_of(model_spec) -> str | None:
    """The version label a ModelSpec asks for (None: the newest ready one)."""
    if model_spec.HasField("version"):
        return str(model_spec.version.value)
    return model_spec.version_label or None


def fill_model_spec(spec, model) -> None:
    spec.name = model.name
    spec.signature_name = SIGNATURE
    if model.version.isdigit():
        spec.version.value = int(model.version)
    else:
        spec.version_label = model.version


def fill_signature(signature, model) -> None:
    """A SignatureDef from the model's inputs and outputs (declared, or from its warm-up)."""
    numbers = types().number
    signature.method_name = PREDICT_METHOD
    for specs, infos in ((model.inputs, signature.inputs), (model.outputs, signature.outputs)):
        for spec in specs or ():
            info = infos[spec.name]
            info.name = spec.name
            info.dtype = numbers[dtype_name(spec.datatype)]
            for size in spec.shape:
                info.tensor_shape.dim.add(size=size)
