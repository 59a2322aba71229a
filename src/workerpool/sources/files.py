"""Model files as pool sources: a ``load()`` for a path, never holding a private copy.

    path (local, or a remote URL fetched once into the machine's cache: sources/remote.py)
      *.safetensors                safetensors load_file: tensors alias the file mapping
      torch.save zip checkpoint    torch.load(mmap=True, weights_only=True): the same
      TorchScript archive / *.pt2  loaded in the zygote (forked workers share its pages)
      directory with config.json   Hugging Face: from_pretrained aliases model.safetensors;
                                   the tokenizer rides in the pickled skeleton
      SavedModel directory         (or a base path of numbered versions: the highest),
      .keras                       to the TensorFlow engines (frameworks/tensorflow.py)

A state dict plus a ``builder`` becomes a module built on the ``meta`` device (no memory)
whose tensors are then assigned from the mapping, so the parent never makes a transient
second copy. Publishing (publishing/weights.py) sees tensors that already live in an unmodified
file mapping and hands workers the file itself: the page cache is the one copy.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Callable

import numpy as np

from ..errors import ModelSourceError
from ..modules import imported


@dataclasses.dataclass
class HuggingFaceModel:
    """What ``predict`` receives for a Hugging Face model directory."""

    model: Any
    tokenizer: Any
    config: Any


def loader_for(path: str, builder: Callable[[], Any] | None = None,
               trust_pickle: bool = False) -> Callable[[], Any]:
    """A ``load()`` for the model at ``path`` (see the module docstring for formats)."""
    return lambda: load_file(path, builder, trust_pickle)


def load_file(path: str, builder=None, trust_pickle: bool = False):
    from .remote import fetch

    path = fetch(str(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return load_huggingface(path)
        if _is_tensorflow(path):
            return load_saved_model(path)
        raise ModelSourceError(f"{path} is a directory without config.json or saved_model.pb:"
                               " give a weight file, a Hugging Face model directory, or a "
                               "SavedModel directory (or a base path of numbered versions "
                               "1/, 2/, ... holding SavedModels)")
    if not os.path.exists(path):
        raise ModelSourceError(f"no model file at {path}")
    if path.endswith(".keras"):
        import keras

        return keras.saving.load_model(path)
    if path.endswith(".safetensors"):
        return load_safetensors(path, builder)
    if path.endswith(".pt2"):
        return ZygoteLoaded(path, "export")
    if not zipfile.is_zipfile(path):
        raise ModelSourceError(
            f"{path} is neither safetensors nor a zip-format torch file; legacy torch.save "
            "files cannot be memory-mapped: re-save with torch.save (torch >= 1.6) or as "
            "safetensors")
    if _is_torchscript(path):
        return ZygoteLoaded(path, "torchscript")
    return load_checkpoint(path, builder, trust_pickle)


def load_safetensors(path: str, builder=None):
    from safetensors.torch import load_file as load_tensors

    return _into_module(load_tensors(path), builder, path)


def load_checkpoint(path: str, builder=None, trust_pickle: bool = False):
    import pickle

    import torch

    try:
        loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise ModelSourceError(
                f"{path} pickles more than tensors (a whole module?). Loading it runs code "
                "from the file: only if you trust its origin, pass trust_pickle=True (the "
                "command line's --trust-pickle; trust_pickle = true in serve.toml), or save "
                f"a state_dict instead. ({exc})") from exc
        loaded = torch.load(path, mmap=True, weights_only=False, map_location="cpu")
    if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return _into_module(loaded, builder, path)
    if builder is not None:
        raise ModelSourceError(f"{path} holds a {type(loaded).__name__}, not a state dict; "
                               "drop builder= to serve it as it is")
    return loaded


def load_huggingface(path: str) -> HuggingFaceModel:
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ModelSourceError("serving a Hugging Face directory needs transformers: "
                               "pip install transformers") from exc
    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()  # aliases model.safetensors (zero-copy)
    tokenizer = None
    if any(os.path.exists(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return HuggingFaceModel(model, tokenizer, config)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _into_module(state_dict: dict, builder, path: str):
    """The state dict itself, or ``builder()``'s module with these very tensors."""
    if builder is None:
        return state_dict
    import torch

    with torch.device("meta"):
        module = builder()
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelSourceError(f"the weights in {path} do not fit builder()'s module: "
                               f"{exc}") from exc
    leftovers = [name for name, t in [*module.named_parameters(), *module.named_buffers()]
                 if t.is_meta]
    if leftovers:
        # Buffers computed in __init__ and not saved (non-persistent): build for real, then
        # swap the file's tensors in; the built weights are freed at once.
        module = builder()
        module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval() if hasattr(module, "eval") else module


class ZygoteLoaded:
    """A model whose format cannot be published tensor by tensor (TorchScript, torch.export).

    It travels as its path and is loaded where it is unpickled: once in the zygote, whose
    forked workers then share its pages copy-on-write (with start_method="spawn", once per
    worker). The parent never loads it.
    """

    def __init__(self, path: str, kind: str):
        self.path = os.path.abspath(path)
        self.kind = kind

    def __reduce__(self):
        return (_load_in_worker, (self.path, self.kind))

    def __repr__(self) -> str:
        return f"<{self.kind} model {self.path}, loaded in the workers>"


def _load_in_worker(path: str, kind: str):
    import torch

    if kind == "torchscript":
        return torch.jit.load(path, map_location="cpu").eval()
    return torch.export.load(path).module()


def load_saved_model(path: str):
    """A SavedModel's serving signature, its variables read only when the TensorFlow
    engine maps them (frameworks/saved_model.py)."""
    from ..frameworks import saved_model

    return saved_model.load(path)


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name
                   for name in archive.namelist())


def is_tensorflow_file(path: str) -> bool:
    """A local ``.keras`` file, SavedModel directory or base path of SavedModel versions
    (a URL is not looked at: it is fetched only when load() runs)."""
    return path.endswith(".keras") or (os.path.isdir(path) and _is_tensorflow(path))


def _is_tensorflow(path: str) -> bool:
    from ..frameworks.saved_model import is_saved_model

    return is_saved_model(path)


def default_predict(model, x, signature: str | None = None):
    """The obvious call of a model that came from a file: ``model(x)``.

    A torch module gets tensors (numpy arrays are wrapped without a copy where they are
    writable; a dict of several inputs becomes keyword arguments) and its tensors come back
    as numpy arrays; a TensorFlow/Keras model (the pool's frozen graph) is called with the
    arrays as they are, a SavedModel's signature other than serving_default as
    ``model(x, signature=NAME)``. Anything else needs a ``predict`` of its own.
    """
    if signature is not None:
        return model(x, signature=signature)
    torch = imported("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        if isinstance(x, dict):
            return as_numpy(model(**{name: _as_tensor(torch, v) for name, v in x.items()}))
        return as_numpy(model(_as_tensor(torch, x)))
    if isinstance(model, (HuggingFaceModel, dict)) or not callable(model):
        raise TypeError(f"a {type(model).__name__} has no obvious call: give a predict "
                        "function (workerpool serve --predict module:function)")
    return model(x)


def _as_tensor(torch, value):
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def as_numpy(value):
    """Torch tensors (also inside tuples, lists and dicts) as numpy arrays."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {key: as_numpy(v) for key, v in value.items()}
    if type(value) in (tuple, list):
        return type(value)(as_numpy(v) for v in value)
    return value
