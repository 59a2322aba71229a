"""tf_engine="litert": a Keras/TF model converted once to .tflite, run by LiteRT.

    parent: model ──TFLiteConverter──> <cache>/<content hash>.tflite   (converted once per
            machine: the hash covers the architecture and every weight)
            opens it once with an XNNPACK weight cache file in the pool's private dir, so
            the packed weights are written to that file exactly once
    worker: on first call, CompiledModel.from_file(the .tflite, xnnpack_weight_cache_path=
            the same file): the packed weights are mapped from it, shared by every worker

Without the weight cache each worker repacks the weights privately (the TensorFlow issue's
measurement on our machine type: 626 MiB private per worker instead of 19 MiB). Outputs match the Keras call within
float32 rounding (we test 1e-5), not bit for bit: XNNPACK's kernels sum in another order.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from ..errors import EncodeError
from ..modules import imported

_threads = 1


def set_threads(threads: int) -> None:
    global _threads
    _threads = threads


def convert(model, private_dir: str) -> "LiteRTModel":
    """The model as a LiteRTModel (converting only on a cache miss); warms the weight cache."""
    path = _cached_tflite(model)
    cache = os.path.join(private_dir, f"{os.path.basename(path)}.xnnpack")
    _open(path, cache).close()  # writes the packed weights to ``cache`` once
    return LiteRTModel(path, cache)


def _cached_tflite(model) -> str:
    import tensorflow as tf

    keras = imported("keras")
    if keras is None or not isinstance(model, keras.Model):
        raise EncodeError("tf_engine='litert' converts Keras models; for other TF models "
                          "use the default tf_engine='tensorflow'")
    digest = hashlib.sha256(model.to_json().encode())
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    directory = os.path.join(os.environ.get("WORKERPOOL_CACHE") or os.path.expanduser(
        "~/.cache/workerpool/models"), "litert")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{digest.hexdigest()}.tflite")
    if not os.path.exists(path):
        data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, path)  # atomic: concurrent converters agree on the content
    return path


def _open(path: str, weight_cache: str):
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options

    options = Options(hardware_accelerators=HardwareAccelerator.CPU,
                      cpu_options=CpuOptions(num_threads=_threads,
                                             xnnpack_weight_cache_path=weight_cache))
    return CompiledModel.from_file(path, options=options)


class LiteRTModel:
    """Call it like the model: numpy in (a dict for several named inputs), numpy out."""

    def __init__(self, path: str, weight_cache: str):
        self.path = path
        self.weight_cache = weight_cache
        self._model = None  # opened on first call, in the worker
        import ai_edge_litert  # noqa: F401 - imported (never run) in the zygote

    def __reduce__(self):
        return (LiteRTModel, (self.path, self.weight_cache))

    def prepare_in_worker(self) -> None:
        """Open the model (mapping the shared weight cache) before the worker says READY."""
        if self._model is None:
            self._model = _open(self.path, self.weight_cache)

    def __call__(self, inputs):
        self.prepare_in_worker()
        model = self._model
        signature = model.get_signature_list()["serving_default"]
        names = signature["inputs"]
        values = inputs if isinstance(inputs, dict) else {names[0]: inputs}
        for index, name in enumerate(names):
            model.resize_input_tensor(index, list(np.shape(values[name])))
        in_buffers, out_buffers = model.create_input_buffers(0), model.create_output_buffers(0)
        for buffer, name in zip(in_buffers, names):
            buffer.write(np.ascontiguousarray(values[name], dtype=np.float32))
        model.run_by_index(0, in_buffers, out_buffers)
        details = model.get_output_tensor_details("serving_default")
        outputs = {}
        for buffer, name in zip(out_buffers, signature["outputs"]):
            shape = details[name]["shape"]
            outputs[name] = buffer.read(int(np.prod(shape)), np.float32).reshape(shape)
        if list(outputs) == ["output_0"]:
            return outputs["output_0"]
        return outputs
