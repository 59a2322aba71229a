"""Publishing a loaded model for workers to attach: below both the pool (which publishes in
its own process) and the loader process (which publishes and hands the descriptors over).

    weights.py    the model object -> sealed memfd + weight files + a small skeleton
    filemaps.py   which tensors already live in an mmap'd weight file (safetensors, ...)
"""

from .weights import PublishedModel, publish, weights_source

__all__ = ["PublishedModel", "publish", "weights_source"]
