"""The pool's settings: one frozen dataclass, its defaults in one place."""

from __future__ import annotations

import dataclasses

START_METHODS = ("zygote", "spawn")


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Settings of a :class:`workerpool.Pool`; see its docstring for what each one does."""

    workers: int = 2
    start_method: str = "zygote"
    threads_per_worker: int = 1
    # One batch running and one waiting in each worker: no worker idles between requests,
    # and no more than one request waits behind a slow one.
    credits_per_worker: int = 2
    max_message_bytes: int = 256 * 1024 * 1024
    start_timeout: float = 300.0
    close_timeout: float = 30.0
    # The work loop says it is alive this often when idle; a worker silent for longer than
    # heartbeat_timeout (stuck in predict, deadlocked) is aborted and replaced. None: never.
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float | None = 120.0
    # Recycle a worker after this many requests (+ a random 0..jitter), to contain leaks.
    max_requests_per_worker: int | None = None
    max_requests_jitter: int = 0
    # Frames above this size are sent without copying them into ZeroMQ's buffers.
    zero_copy_threshold: int = 64 * 1024

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {START_METHODS}, got {self.start_method!r}")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.credits_per_worker < 1:
            raise ValueError(f"credits_per_worker must be >= 1, got {self.credits_per_worker}")
        if self.heartbeat_timeout is not None and \
                self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must exceed twice heartbeat_interval "
                             f"({self.heartbeat_interval} s), got {self.heartbeat_timeout}")
        if self.max_requests_per_worker is not None and self.max_requests_per_worker < 1:
            raise ValueError("max_requests_per_worker must be >= 1 or None, got "
                             f"{self.max_requests_per_worker}")
        if self.max_requests_jitter < 0:
            raise ValueError(f"max_requests_jitter must be >= 0, got {self.max_requests_jitter}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
