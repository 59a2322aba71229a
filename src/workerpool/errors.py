"""Every error type a workerpool user can catch.

All derive from :class:`WorkerpoolError`. Exceptions raised by the user's ``predict`` are
re-raised in the caller as their own type where possible (with the worker's traceback as
``__cause__``); only when that type cannot be rebuilt does :class:`RemoteError` stand in.
"""

from __future__ import annotations


class WorkerpoolError(Exception):
    """Base class of every error raised by workerpool itself."""


class PoolClosed(WorkerpoolError):
    """The pool is closed (or closing) and accepts no more work."""


class WrongProcess(WorkerpoolError, RuntimeError):
    """The pool belongs to another process: this one was forked from the pool's owner (a
    pre-forking web server, ``multiprocessing`` with fork). Create a Pool in this process."""


class PoolBroken(WorkerpoolError):
    """The pool cannot serve: its workers could not start. The message carries the cause."""


class PoolStartError(PoolBroken):
    """Starting the pool failed: loading, publishing the weights, or booting a worker."""


class WorkerCrashed(WorkerpoolError):
    """The worker running this request died before answering.

    ``exitcode`` is the exit status (negative: killed by that signal number), ``pid`` the
    worker's pid, ``crash_traceback`` the Python stack the worker was in when it crashed,
    if it could be recovered.
    """

    def __init__(self, message: str, *, pid: int | None = None, exitcode: int | None = None,
                 crash_traceback: str = ""):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.crash_traceback = crash_traceback


class ReloadFailed(WorkerpoolError):
    """``Pool.reload`` could not bring up the new version (its ``load()`` raised, its
    workers could not start, its warm-up failed). The old version is still serving; the
    cause is ``__cause__`` and is named in the message."""


class ConfigError(WorkerpoolError, ValueError):
    """A model or server configuration that cannot be used (a SPEC that names nothing, a
    bad serve.toml key); the message says what to fix."""


class ModelSourceError(WorkerpoolError, OSError):
    """A model file or URL cannot be used: missing, unreadable, an unsupported format, or a
    download that failed. The message names the path and what to do."""


class QueueFull(WorkerpoolError):
    """The pool's queue holds ``max_queue`` requests; retry later or slow down."""


class TaskTimeout(WorkerpoolError):
    """The request did not finish before its deadline."""


class EncodeError(WorkerpoolError, TypeError):
    """A value cannot cross the process boundary (unsupported type, bad dtype, too large)."""


class MessageTooLarge(EncodeError, ValueError):
    """A request or result is larger than ``max_message_bytes``."""


class OutputEncodeError(EncodeError):
    """``predict`` returned something that cannot be sent back (a lambda, a lock, an
    object array, results over ``max_message_bytes``): the model's fault, not the
    caller's. Raised by the worker; its message names the value."""


class OutputTooLarge(OutputEncodeError, MessageTooLarge):
    """``predict``'s results are larger than ``max_message_bytes``."""


class InputMismatch(WorkerpoolError, ValueError):
    """The inputs do not fit the model's: a missing or unknown input name, or a list of
    the wrong length. The message lists the names the model takes."""


class SharedMemoryError(WorkerpoolError, ValueError):
    """A tensor in a shared-memory region cannot be read or written: the region is gone
    (its client unlinked it), smaller than the tensor, or not a shared-memory object.
    Raised where the region is mapped (in a worker); the message names the region."""


class BatchShapeError(WorkerpoolError, ValueError):
    """A batched ``predict`` returned something that cannot be split back per request."""


class ProtocolError(WorkerpoolError):
    """A malformed message arrived on the pool's own link (a bug, or a foreign peer)."""


class RemoteError(WorkerpoolError):
    """``predict`` raised an exception whose type could not be rebuilt in the caller.

    ``remote_type`` is the original type's qualified name; ``__cause__`` holds the
    worker's traceback.
    """

    def __init__(self, remote_type: str, message: str):
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; attached as ``__cause__`` of remote errors."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
