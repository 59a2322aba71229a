"""What a model takes and returns, declared by its user: names, dtypes, shapes.

The pool itself calls ``predict`` with whatever it is given; servers use a declaration to
describe the model (KServe model metadata) and to refuse a bad tensor before it reaches a
worker. -1 in a shape is any size (the batch axis, usually the first).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# KServe / Triton datatype names and the numpy dtypes they travel as.
DATATYPES = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}


def datatype_of(dtype) -> str:
    """The KServe datatype name of a numpy dtype (bytes and strings: BYTES)."""
    try:
        return _DATATYPE_OF[dtype]  # numpy's dtype attributes cost microseconds a request
    except (KeyError, TypeError):
        pass
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        datatype = _NAMES[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no KServe datatype; use one of "
                         f"{sorted(DATATYPES)}") from None
    _DATATYPE_OF[dtype] = datatype
    return datatype


_DATATYPE_OF: dict = {}  # the plain numeric dtypes only: a handful


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named input or output: ``TensorSpec("x", "FP32", (-1, 4))``. ``datatype`` is a
    KServe name (FP32, INT64, BYTES, ...) or a numpy dtype; it is kept as the KServe name."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a tensor needs a name, got {self.name!r}")
        datatype = self.datatype if self.datatype in DATATYPES else datatype_of(self.datatype)
        object.__setattr__(self, "datatype", datatype)
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            raise ValueError(f"tensor {self.name!r}: shape {self.shape!r} must be ints >= -1")
        object.__setattr__(self, "shape", shape)

    @classmethod
    def of(cls, value) -> "TensorSpec":
        """From a TensorSpec, a mapping with name/datatype/shape, or a (name, datatype,
        shape) tuple."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"name", "datatype", "dtype", "shape"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)} in tensor {value!r}")
            return cls(value.get("name"), value.get("datatype", value.get("dtype")),
                       value.get("shape", ()))
        name, datatype, shape = value
        return cls(name, datatype, shape)

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def mismatch(self, array: np.ndarray) -> str | None:
        """Why ``array`` does not fit this declaration, or None when it does."""
        got = datatype_of(array.dtype) if array.dtype.kind in "biufcOSU" else str(array.dtype)
        if got != self.datatype:
            return f"input {self.name!r} must be {self.datatype}, got {got}"
        shape = array.shape
        if len(shape) == len(self.shape):
            for want, have in zip(self.shape, shape):  # (a loop: any() and a generator
                if want != have and want != -1:     # were half of a light call's check)
                    break
            else:
                return None
        return (f"input {self.name!r} must have shape {list(self.shape)} (-1: any), got "
                f"{list(shape)}")


def specs(values) -> tuple[TensorSpec, ...] | None:
    """A declaration of inputs or outputs (None: not declared)."""
    if values is None:
        return None
    declared = tuple(TensorSpec.of(v) for v in values)
    names = [spec.name for spec in declared]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names must be unique, got {names}")
    return declared


DEFAULT_NAME = "serving_default"  # TF Serving's name for the signature a model serves


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a model takes and returns, wherever that was learnt (``source``: "declared",
    "model" (its own signature: Keras inputs, a SavedModel's signature_def), "warm-up
    call", or several joined by " + "). None: not known, so not checked."""

    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    source: str = "none"
    # The model's other signatures by name (a SavedModel's signature_defs besides
    # serving_default, which this one describes); a request picks one by its name.
    named: dict[str, "Signature"] = dataclasses.field(default_factory=dict)

    def selected(self, name: str | None) -> "Signature":
        """The signature ``name`` (this one for None, "" and DEFAULT_NAME); KeyError if the
        model has no such signature."""
        if not name or name == DEFAULT_NAME:
            return self
        return self.named[name]

    @property
    def names(self) -> list[str]:
        """Every signature's name, DEFAULT_NAME first."""
        return [DEFAULT_NAME, *self.named]

    @property
    def output_names(self) -> list[str] | None:
        return [spec.name for spec in self.outputs] if self.outputs else None

    def mismatch(self, inputs: dict) -> str | None:
        """Why named ``inputs`` (arrays; BYTES: object arrays or nested lists of bytes) do not fit,
        naming what the model expects; None when they fit or the inputs are not known."""
        if not self.inputs:
            return None
        if not self._named_as(inputs):
            expected = [spec.name for spec in self.inputs]
            shown = sorted(inputs)
            return (f"takes inputs {expected}, got "
                    f"{shown if len(shown) <= 20 else shown[:20] + ['...']}")
        for spec in self.inputs:
            value = inputs[spec.name]
            if isinstance(value, np.ndarray) or hasattr(value, "datatype"):
                problem = spec.mismatch(value)  # (an array, or a tensor in shared memory)
            elif spec.datatype != "BYTES":
                problem = f"input {spec.name!r} must be {spec.datatype}, got BYTES"
            else:
                problem = None
            if problem:
                return problem
        return None

    def _named_as(self, inputs: dict) -> bool:
        """Whether ``inputs`` has exactly the declared inputs' names."""
        if len(inputs) != len(self.inputs):
            return False
        for spec in self.inputs:
            if spec.name not in inputs:
                return False
        return True

    def ordered(self, inputs: dict) -> dict:
        """``inputs`` in the model's order (as given when the inputs are not known)."""
        if not self.inputs:
            return inputs
        return {spec.name: inputs[spec.name] for spec in self.inputs}
