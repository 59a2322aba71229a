"""The dispatcher's tables and decisions, without sockets, processes or clocks of its own.

Worker slots and their states (WorkerState, with the TRANSITIONS allowed), the tasks each
worker holds, and the policies: which worker takes work, how many calls go per TASK, what
happens to each request a dying worker held, what follows a failed start, what a request
past its deadline costs. Every function here takes what it decides on (``now`` included)
and returns a decision; pool/dispatcher.py carries decisions out (socket sends, signals,
futures). tests/unit/test_scheduling.py covers each policy without a process or a sleep.
"""

from __future__ import annotations

import collections
import enum
import secrets
import time
from typing import Iterable

MAX_ATTEMPTS = 2  # a request that was in flight on this many dying workers fails
BOOT_FAILURES_BEFORE_BROKEN = 3
RESTART_BACKOFF_S = (0.0, 0.1, 0.5, 2.0)
# Unbatchable calls sent in one TASK when more are queued than workers have credit for, like
# multiprocessing's chunksize; bounded, so a slow call holds few others behind it.
MAX_CHUNK = 16
# At most this much of a worker's time in one chunk, by the typical call's compute time: a
# chunk pays for itself only where a call costs about as little as a message (tens of us);
# a chunk of slow calls keeps its last ones waiting while other workers finish and idle
# (BERT at 0.3 s a call, 4 workers, 32 clients: p99 12.4 s against p50 3.4 s).
CHUNK_BUDGET_S = 0.003
CALL_SAMPLES = 16  # the latest replies' compute times that say what a typical call takes


class WorkerState(str, enum.Enum):
    """Where a worker is in its life; ``WorkerSlot.become`` allows only TRANSITIONS."""

    STARTING = "starting"  # forked or spawned, not yet READY
    READY = "ready"  # takes work
    RETIRING = "retiring"  # sent its share (max_requests_per_worker): finishes, then STOP
    HUNG = "hung"  # silent past heartbeat_timeout: SIGABRT, then SIGKILL
    ABORTED = "aborted"  # ran past a request's deadline: SIGABRT, then SIGKILL
    GARBLED = "garbled"  # sent a message that cannot be read: SIGABRT, then SIGKILL
    STOPPING = "stopping"  # told to leave (STOP, or killed by close), or said BYE

    def __str__(self) -> str:
        return self.value


ABORTED_STATES = {WorkerState.HUNG, WorkerState.ABORTED, WorkerState.GARBLED}
TRANSITIONS = {
    WorkerState.STARTING: {WorkerState.READY, WorkerState.STOPPING},
    WorkerState.READY: {WorkerState.RETIRING, WorkerState.STOPPING, *ABORTED_STATES},
    WorkerState.RETIRING: {WorkerState.STOPPING, *ABORTED_STATES},
    **{state: {WorkerState.STOPPING} for state in ABORTED_STATES},
    WorkerState.STOPPING: set(),
}


class Task:
    """A TASK sent to a worker and not yet wholly answered: the ids still unanswered.
    ``each``: its calls run one by one (a chunk), so only the first unanswered is running;
    with ``coalesced`` answers come together, so which one runs is not known; else a batch,
    all running together."""

    __slots__ = ("ids", "each", "coalesced", "started_at", "credits")

    def __init__(self, ids: list[int], each: bool, coalesced: bool = False,
                 started_at: float | None = None, credits: int = 1):
        self.ids = ids
        self.credits = credits  # the worker's credits it holds (a stream holds them all)
        self.each = each
        self.coalesced = coalesced
        # When what it runs now began, as far as the pool can know: when it was sent to an
        # idle worker, when the task before it was answered, or (a chunk) when its previous
        # call was. None while it waits in the worker behind another task.
        self.started_at = started_at

    def running(self) -> list[int]:
        if self.coalesced:
            return []
        return self.ids[:1] if self.each else self.ids


class WorkerSlot:
    """The dispatcher's view of one worker process."""

    __slots__ = ("worker_id", "identity", "pid", "credits", "inflight", "served", "state",
                 "started_at", "ready_at", "last_seen", "isolating", "retire_after",
                 "hang_reason", "tasks", "slot", "last_sent", "sent", "admitted",
                 "idle_since")

    def __init__(self, worker_id: int, slot: int, now: float | None = None):
        self.worker_id = worker_id
        self.slot = slot  # 0..workers-1: which CPUs it is pinned to (pin_cpus)
        self.last_sent = 0.0
        self.sent = 0  # requests sent, retries included
        # Random, so no other process can predict the identity of the next worker and
        # connect in its place; it reaches the worker through the zygote.
        self.identity = b"w" + secrets.token_hex(16).encode()
        self.admitted = False  # presented the pool's secret in READY
        self.pid: int | None = None
        self.credits = 0
        self.inflight: dict = {}  # request id -> the dispatcher's Request
        self.tasks: collections.deque[Task] = collections.deque()  # sent, in order: the
        # worker runs them in this order
        self.served = 0
        self.state = WorkerState.STARTING
        self.started_at = self.last_seen = time.monotonic() if now is None else now
        self.ready_at: float | None = None
        self.idle_since = self.started_at  # since when it holds no work (elastic pools)
        self.isolating = False  # running a retried request alone
        self.retire_after: int | None = None
        self.hang_reason = ""

    def running_ids(self) -> list[int]:
        """The requests it is running now, as far as the pool can know."""
        return self.tasks[0].running() if self.tasks else []

    def become(self, state: WorkerState) -> None:
        """Move to ``state``; the same state is no move, one not in TRANSITIONS is a bug."""
        if state != self.state:
            if state not in TRANSITIONS[self.state]:
                raise RuntimeError(f"worker {self.worker_id}: no transition from "
                                   f"{self.state} to {state}")
            self.state = state


# -- policies -------------------------------------------------------------------------------
def pick_worker(workers: Iterable[WorkerSlot], idle: bool,
                recent: bool = False) -> WorkerSlot | None:
    """The ready worker with the most credit, the least recently used among equals (so
    light traffic keeps every worker warm), or with ``recent`` the most recently used (an
    elastic pool: light traffic leaves the others idle, to be stopped); with ``idle``, one
    running nothing."""
    best, best_key = None, None
    for worker in workers:
        if worker.state != WorkerState.READY or worker.isolating or worker.credits <= 0:
            continue
        if idle and worker.inflight:
            continue
        order = worker.last_sent if recent else -worker.last_sent
        if best is None or (worker.credits, order) > best_key:
            best, best_key = worker, (worker.credits, order)
    return best


def ready_credit(workers: Iterable[WorkerSlot]) -> int:
    """Tasks the ready workers can take now (one running a retry alone takes none)."""
    return sum(w.credits for w in workers
               if w.state == WorkerState.READY and not w.isolating and w.credits > 0)


def chunk_size(workers: Iterable[WorkerSlot], queued: int, worker: WorkerSlot,
               call_s: float | None = None) -> int:
    """Calls per TASK for ``worker``: one while workers have credit for all ``queued``;
    under a backlog, the queue shared out over that credit, at most MAX_CHUNK, at most
    CHUNK_BUDGET_S of calls taking ``call_s`` each (the typical call's compute seconds;
    None while none has been timed), and never past the worker's share before it retires."""
    credit = ready_credit(workers)
    if queued <= credit:
        return 1
    chunk = min(MAX_CHUNK, -(-queued // max(credit, 1)))
    if call_s:
        chunk = min(chunk, max(1, int(CHUNK_BUDGET_S / call_s)))
    if worker.retire_after:
        chunk = max(1, min(chunk, worker.retire_after - worker.sent))
    return chunk


class Fate(enum.Enum):
    """What becomes of a request its worker held when it died."""

    RETRY = "retry"  # run again, alone on an idle worker
    FAILED_HUNG = "failed_hung"  # it was running when its worker hung: it would hang another
    FAILED_CRASHES = "failed_crashes"  # in flight on MAX_ATTEMPTS workers that died


def fate(worker: WorkerSlot, request_id: int, attempts: int) -> Fate:
    """A request in flight on ``worker``, now dead, after ``attempts`` sends. A worker we
    aborted for a deadline (ABORTED) says nothing against the requests it held."""
    if worker.state == WorkerState.HUNG and request_id in worker.running_ids():
        return Fate.FAILED_HUNG
    if attempts >= MAX_ATTEMPTS and worker.state != WorkerState.ABORTED:
        return Fate.FAILED_CRASHES
    return Fate.RETRY


class AfterBootFailure(enum.Enum):
    START_ERROR = "start_error"  # the pool is still starting: Pool() raises PoolStartError
    BROKEN = "broken"  # too many in a row: PoolBroken
    RESTART = "restart"  # try again after the backoff delay
    NOTHING = "nothing"  # closing, nothing left to serve: no replacement


def after_boot_failure(started: bool, closed: bool, boot_failures: int,
                       start_deaths: int) -> tuple[AfterBootFailure, float]:
    """What follows a worker's death before READY; the counts include this one
    (``boot_failures``: the ones that failed by themselves, ``start_deaths``: all)."""
    if not started:
        return AfterBootFailure.START_ERROR, 0.0
    if boot_failures >= BOOT_FAILURES_BEFORE_BROKEN:
        return AfterBootFailure.BROKEN, 0.0
    if closed:
        return AfterBootFailure.NOTHING, 0.0
    return AfterBootFailure.RESTART, RESTART_BACKOFF_S[min(start_deaths,
                                                            len(RESTART_BACKOFF_S)) - 1]


class Overdue(enum.Enum):
    """What a request past its deadline costs. Its timeout counts from submit, queueing
    included (the caller's deadline); a worker is aborted only for a call that has itself
    run that long, never for time the request spent waiting for it."""

    UNSENT = "unsent"  # still queued: fails, never sent
    WAITING = "waiting"  # sent, not yet running in its worker: fails, its late answer dropped
    RUNNING = "running"  # has run its whole timeout: fails, its worker is aborted and replaced
    STARTED_LATE = "started_late"  # running for less than its timeout (it waited first):
    # fails, its late answer dropped; the worker is aborted only if the call still runs
    # once it has run for the whole timeout


def overdue(worker: WorkerSlot | None, request_id: int, now: float | None = None,
            timeout: float | None = None) -> Overdue:
    if worker is None:
        return Overdue.UNSENT
    if request_id not in worker.running_ids():
        return Overdue.WAITING
    started = worker.tasks[0].started_at
    if timeout is not None and started is not None and now - started < timeout:
        return Overdue.STARTED_LATE
    return Overdue.RUNNING


def still_running(worker: WorkerSlot, task: Task, request_id: int) -> bool:
    """Whether ``worker`` is still running ``request_id`` of ``task``."""
    return bool(worker.tasks) and worker.tasks[0] is task and request_id in task.running()
