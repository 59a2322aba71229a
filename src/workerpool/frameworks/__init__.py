"""One adapter per framework: how its arrays go into the weight segment and come back.

An adapter module offers ``reduce(obj, layout)`` (a pickle reduce tuple, or NotImplemented
when ``obj`` is not its kind) and the ``rebuild_*`` functions that reduce tuple names, and
``set_threads(n)``, called in each worker before its first op. Only
frameworks already imported by the user's code are consulted, so a numpy model never
imports torch.
"""

from __future__ import annotations

import importlib

from ..modules import imported

# (module that must already be imported, adapter module)
_ADAPTERS = (
    ("tensorflow", "workerpool.frameworks.tensorflow"),
    ("torch", "workerpool.frameworks.torch"),
    ("numpy", "workerpool.frameworks.numpy"),
    ("ai_edge_litert", "workerpool.frameworks.litert"),  # threads only; tensorflow converts
)


def active_adapters():
    """The adapter modules whose framework is loaded in this process."""
    return [importlib.import_module(adapter) for framework, adapter in _ADAPTERS
            if imported(framework) is not None]
