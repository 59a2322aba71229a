"""The pool's settings: one frozen dataclass, its defaults in one place."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os

START_METHODS = ("zygote", "spawn")
TF_ENGINES = ("tensorflow", "copy", "litert")
LOAD_IN = ("parent", "loader")
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds, for an elastic pool given min_workers alone


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def deadline_seconds(timeout, name: str = "timeout") -> float | None:
    """A request deadline in seconds, checked: None or inf mean none; NaN, zero, negative
    numbers and non-numbers are refused (a NaN deadline would never expire)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or None, got {timeout!r} "
                        f"({type(timeout).__name__})")
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError(f"{name} must be > 0 seconds (or None, or inf for none), got {timeout}")
    return None if math.isinf(timeout) else float(timeout)


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Settings of a :class:`workerpool.Pool`; see its docstring for what each one does."""

    workers: int = 2
    # Elastic workers: the pool grows toward `workers` while requests queue and, after
    # idle_timeout seconds without work, shrinks a worker at a time down to min_workers (0:
    # scale to zero; the next request wakes a worker, forked from the zygote: no reload).
    # None/None: a fixed pool of `workers`. idle_timeout alone: min_workers 0; min_workers
    # alone (below workers): idle_timeout 60 s.
    min_workers: int | None = None
    idle_timeout: float | None = None
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
    # Where load() runs: "parent" (this process, which then holds the framework it imported)
    # or "loader" (a short-lived process that publishes the weights and exits, so this
    # process never imports torch or TensorFlow; costs a process start and an import).
    # Pool's default (None): "loader" for a TensorFlow model file or directory, else "parent".
    load_in: str | None = None
    # Torch tensors in results arrive as numpy arrays (bfloat16 as float32), so a process
    # that never imported torch (a server) does not import it to decode them.
    numpy_results: bool = False
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
    # Keep the next version's zygote started (its frameworks imported), so reload() skips
    # that part (about 2 s for torch on our machine) at the cost of one idle process.
    spare_zygote: bool = False
    # A caller waiting alone for a fast call's answer (the latest calls' typical compute
    # under half of this) checks for it this long before sleeping in poll(): on our 2-core
    # VM a sleeping thread's wake-up was ~30-60 us of a ~120-160 us round trip. 0: never;
    # never with one usable core (the worker needs it).
    spin_wait_ms: float = 0.25

    def __post_init__(self):
        # Every option is checked for type and range here, so a bad one fails at once in
        # the caller instead of later inside the dispatcher thread or a worker.
        self._integer("workers", minimum=1)
        self._integer("min_workers", minimum=0, optional=True)
        self._number("idle_timeout", minimum=0, exclusive=True, optional=True)
        if self.min_workers is None:
            object.__setattr__(self, "min_workers",
                               self.workers if self.idle_timeout is None else 0)
        if self.min_workers > self.workers:
            raise ValueError(f"min_workers must be <= workers ({self.workers}), got "
                             f"{self.min_workers}")
        if self.elastic and self.idle_timeout is None:
            object.__setattr__(self, "idle_timeout", DEFAULT_IDLE_TIMEOUT)
        self._choice("start_method", START_METHODS)
        self._integer("threads_per_worker", minimum=1, optional=True)
        self._flag("pin_cpus")
        self._integer("max_batch_size", minimum=1)
        self._number("max_wait_ms", minimum=0)
        self._flag("batched")
        self._integer("max_queue", minimum=1, optional=True)
        self._flag("preload")
        self._choice("tf_engine", TF_ENGINES)
        if self.load_in is not None:
            self._choice("load_in", LOAD_IN)
        self._flag("numpy_results")
        object.__setattr__(self, "timeout", deadline_seconds(self.timeout, "timeout"))
        self._integer("credits_per_worker", minimum=1)
        self._integer("max_message_bytes", minimum=1024)
        self._number("start_timeout", minimum=0, exclusive=True)
        self._number("close_timeout", minimum=0)
        self._number("heartbeat_interval", minimum=0, exclusive=True)
        self._number("heartbeat_timeout", minimum=0, exclusive=True, optional=True)
        if self.heartbeat_timeout is not None and \
                self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must exceed twice heartbeat_interval "
                             f"({self.heartbeat_interval} s), got {self.heartbeat_timeout}")
        self._integer("max_requests_per_worker", minimum=1, optional=True)
        self._integer("max_requests_jitter", minimum=0)
        self._integer("zero_copy_threshold", minimum=0)
        self._flag("spare_zygote")
        self._number("spin_wait_ms", minimum=0)

    def _integer(self, name: str, minimum: int, optional: bool = False) -> None:
        value = self._of_type(name, numbers.Integral, "an int", optional)
        if value is None:
            return
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}{' or None' if optional else ''}, "
                             f"got {value}")
        object.__setattr__(self, name, int(value))

    def _number(self, name: str, minimum: float, exclusive: bool = False,
                optional: bool = False) -> None:
        value = self._of_type(name, numbers.Real, "a number", optional)
        if value is None:
            return
        if not math.isfinite(value) or value < minimum or (exclusive and value == minimum):
            raise ValueError(f"{name} must be a finite number {'>' if exclusive else '>='} "
                             f"{minimum}, got {value}")
        object.__setattr__(self, name, float(value))

    def _of_type(self, name: str, kind, what: str, optional: bool):
        """The option's value if it is of ``kind`` (never a bool), None if it may be and is
        None; TypeError otherwise."""
        value = getattr(self, name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{name} must be {what}{' or None' if optional else ''}, got "
                            f"{value!r} ({type(value).__name__})")
        return value

    def _flag(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")

    def _choice(self, name: str, choices: tuple) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    @property
    def elastic(self) -> bool:
        """Whether the number of workers follows the work (min_workers < workers)."""
        return self.min_workers < self.workers

    @property
    def first_workers(self) -> int:
        """How many workers a pool starts with: all of a fixed pool's; an elastic pool's
        min_workers, and at least one (the start proves a worker boots and warms up)."""
        return max(self.min_workers, 1) if self.elastic else self.workers

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
