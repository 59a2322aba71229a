"""workerpool: serve ML models from worker processes that share one copy of the weights."""

from .errors import (BatchShapeError, ConfigError, EncodeError, InputMismatch, MessageTooLarge,
                     ModelSourceError, OutputEncodeError, OutputTooLarge, PoolBroken, PoolClosed,
                     PoolStartError, ProtocolError, QueueFull, ReloadFailed, RemoteError,
                     SharedMemoryError, TaskTimeout, WorkerCrashed, WorkerpoolError, WrongProcess)
from .signature import TensorSpec

# Pool and Runtime are imported on first use (PEP 562): a process that uses a part of the
# package (an HTTP front end of `workerpool serve`) does not hold the pool's modules
# (measured: 4.4 MiB of USS for `import workerpool` before).
_LAZY = {"Pool": ".pool.pool", "Runtime": ".pool.runtime"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})

__all__ = [
    "Pool", "Runtime", "WorkerpoolError", "PoolClosed", "PoolBroken", "PoolStartError", "WorkerCrashed",
    "QueueFull", "TaskTimeout", "EncodeError", "MessageTooLarge", "BatchShapeError",
    "ProtocolError", "RemoteError", "ModelSourceError", "WrongProcess", "TensorSpec",
    "ReloadFailed", "InputMismatch", "ConfigError", "OutputEncodeError", "OutputTooLarge",
    "SharedMemoryError", "score",
]
__version__ = "0.1.0"


def score(pool, source: str, sink: str, **options):
    """Score the file ``source`` with ``pool`` into ``sink``, streamed and resumable
    (``workerpool score`` as a function; needs the ``score`` extra). See
    :func:`workerpool.scoring.run.score` for the options."""
    from .scoring.run import score as run

    return run(pool, source, sink, **options)
