"""TF Serving's warm-up convention: ``<SavedModel>/assets.extra/tf_serving_warmup_requests``.

A TFRecord file of ``PredictionLog`` messages, as TF Serving reads it: each record's
``predict_log.request`` is one warm-up call (its inputs by name). A served SavedModel
directory holding one (and no ``warmup`` of its own) gets these calls as its warm-up: every
worker runs them before it takes requests, and the first describes the model's inputs and
outputs. Read with numpy and our compiled descriptors; TensorFlow is never imported.

    TFRecord: per record, uint64 length, uint32 masked CRC-32C of the length's 8 bytes,
              the bytes, uint32 masked CRC-32C of the bytes (little-endian; both checked)
"""

from __future__ import annotations

import os
import struct

from ..frameworks import saved_model

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000  # TF Serving's own limit on warm-up records
# The operator's file, not a client's: a tensor there may fill (one value, a shape) this much.
MAX_TENSOR_BYTES = 1024 * 1024 * 1024


class WarmupError(ValueError):
    """A warm-up file that cannot be used; the message names the file and the fault."""


def warmup_file(source) -> str | None:
    """The warm-up file of a SavedModel directory ``source`` (of its highest version, for a
    base path of numbered versions), if it has one."""
    if not isinstance(source, str) or not saved_model.is_saved_model(source):
        return None
    path = os.path.join(saved_model.resolve(source)[0], WARMUP_FILE)
    return path if os.path.isfile(path) else None


def read_samples(path: str) -> list[dict]:
    """Each predict request of the file as ``{input name: array}``."""
    try:
        from .proto import protocol
        from .proto.tensor import to_array
    except ImportError as exc:
        raise WarmupError(f"{path}: reading TF Serving warm-up requests needs protobuf: "
                          f"pip install 'workerpool-serve[tfserving]' ({exc})") from None
    log_type = protocol("tf_serving").message("tensorflow.serving.PredictionLog")
    samples = []
    for index, record in enumerate(records(path)):
        if index >= MAX_RECORDS:
            raise WarmupError(f"{path}: more than {MAX_RECORDS} records (TF Serving's "
                              "limit too)")
        try:
            entry = log_type.FromString(record)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, said plainly
            raise WarmupError(f"{path}: record {index} is not a PredictionLog: "
                              f"{exc}") from None
        if entry.WhichOneof("log_type") != "predict_log":
            raise WarmupError(f"{path}: record {index} is a {entry.WhichOneof('log_type')}; "
                              "only predict_log warm-up requests are supported")
        try:
            samples.append({name: to_array(name, tensor, MAX_TENSOR_BYTES) for name, tensor
                            in entry.predict_log.request.inputs.items()})
        except ValueError as exc:  # BadRequest: the tensor's fault
            raise WarmupError(f"{path}: record {index}: {exc}") from None
    if not samples:
        raise WarmupError(f"{path} holds no records")
    return samples


def records(path: str):
    """The payloads of a TFRecord file, each checked against its CRCs."""
    header = struct.Struct("<QI")
    with open(path, "rb") as f:
        index = 0
        while True:
            head = f.read(header.size)
            if not head:
                return
            if len(head) < header.size:
                raise WarmupError(f"{path}: record {index} is cut off")
            length, length_crc = header.unpack(head)
            if masked_crc32c(head[:8]) != length_crc:
                raise WarmupError(f"{path}: record {index}: its length fails its CRC "
                                  "(not a TFRecord file, or corrupt)")
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                raise WarmupError(f"{path}: record {index} is cut off")
            if masked_crc32c(data) != struct.unpack("<I", tail)[0]:
                raise WarmupError(f"{path}: record {index}: its data fails its CRC (corrupt)")
            yield data
            index += 1


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits, plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
