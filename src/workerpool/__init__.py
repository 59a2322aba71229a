"""workerpool: serve ML models from worker processes that share one copy of the weights."""

from .errors import (BatchShapeError, EncodeError, MessageTooLarge, ModelSourceError,
                     PoolBroken, PoolClosed, PoolStartError, ProtocolError, QueueFull,
                     ReloadFailed, RemoteError, TaskTimeout, WorkerCrashed, WorkerpoolError,
                     WrongProcess)
from .pool.pool import Pool
from .signature import TensorSpec

__all__ = [
    "Pool", "WorkerpoolError", "PoolClosed", "PoolBroken", "PoolStartError", "WorkerCrashed",
    "QueueFull", "TaskTimeout", "EncodeError", "MessageTooLarge", "BatchShapeError",
    "ProtocolError", "RemoteError", "ModelSourceError", "WrongProcess", "TensorSpec",
    "ReloadFailed",
]
__version__ = "0.1.0"
