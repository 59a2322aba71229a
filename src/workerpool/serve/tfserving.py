"""What TensorFlow Serving's API says of a model, once, for both its protocols.

The REST API (http/tfserving.py) answers these JSON forms as they are; the gRPC API
(grpc/tfserving.py) parses the same JSON into its messages (protobuf's JSON mapping), so a
model is described one way whichever protocol asks:

    metadata_json(model)   GetModelMetadataResponse: model_spec and the SignatureDefMap of
                           its signatures, rendered from its Signature
    status_json(models)    GetModelStatusResponse: each version's state and error

A model's signature is ``serving_default`` (an empty signature name means it too); a
SavedModel saved with several also has the others by their names.
Needs neither grpcio nor protobuf: the REST API works with the ``serve`` extra alone.
"""

from __future__ import annotations

from ..serving.model import ModelState
from ..signature import DEFAULT_NAME

PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_MAP = "tensorflow.serving.SignatureDefMap"
# ModelState -> TF Serving's ModelVersionStatus.State (a model that is ready: AVAILABLE)
STATE_OF = {ModelState.LOADING: "LOADING", ModelState.LOADED: "END",
            ModelState.FAILED: "END", ModelState.UNLOADING: "UNLOADING",
            ModelState.UNLOADED: "END", ModelState.CLOSED: "END"}
# KServe datatype name -> TensorFlow dtype name
DT_OF_DATATYPE = {"BOOL": "DT_BOOL", "UINT8": "DT_UINT8", "UINT16": "DT_UINT16",
                  "UINT32": "DT_UINT32", "UINT64": "DT_UINT64", "INT8": "DT_INT8",
                  "INT16": "DT_INT16", "INT32": "DT_INT32", "INT64": "DT_INT64",
                  "FP16": "DT_HALF", "FP32": "DT_FLOAT", "FP64": "DT_DOUBLE",
                  "BYTES": "DT_STRING"}


def dtype_name(datatype: str) -> str:
    """The TensorFlow dtype name of a KServe datatype (FP32 -> DT_FLOAT)."""
    return DT_OF_DATATYPE[datatype]


def state_of(model) -> str:
    """A model version's TF Serving state name."""
    return "AVAILABLE" if model.ready else STATE_OF[model.state]


def model_spec_json(model, signature: str = "") -> dict:
    """ModelSpec naming ``model``'s version and the signature used ("": the default)."""
    version = {"version": model.version} if model.version.isdigit() else {
        "version_label": model.version}
    return {"name": model.name, "signature_name": signature or DEFAULT_NAME, **version}


def signature_def_map_json(model) -> dict:
    """The model's SignatureDefMap (every signature it has) in protobuf's JSON form."""
    def infos(specs):
        return {spec.name: {"dtype": dtype_name(spec.datatype), "name": spec.name,
                            "tensor_shape": {"dim": [{"size": str(size)}
                                                     for size in spec.shape]}}
                for spec in specs or ()}

    signatures = model.signature
    return {"signature_def": {
        name: {"inputs": infos(signature.inputs), "outputs": infos(signature.outputs),
               "method_name": PREDICT_METHOD}
        for name, signature in ((name, signatures.selected(name))
                                for name in signatures.names)}}


def metadata_json(model) -> dict:
    """GetModelMetadataResponse as TF Serving's REST API writes it."""
    return {"model_spec": model_spec_json(model),
            "metadata": {"signature_def": signature_def_map_json(model)}}


def status_json(models: list) -> dict:
    """GetModelStatusResponse for ``models`` (versions of one name), in JSON form."""
    return {"model_version_status": [
        {"version": model.version if model.version.isdigit() else "0",
         "state": state_of(model),
         "status": {"error_code": "UNKNOWN" if model.error else "OK",
                    "error_message": model.error}} for model in models]}
