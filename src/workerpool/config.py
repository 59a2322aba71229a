"""The pool's settings: one frozen dataclass, its defaults in one place."""

from __future__ import annotations

import dataclasses
import os

START_METHODS = ("zygote", "spawn")
TF_ENGINES = ("tensorflow", "copy", "litert")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Settings of a :class:`workerpool.Pool`; see its docstring for what each one does."""

    workers: int = 2
    start_method: str = "zygote"
    # None: max(1, usable cores // workers). On 2 cores, 2 workers x 1 thread beat
    # 2 x 2 threads by 1.4-1.7x (DESIGN 4.1).
    threads_per_worker: int | None = None
    pin_cpus: bool = False
    # Dynamic batching: up to max_batch_size rows per predict call; the head of the queue
    # waits at most max_wait_ms for company (0: only what is already queued).
    max_batch_size: int = 1
    max_wait_ms: float = 0.0
    batched: bool = True
    max_queue: int | None = None  # requests waiting in the parent; past it: QueueFull
    # Weights already in an mmap'd file are served from that file (the page cache is the one
    # copy); preload copies them into the shared segment at start instead, for slow disks.
    preload: bool = False
    # TensorFlow/Keras: "tensorflow" (frozen graph, constants memory-mapped: one copy, exact),
    # "litert" (converted once; XNNPACK's packed weights shared through its cache file;
    # within float32 rounding) or "copy" (each worker loads its own copy).
    tf_engine: str = "tensorflow"
    timeout: float | None = None  # default per-request deadline, seconds
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
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.tf_engine not in TF_ENGINES:
            raise ValueError(f"tf_engine must be one of {TF_ENGINES}, got {self.tf_engine!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {self.max_queue}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {self.timeout}")
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

    @property
    def threads(self) -> int:
        """Intra-op threads of each worker."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, usable_cores() // self.workers)

    def cpus_for(self, slot: int) -> list[int] | None:
        """The CPUs worker ``slot`` is pinned to (pin_cpus), spread evenly; else None."""
        if not self.pin_cpus:
            return None
        cpus = sorted(os.sched_getaffinity(0))
        start = slot * self.threads % len(cpus)
        return [cpus[(start + i) % len(cpus)] for i in range(min(self.threads, len(cpus)))]
