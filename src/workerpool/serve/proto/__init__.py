"""The protocol buffer messages of our gRPC front ends, from the public .proto files.

    triton.py       Triton's grpc_service.proto (package ``inference``): KServe Open
                    Inference Protocol v2's messages and service, and Triton's additions
                    (ModelStreamInfer, the repository RPCs) with model_config.proto
    tf_serving.py   TensorFlow Serving's apis/*.proto and the TensorFlow framework
                    protos they import (package ``tensorflow.serving``, ``tensorflow``)

Both are generated (tools/generate_protos.py runs grpcio-tools' protoc; each names its
sources and versions) and hold serialized descriptors only. They load into a descriptor pool
of our own, not protobuf's default one: tritonclient and TensorFlow define the same message
names in the default pool when they are imported, and two definitions of one name there
conflict. The wire format does not depend on which pool a class comes from, and speaking
TF Serving's messages this way never imports TensorFlow.
"""

from __future__ import annotations

import base64
import functools
import importlib

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


class Protocol:
    """One generated descriptor set: its messages and enums by full name."""

    def __init__(self, module_name: str):
        module = importlib.import_module(f"{__name__}.{module_name}")
        files = descriptor_pb2.FileDescriptorSet.FromString(
            base64.b64decode(module.FILE_DESCRIPTOR_SET))
        self.pool = descriptor_pool.DescriptorPool()
        for file in files.file:  # protoc lists each file after its imports
            self.pool.Add(file)

    @functools.lru_cache(maxsize=None)
    def message(self, full_name: str):
        """The message class, e.g. ``message("inference.ModelInferRequest")``."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def enum_values(self, full_name: str) -> dict[str, int]:
        """An enum's values by name, e.g. ``enum_values("tensorflow.DataType")``."""
        return {v.name: v.number for v in self.pool.FindEnumTypeByName(full_name).values}


@functools.lru_cache(maxsize=None)
def protocol(module_name: str) -> Protocol:
    """``protocol("triton")`` or ``protocol("tf_serving")``, loaded once."""
    return Protocol(module_name)
