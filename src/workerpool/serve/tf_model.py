"""What TensorFlow Serving's API says of a model, in both its protocols (gRPC and REST).

Every model has one signature, ``serving_default`` (an empty signature name means it too),
whose inputs and outputs are the model's (declared, or described by its warm-up call).
Needs neither grpcio nor protobuf: the REST API works with the ``serve`` extra alone.
"""

from __future__ import annotations

from .errors import BadRequest, ModelNotFound

SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
# Model.state -> TF Serving's ModelVersionStatus.State
STATE_OF = {"loading": "LOADING", "ready": "AVAILABLE", "failed": "END",
            "unloading": "UNLOADING", "unavailable": "END", "closed": "END"}
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
    return STATE_OF.get("ready" if model.ready else model.state, "UNKNOWN")


def check_signature(name: str) -> None:
    if name not in ("", SIGNATURE):
        raise BadRequest(f"signature {name!r} not found; this model has {SIGNATURE!r}")


def model_status(registry, name: str, version: str | None) -> list[dict]:
    """Each version's status as TF Serving's REST API gives it."""
    labels = [version] if version is not None else registry.version_labels(name)
    rows = []
    for label in labels:
        model = registry.get(name, label)
        rows.append({"version": label, "state": state_of(model),
                     "status": {"error_code": "UNKNOWN" if model.error else "OK",
                                "error_message": model.error}})
    if not rows:
        raise ModelNotFound(f"no model named {name!r}")
    return rows
