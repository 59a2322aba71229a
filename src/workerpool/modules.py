"""Which frameworks this process has imported, asked without importing them.

Below every package that needs to know (the codec, the framework adapters, the workers):
a numpy model must never import torch or TensorFlow just because workerpool asked.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

# Frameworks a zygote (or the runtime every zygote of a server forks from) may import
# before its model says so: importing them is most of a zygote's start-up time.
PREIMPORTABLE = ("torch", "tensorflow", "keras", "safetensors")


def imported(name: str):
    """The module ``name`` if this process has imported it, else None (never imports it).

    A module another thread is still importing (a server loading a torch model and a
    TensorFlow model at once) is waited for: half-initialised, it lacks its attributes.
    """
    module = sys.modules.get(name)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing",
                                      False):
        return importlib.import_module(name)  # blocks on the module's import lock
    return module


def inference_mode():
    """torch.inference_mode() where this process has imported torch (a model that uses it
    has), else a context that does nothing: what a call of predict runs under."""
    torch = imported("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()
