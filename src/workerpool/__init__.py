"""workerpool: serve ML models from worker processes that share one copy of the weights."""

from .errors import (BatchShapeError, ConfigError, EncodeError, InputMismatch, MessageTooLarge,
                     ModelSourceError, OutputEncodeError, OutputTooLarge, PoolBroken, PoolClosed,
                     PoolStartError, ProtocolError, QueueFull, ReloadFailed, RemoteError,
                     TaskTimeout, WorkerCrashed, WorkerpoolError, WrongProcess)
from .pool.pool import Pool
from .pool.runtime import Runtime
from .signature import TensorSpec

__all__ = [
    "Pool", "Runtime", "WorkerpoolError", "PoolClosed", "PoolBroken", "PoolStartError", "WorkerCrashed",
    "QueueFull", "TaskTimeout", "EncodeError", "MessageTooLarge", "BatchShapeError",
    "ProtocolError", "RemoteError", "ModelSourceError", "WrongProcess", "TensorSpec",
    "ReloadFailed", "InputMismatch", "ConfigError", "OutputEncodeError", "OutputTooLarge", "score",
]
__version__ = "0.1.0"


def score(pool, source: str, sink: str, **options):
    """Score the file ``source`` with ``pool`` into ``sink``, streamed and resumable
    (``workerpool score`` as a function; needs the ``score`` extra). See
    :func:`workerpool.scoring.run.score` for the options."""
    from .scoring.run import score as run

    return run(pool, source, sink, **options)
