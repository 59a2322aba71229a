"""The pool's state machine driven by hand: events in, actions out, an explicit ``now``.

No sockets, processes or sleeps: a READY or RESULT is the bytes a worker would send
(ipc/wire.py), an exit is the status the zygote would report, and time moves only when a
test passes a later ``now``. Each test checks a decision by the actions it yields and the
answers the futures would get.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from concurrent.futures import Future

import numpy as np
import pytest

import workerpool as wp
from workerpool.config import PoolConfig
from workerpool.ipc import wire
from workerpool.ipc.codec import Codec
from workerpool.pool.scheduler import (ABORT_GRACE_S, Answer, Deliver, Item, Request,
                                       Scheduler, Send, Signal, StartWorker, Stop)
from workerpool.pool.scheduling import MAX_ATTEMPTS, RESTART_BACKOFF_S, WorkerState
from workerpool.pool.streams import Stream

CODEC = Codec(allow_pickle=True, max_message_bytes=1 << 20)


class Harness:
    """A scheduler, the actions it gave, and helpers that speak as its workers."""

    def __init__(self, now: float = 100.0, **config):
        config.setdefault("workers", 2)
        self.config = PoolConfig(**config)
        self.scheduler = Scheduler(self.config, admit=lambda meta, frame: True)
        self.now = now
        self.ids = iter(range(1, 10**6))
        self.actions: list = []
        self.streams: list = []
        self.take(self.scheduler.start(now))

    def take(self, actions: list) -> list:
        self.actions.extend(actions)
        return actions

    def of(self, kind, actions=None) -> list:
        return [a for a in (self.actions if actions is None else actions) if type(a) is kind]

    def ready_all(self, credits: int = 1) -> None:
        for worker in list(self.scheduler.workers.values()):
            if worker.state == WorkerState.STARTING:
                self.ready(worker, credits)

    def ready(self, worker, credits: int = 1) -> list:
        self.scheduler.on_started(worker.worker_id, 1000 + worker.worker_id)
        return self.take(self.scheduler.on_message([worker.identity, wire.head(
            wire.READY, {"pid": 1000 + worker.worker_id, "credits": credits,
                         "secret": b"s"})], self.now))

    def submit(self, x=1.0, timeout=None) -> Request:
        body, frames = CODEC.encode_call((x,), {})
        request = Request(next(self.ids), Future(), body, frames, timeout=timeout, now=self.now)
        self.scheduler.queue_gauge.try_add(None)
        self.take(self.scheduler.submit(request))
        return request

    def submit_stream(self, credit=4, timeout=None) -> Request:
        body, frames = CODEC.encode_call((0,), {})
        stream = Stream()
        self.streams.append(stream)  # its consumer holds it: dropped, it would cancel
        sink = stream.sink
        sink.attach(lambda **control: None)
        request = Request(next(self.ids), sink, body, frames, timeout=timeout,
                          now=self.now, credit=credit)
        self.scheduler.queue_gauge.try_add(None)
        self.take(self.scheduler.submit(request))
        return request

    def items(self, worker, request, values) -> list:
        encoded = [CODEC.encode(v) for v in values]
        return self.take(self.scheduler.on_message(
            [worker.identity, *wire.stream_items(request.id, encoded)], self.now))

    def end(self, worker, request, count) -> list:
        return self.take(self.scheduler.on_message(
            [worker.identity, *wire.stream_end(request.id, count)], self.now))

    def streamed(self, request) -> list:
        return [CODEC.decode(a.body, a.frames) for a in self.of(Item) if a.request is request]

    def controls(self, worker, actions=None) -> list[tuple[bytes, dict]]:
        """The MOREs and CANCELs sent to ``worker``."""
        return [wire.read_head(a.frames[1]) for a in self.of(Send, actions)
                if a.worker is worker and not a.requests]

    def tick(self, later: float = 0.0) -> list:
        self.now += later
        return self.take(self.scheduler.tick(self.now))

    def sent_to(self, worker, actions=None) -> list[list[int]]:
        """The request ids of each TASK sent to ``worker``."""
        return [[r.id for r in a.requests] for a in self.of(Send, actions) if a.worker is worker]

    def reply(self, worker, requests, value=None, compute_s=0.001) -> list:
        items = [CODEC.encode(r.id if value is None else value) for r in requests]
        return self.take(self.scheduler.on_message(
            [worker.identity, *wire.result([r.id for r in requests], items, compute_s)],
            self.now))

    def fail(self, worker, requests, exc: BaseException) -> list:
        return self.take(self.scheduler.on_message(
            [worker.identity, *wire.error([r.id for r in requests], exc, 1 << 20)], self.now))

    def exit(self, worker, status: int | None, report: str = "") -> list:
        return self.take(self.scheduler.on_exit(worker.worker_id, status, report, self.now))

    def answer_of(self, request: Request):
        """(value, error) the request's future would get; AssertionError if none or two."""
        answers = [a for a in self.actions if type(a) in (Answer, Deliver)
                   and a.request is request]
        assert len(answers) == 1, answers
        answer = answers[0]
        if type(answer) is Deliver:
            return CODEC.decode(answer.body, answer.frames), None
        return answer.value, answer.error

    def unanswered(self, request: Request) -> bool:
        return not any(type(a) in (Answer, Deliver) and a.request is request
                       for a in self.actions)

    def workers(self, state=None) -> list:
        return [w for w in self.scheduler.workers.values() if state is None or w.state == state]


@pytest.fixture
def pool():
    harness = Harness()
    harness.ready_all()
    assert harness.scheduler.started
    return harness


def test_start_asks_for_every_worker_and_is_started_once_all_are_ready():
    harness = Harness(workers=3)
    starts = harness.of(StartWorker)
    assert [s.worker_id for s in starts] == [1, 2, 3]
    assert len({s.identity for s in starts}) == 3
    first, *others = harness.workers()
    harness.ready(first)
    assert not harness.scheduler.started
    for worker in others:
        harness.ready(worker)
    assert harness.scheduler.started


def test_a_request_is_sent_to_a_ready_worker_and_its_result_delivered(pool):
    request = pool.submit(7.0)
    actions = pool.tick()
    (send,) = pool.of(Send, actions)
    assert send.requests == [request] and send.frames[0] == send.worker.identity
    assert send.worker.credits == 0 and request.worker is send.worker
    assert pool.scheduler.queue_gauge.count == 0
    pool.reply(send.worker, [request], value=14.0)
    assert pool.answer_of(request) == (14.0, None)
    assert send.worker.credits == 1 and not send.worker.inflight


def send_alone(harness, x=1.0, timeout=None, **request_options):
    """A caller's request sent as Dispatcher.submit sends one that finds the pool idle:
    lone_task's TASK, then lone_sent's record of it. The request, and the actions (the
    TASK first), or None where it must be submitted as usual."""
    body, frames = CODEC.encode_call((x,), {})
    request = Request(next(harness.ids), Future(), body, frames, timeout=timeout,
                      now=harness.now, **request_options)
    harness.scheduler.queue_gauge.try_add(None)
    sent = harness.scheduler.lone_task(request)
    if sent is None:
        return request, None
    assert request.worker is None and not sent.worker.inflight  # nothing recorded yet
    return request, harness.take([sent, *harness.scheduler.lone_sent(sent, harness.now)])


def test_a_request_that_finds_the_pool_idle_is_sent_at_once_as_a_tick_would(pool):
    request, actions = send_alone(pool, 7.0, timeout=0.5)
    (send,) = pool.of(Send, actions)
    assert send.requests == [request] and request.worker is send.worker
    assert send.worker.inflight == {request.id: request} and send.worker.credits == 0
    assert pool.scheduler.queue_gauge.count == 0 and not pool.scheduler.pending
    kind, meta = wire.read_head(send.frames[1])
    assert kind == wire.TASK and meta["ids"] == [request.id] and meta["each"]
    assert pool.scheduler.metrics.batch_rows[1] == 1  # counted as dispatch counts it
    # Its deadline is kept: past it, it fails and its worker is aborted, as if queued.
    assert pool.scheduler.next_wake() == pytest.approx(request.deadline)
    pool.tick(0.6)
    _, error = pool.answer_of(request)
    assert isinstance(error, wp.TaskTimeout) and send.worker.state == WorkerState.ABORTED
    # The next one goes to the other worker, idle; with none idle, it is not sent here.
    other, actions = send_alone(pool)
    assert pool.sent_to(send.worker, actions) == [] and other.worker is not None
    assert send_alone(pool)[1] is None


def test_no_lone_task_for_what_must_queue_or_wait_for_company(pool):
    queued = pool.submit()
    for worker in pool.workers():
        worker.credits = 0  # nothing idle can take it yet: it stays queued
    pool.tick()
    for worker in pool.workers():
        worker.credits = 1
    assert send_alone(pool)[1] is None  # something is queued: it goes behind it
    pool.tick()
    assert queued.worker is not None
    batching = Harness(max_batch_size=8, max_wait_ms=5)
    batching.ready_all()
    array = np.zeros((1, 4), np.float32)
    body, frames = CODEC.encode_call((array,), {})
    request = Request(1, Future(), body, frames, batch_key=("numpy", "float32", (4,)),
                      rows=1, now=batching.now)
    assert batching.scheduler.lone_task(request) is None  # waits for company
    assert send_alone(batching)[1] is not None  # not batchable: nothing to wait for
    assert send_alone(pool, credit=4)[1] is None  # a stream: dispatch sends it alone
    cancelled = Request(99, Future(), b"", [], now=pool.now)
    cancelled.future.cancel()
    assert pool.scheduler.lone_task(cancelled) is None  # given up on: never sent
    pool.take(pool.scheduler.close(drain=True))
    assert send_alone(pool)[1] is None


def test_a_lone_task_that_cannot_reach_its_worker_is_retried_unsent(pool):
    request, actions = send_alone(pool)
    (sent,) = pool.of(Send, actions)
    pool.take(pool.scheduler.unreachable(sent, pool.now))  # as Dispatcher.send_alone does
    assert not sent.worker.inflight and sent.worker.credits == 0
    (again,) = pool.of(Send)[1:]  # sent again at once, to the other worker
    assert again.requests == [request] and again.worker is not sent.worker
    assert request.worker is again.worker and request.attempts == 1  # the one that left


def test_tick_with_nothing_due_does_nothing_and_a_due_timer_still_runs(pool):
    request = pool.submit()
    pool.tick()
    assert pool.tick() == [] and request.worker is not None
    ran = []
    pool.scheduler.call_later(pool.now, 1.0, ran.append)
    assert pool.tick(0.5) == [] and ran == []
    pool.tick(0.6)
    assert ran == [pytest.approx(pool.now)]


def test_no_credit_means_queued_and_the_next_send_follows_a_reply(pool):
    first, _ = pool.submit(), pool.submit()
    sends = pool.of(Send, pool.tick())
    assert len(sends) == 2 and {s.worker.worker_id for s in sends} == {1, 2}
    third = pool.submit()
    assert pool.of(Send, pool.tick()) == [] and list(pool.scheduler.pending) == [third]
    pool.reply(first.worker, [first])
    assert pool.sent_to(sends[0].worker, pool.tick()) == [[third.id]]


def backlog_behind_a_reply(pool, compute_s: float, warmup_s: float | None = None) -> list:
    """Both workers busy, 10 queued; the first worker answers, its call having taken
    ``compute_s`` (after 15 replies of ``warmup_s`` each, if given): the TASK it gets next."""
    if warmup_s is not None:
        for _ in range(15):
            request = pool.submit()
            pool.tick()
            pool.reply(request.worker, [request], compute_s=warmup_s)
            pool.tick()
    first, _ = pool.submit(), pool.submit()
    pool.tick()
    queued = [pool.submit() for _ in range(10)]
    pool.tick()
    worker = first.worker
    assert list(pool.scheduler.pending) == queued
    pool.reply(worker, [first], compute_s=compute_s)
    (sent,) = pool.sent_to(worker, pool.tick())
    return sent


def test_a_backlog_of_fast_calls_leaves_in_chunks_of_slow_calls_one_by_one(pool):
    # 10 queued, 1 credit free: all of it goes, 0.1 ms apiece
    assert len(backlog_behind_a_reply(pool, compute_s=0.0001)) == 10
    pool = Harness()
    pool.ready_all()
    # a BERT-like 0.3 s call: a chunk would hold the calls at its end 0.3 s apiece
    assert len(backlog_behind_a_reply(pool, compute_s=0.3)) == 1


def test_one_slow_call_does_not_stop_a_fast_models_chunks(pool):
    # the typical call is the median of the latest: one 0.5 s call among fast ones
    assert len(backlog_behind_a_reply(pool, compute_s=0.5, warmup_s=0.0001)) == 10


def test_a_remote_error_answers_with_the_same_exception_type(pool):
    request = pool.submit()
    pool.tick()
    (send,) = pool.of(Send)
    pool.fail(send.worker, [request], KeyError("no such feature"))
    _, error = pool.answer_of(request)
    assert isinstance(error, KeyError) and "no such feature" in str(error)


def test_a_crash_retries_its_requests_alone_and_a_second_crash_fails_them(pool):
    poison, innocent = pool.submit(), pool.submit()
    pool.tick()
    first = next(w for w in pool.workers() if poison.id in w.inflight)
    pool.exit(first, -signal.SIGSEGV, report="Fatal Python error: Segmentation fault")
    assert pool.unanswered(poison) and list(pool.scheduler.retries) == [poison]
    assert len(pool.of(StartWorker)) == 3  # a replacement
    # the retry goes only to an idle worker, and nothing else is sent there meanwhile
    pool.reply(innocent.worker, [innocent])
    actions = pool.tick()
    (retry,) = pool.of(Send, actions)
    assert retry.requests == [poison] and retry.worker.isolating
    later = pool.submit()
    assert pool.sent_to(retry.worker, pool.tick()) == []
    assert poison.attempts == MAX_ATTEMPTS
    pool.exit(retry.worker, -signal.SIGSEGV)
    _, error = pool.answer_of(poison)
    assert isinstance(error, wp.WorkerCrashed) and "not retried again" in str(error)
    assert pool.answer_of(innocent) == (innocent.id, None)
    assert pool.unanswered(later)


def test_a_crash_report_reaches_the_caller(pool):
    request = pool.submit()
    pool.tick()
    pool.exit(request.worker, -signal.SIGSEGV, report="Current thread 0x1:\n  File x")
    pool.ready_all()
    pool.tick()
    pool.exit(request.worker, -signal.SIGSEGV, report="Current thread 0x2:\n  File y")
    _, error = pool.answer_of(request)
    assert error.crash_traceback.startswith("Current thread 0x2")
    assert "Python stack at the crash" in str(error) and error.exitcode == -signal.SIGSEGV


def test_an_unsent_request_past_its_deadline_fails_and_is_never_sent(pool):
    for worker in pool.workers():
        worker.credits = 0
    request = pool.submit(timeout=0.5)
    assert pool.scheduler.next_wake() == pytest.approx(request.deadline)
    pool.tick(0.6)
    _, error = pool.answer_of(request)
    assert isinstance(error, wp.TaskTimeout) and "never sent" in str(error)
    assert not pool.scheduler.pending and pool.scheduler.queue_gauge.count == 0
    for worker in pool.workers():
        worker.credits = 1
    assert pool.of(Send, pool.tick()) == []


def test_a_running_request_past_its_deadline_takes_its_worker_down(pool):
    slow = pool.submit(timeout=1.0)
    pool.tick()
    worker = slow.worker
    pool.tick(1.5)
    _, error = pool.answer_of(slow)
    assert isinstance(error, wp.TaskTimeout) and "aborted" in str(error)
    assert worker.state == WorkerState.ABORTED
    assert pool.of(Signal) == [Signal(worker.worker_id, signal.SIGABRT)]
    pool.tick(ABORT_GRACE_S + 0.01)  # still there after the grace: SIGKILL
    assert pool.of(Signal)[-1] == Signal(worker.worker_id, signal.SIGKILL)
    pool.exit(worker, -signal.SIGKILL)
    assert pool.scheduler.counters["crashes"] == 0  # we killed it: not the model's crash
    assert len(pool.of(StartWorker)) == 3
    pool.reply(worker, [slow])  # its late answer is dropped, never re-delivered
    pool.answer_of(slow)


def test_a_request_that_queued_past_its_deadline_does_not_abort_a_worker_it_barely_ran_on(
        pool):
    """The timeout counts queueing (the caller waits for all of it), but a worker is
    aborted only for a call that has itself run the whole timeout: a request that waited
    0.8 s of its 1 s fails at 1 s, its worker goes on, and is aborted only if that call
    still runs 1 s after it began."""
    first, second = pool.workers()
    second.credits = 0  # one worker: the second request waits for the first
    busy = pool.submit()
    pool.tick()
    late = pool.submit(timeout=1.0)
    pool.tick(0.8)
    pool.reply(first, [busy])  # the worker turns to the late request 0.8 s after it came
    pool.tick()
    assert late.worker is first
    pool.tick(0.3)  # past its deadline, 0.3 s into its call
    _, error = pool.answer_of(late)
    assert isinstance(error, wp.TaskTimeout) and "waited 0.800 s" in str(error)
    assert first.state == WorkerState.READY and pool.of(Signal) == []
    pool.reply(first, [late])  # finished in time after all: the late answer is dropped
    pool.tick(1.0)
    assert first.state == WorkerState.READY and pool.of(Signal) == []
    pool.answer_of(late)  # still the one answer
    stuck = pool.submit(timeout=1.0)  # queued 0.5 s, then a call that never returns
    first.credits = 0
    pool.tick(0.5)
    first.credits = 1
    pool.tick()
    assert stuck.worker is first
    pool.tick(0.6)  # its deadline: a 504, the worker left running
    assert isinstance(pool.answer_of(stuck)[1], wp.TaskTimeout) and pool.of(Signal) == []
    pool.tick(0.5)  # its call has now run 1.1 s: the worker is aborted
    assert first.state == WorkerState.ABORTED
    assert pool.of(Signal) == [Signal(first.worker_id, signal.SIGABRT)]


def test_a_silent_worker_is_aborted_and_its_running_request_not_retried():
    harness = Harness(heartbeat_timeout=5.0, heartbeat_interval=1.0)
    harness.ready_all(credits=2)
    silent, alive = harness.scheduler.workers[1], harness.scheduler.workers[2]
    alive.credits = 0  # both requests go to the silent one, a TASK each
    running, waiting = harness.submit(), harness.submit()
    harness.tick()
    assert running.worker is silent and waiting.worker is silent
    harness.now += 5.5
    harness.take(harness.scheduler.on_message([alive.identity, wire.head(wire.HEARTBEAT, {})],
                                              harness.now))
    harness.tick(0.5)
    assert silent.state == WorkerState.HUNG and alive.state == WorkerState.READY
    assert harness.of(Signal) == [Signal(silent.worker_id, signal.SIGABRT)]
    harness.exit(silent, -signal.SIGABRT)
    _, error = harness.answer_of(running)
    assert isinstance(error, wp.WorkerCrashed) and "silent" in str(error)
    assert harness.unanswered(waiting) and list(harness.scheduler.retries) == [waiting]


def test_start_failures_back_off_then_break_the_pool(pool):
    waiting = pool.submit()
    for worker in pool.workers():
        worker.credits = 0
    starts = len(pool.of(StartWorker))
    victim = pool.workers()[0]
    pool.exit(victim, -signal.SIGSEGV)  # a ready worker crashed: replaced at once
    assert len(pool.of(StartWorker)) == starts + 1
    for n in range(1, 3):
        starting = pool.workers(WorkerState.STARTING)[0]
        pool.scheduler.on_started(starting.worker_id, 2000 + n)
        pool.exit(starting, 70, report="ImportError: no module named model")
        delay = RESTART_BACKOFF_S[n - 1]
        before = len(pool.of(StartWorker))
        if delay:
            pool.tick(delay / 2)
            assert len(pool.of(StartWorker)) == before  # not yet
        pool.tick(delay / 2 + 0.001)
        assert len(pool.of(StartWorker)) == before + 1
    assert pool.scheduler.broken is None
    starting = pool.workers(WorkerState.STARTING)[0]
    pool.exit(starting, 70, report="ImportError: no module named model")
    assert isinstance(pool.scheduler.broken, wp.PoolBroken)
    assert "ImportError" in str(pool.scheduler.broken)
    _, error = pool.answer_of(waiting)
    assert error is pool.scheduler.broken
    late = pool.submit()
    assert pool.answer_of(late)[1] is pool.scheduler.broken


def test_a_worker_killed_from_outside_while_starting_does_not_count_toward_broken(pool):
    for _ in range(5):
        pool.exit(pool.workers()[0], -signal.SIGKILL)
        pool.tick(0.5)
        starting = pool.workers(WorkerState.STARTING)[0]
        pool.exit(starting, -signal.SIGKILL)
        pool.tick(0.5)
        pool.ready_all()
    assert pool.scheduler.broken is None


def test_a_failed_first_start_is_a_start_error():
    harness = Harness()
    harness.exit(harness.workers()[0], 70, report="SyntaxError in load()")
    assert isinstance(harness.scheduler.start_error, wp.PoolStartError)
    assert "SyntaxError" in str(harness.scheduler.start_error)
    assert harness.scheduler.finished()


def test_an_unreachable_worker_gives_its_requests_back_unsent(pool):
    request = pool.submit()
    (send,) = pool.of(Send, pool.tick())
    actions = pool.take(pool.scheduler.unreachable(send, pool.now))
    other = next(w for w in pool.workers() if w is not send.worker)
    assert pool.sent_to(other, actions) == [[request.id]]  # at once, to the other one
    assert request.attempts == 1 and not send.worker.inflight and send.worker.credits == 0


def test_retirement_after_its_share_then_stop_when_drained():
    harness = Harness(workers=1, max_requests_per_worker=2)
    harness.ready_all(credits=2)
    first = harness.workers()[0]
    a, b = harness.submit(), harness.submit()
    harness.tick()
    harness.tick()
    assert first.state == WorkerState.RETIRING and len(harness.of(StartWorker)) == 2
    c = harness.submit()
    assert harness.sent_to(first, harness.tick()) == []  # nothing more for it
    harness.reply(first, [a])
    assert harness.of(Stop) == []
    harness.reply(first, [b])
    assert harness.of(Stop) == [Stop(first)] and first.state == WorkerState.STOPPING
    harness.ready_all()
    assert [r.id for r in harness.of(Send, harness.tick())[0].requests] == [c.id]


def test_close_without_drain_fails_everything_and_kills_the_workers(pool):
    first, second = pool.submit(), pool.submit()
    pool.tick()
    waiting = pool.submit()  # no credit left: it stays queued
    pool.tick()
    pool.take(pool.scheduler.close(drain=False))
    for request in (first, second, waiting):
        assert isinstance(pool.answer_of(request)[1], wp.PoolClosed)
    assert {s.signum for s in pool.of(Signal)} == {signal.SIGKILL}
    assert pool.scheduler.finished()
    assert isinstance(pool.answer_of(pool.submit())[1], wp.PoolClosed)


def test_close_with_drain_finishes_accepted_work_first(pool):
    request = pool.submit()
    pool.tick()
    pool.take(pool.scheduler.close(drain=True))
    assert not pool.scheduler.finished()
    pool.reply(request.worker, [request])
    assert pool.scheduler.finished() and pool.answer_of(request) == (request.id, None)


def test_a_zygote_death_retries_its_workers_requests_once_a_new_zygote_starts(pool):
    running = pool.submit()
    pool.tick()
    running.worker.credits = 0
    queued = pool.submit()
    starts = len(pool.of(StartWorker))
    pool.take(pool.scheduler.on_zygote_died(pool.now))
    assert not pool.scheduler.workers and pool.scheduler.broken is None
    assert running.attempts == 0  # not its death: no attempt counted against it
    assert pool.unanswered(running) and pool.unanswered(queued)
    pool.tick(5.0)  # nothing is started on a zygote that is not there, not even later
    assert len(pool.of(StartWorker)) == starts
    pool.take(pool.scheduler.on_zygote_restarted(pool.now))
    assert len(pool.of(StartWorker)) == starts + 2  # a full set
    pool.ready_all()
    sent = pool.of(Send, pool.tick())
    assert sorted(r.id for s in sent for r in s.requests) == [running.id, queued.id]
    assert pool.scheduler.counters["zygote_restarts"] == 1
    assert pool.scheduler.counters["crashes"] == 0


def test_a_zygote_that_cannot_be_restarted_breaks_the_pool(pool):
    running = pool.submit()
    pool.tick()
    pool.take(pool.scheduler.on_zygote_died(pool.now))
    pool.take(pool.scheduler.on_zygote_lost("3 new ones failed to start"))
    _, error = pool.answer_of(running)
    assert isinstance(error, wp.PoolBroken) and "3 new ones failed" in str(error)
    assert isinstance(pool.answer_of(pool.submit())[1], wp.PoolBroken)
    pool.take(pool.scheduler.close(drain=True))
    assert pool.scheduler.finished()


def test_a_zygote_death_while_draining_retries_what_is_left_on_a_new_zygote(pool):
    # (a retiring version drains so after a hot swap: what it accepted is never failed)
    running = pool.submit()
    pool.tick()
    pool.take(pool.scheduler.close(drain=True))
    starts = len(pool.of(StartWorker))
    pool.take(pool.scheduler.on_zygote_died(pool.now))
    assert pool.scheduler.broken is None and pool.unanswered(running)
    assert pool.scheduler.may_start_workers()  # the dispatcher restarts the zygote
    pool.take(pool.scheduler.on_zygote_restarted(pool.now))
    assert len(pool.of(StartWorker)) == starts + 2
    pool.ready_all()
    (sent,) = pool.of(Send, pool.tick())
    pool.reply(sent.worker, [running])
    assert pool.answer_of(running) == (running.id, None)
    assert pool.scheduler.finished() and not pool.scheduler.may_start_workers()


def test_a_zygote_death_while_closing_with_nothing_left_just_finishes(pool):
    pool.take(pool.scheduler.close(drain=True))
    pool.take(pool.scheduler.on_zygote_died(pool.now))
    assert not pool.scheduler.may_start_workers() and pool.scheduler.finished()


def test_a_worker_death_while_draining_is_retried_on_a_replacement():
    pool = Harness(workers=1)
    pool.ready_all()
    first, second = pool.submit(), pool.submit()
    pool.tick()
    pool.take(pool.scheduler.close(drain=True))
    starts = len(pool.of(StartWorker))
    pool.exit(first.worker, -signal.SIGKILL)
    assert len(pool.of(StartWorker)) == starts + 1
    assert pool.unanswered(first) and pool.unanswered(second)
    pool.ready_all()
    (sent,) = pool.of(Send, pool.tick())
    assert [r.id for r in sent.requests] == [first.id]
    pool.reply(sent.worker, [first])
    (sent,) = pool.of(Send, pool.tick())
    pool.reply(sent.worker, [second])
    assert pool.answer_of(first) == (first.id, None)
    assert pool.answer_of(second) == (second.id, None) and pool.scheduler.finished()


@pytest.mark.parametrize("frames", [
    [],  # identity alone
    [b""],
    [wire.RESULT + b"\xc1"],
    [wire.head(wire.RESULT, {"ids": [1], "bodies": [None], "parts": [4]})],
], ids=["no head", "empty head", "not msgpack", "parts overrun"])
def test_malformed_messages_are_counted_never_raised(pool, frames):
    request = pool.submit()
    pool.tick()
    worker = request.worker
    pool.take(pool.scheduler.on_message([worker.identity, *frames], pool.now))
    assert pool.scheduler.counters["malformed_messages"] == 1


def test_a_message_from_a_stranger_is_dropped_unread(pool):
    actions = pool.scheduler.on_message([b"stranger", b"garbage"], pool.now)
    assert actions == [] and pool.scheduler.counters["late_replies"] == 1


def test_admission_is_asked_and_a_refused_peer_is_never_read():
    refused: list = []
    scheduler = Scheduler(PoolConfig(workers=1),
                          admit=lambda meta, frame: refused.append(meta["pid"]) and False)
    scheduler.start(0.0)
    (worker,) = scheduler.workers.values()
    scheduler.on_message([worker.identity, wire.head(
        wire.READY, {"pid": os.getpid(), "credits": 1, "secret": b"x"})], 0.0)
    assert refused == [os.getpid()] and not worker.admitted
    assert worker.state == WorkerState.STARTING
    assert scheduler.counters["rejected_peers"] == 1


def test_next_wake_is_the_earliest_timer_or_deadline(pool):
    liveness = pool.scheduler.timers[0][0]
    assert pool.scheduler.next_wake() == liveness
    for worker in pool.workers():
        worker.credits = 0
    request = pool.submit(timeout=0.01)
    assert pool.scheduler.next_wake() == request.deadline < liveness


# -- elastic workers ------------------------------------------------------------------------
def elastic(**config) -> Harness:
    config.setdefault("workers", 3)
    config.setdefault("min_workers", 0)
    config.setdefault("idle_timeout", 10.0)
    harness = Harness(**config)
    harness.ready_all()
    assert harness.scheduler.started
    return harness


def answer_everything(harness: Harness) -> None:
    """Reply to whatever each worker holds until nothing is held or waiting."""
    for _ in range(20):
        harness.tick()
        held = [w for w in harness.workers(WorkerState.READY) if w.inflight]
        if not held:
            return
        for worker in held:
            harness.reply(worker, list(worker.inflight.values()))


def test_an_elastic_pool_starts_min_workers_and_at_least_one():
    assert len(elastic().of(StartWorker)) == 1
    assert len(elastic(workers=4, min_workers=2).of(StartWorker)) == 2
    assert len(Harness(workers=3).of(StartWorker)) == 3  # fixed: all of them


def test_it_grows_toward_workers_while_requests_wait_and_no_further():
    harness = elastic()
    requests = [harness.submit() for _ in range(8)]
    harness.tick()
    starts = harness.of(StartWorker)
    assert len(starts) == 3  # the first, then two more for the backlog; never a fourth
    assert harness.scheduler.counters["scaled_up"] == 2
    harness.ready_all()
    answer_everything(harness)
    assert all(harness.answer_of(r)[1] is None for r in requests)
    assert len(harness.of(StartWorker)) == 3


def test_idle_workers_stop_after_idle_timeout_down_to_min_and_a_request_wakes_one():
    harness = elastic(min_workers=1)
    for _ in range(6):
        harness.submit()
    harness.tick()
    harness.ready_all()
    answer_everything(harness)
    assert len(harness.workers(WorkerState.READY)) == 3
    harness.tick(9.0)
    assert not harness.of(Stop)  # not idle long enough yet
    harness.tick(1.5)
    stopped = [a.worker for a in harness.of(Stop)]
    assert len(stopped) == 2 and harness.scheduler.counters["scaled_down"] == 2
    for worker in stopped:
        harness.exit(worker, 0)
    assert len(harness.of(StartWorker)) == 3  # a stopped worker is not replaced
    harness.tick(60)
    assert len(harness.of(Stop)) == 2  # min_workers stays

    zero = elastic()
    (only,) = zero.workers()
    zero.tick(11)
    assert [a.worker for a in zero.of(Stop)] == [only]
    zero.exit(only, 0)
    request = zero.submit()
    zero.tick()
    assert len(zero.of(StartWorker)) == 2  # the wake: a fork, nothing reloaded
    zero.ready_all()
    zero.tick()
    (woken,) = zero.workers(WorkerState.READY)
    assert zero.sent_to(woken) == [[request.id]]
    zero.reply(woken, [request])
    assert zero.answer_of(request)[1] is None


def test_light_traffic_keeps_one_worker_busy_so_the_others_can_go_idle():
    harness = elastic()
    for _ in range(6):  # a backlog: three workers
        harness.submit()
    harness.tick()
    harness.ready_all()
    answer_everything(harness)
    assert len(harness.workers(WorkerState.READY)) == 3
    used = set()
    for _ in range(20):  # then one request at a time, every second
        request = harness.submit()
        harness.tick(1.0)
        (worker,) = [w for w in harness.workers() if request.id in w.inflight]
        used.add(worker.worker_id)
        harness.reply(worker, [request])
    assert len(used) == 1
    assert len(harness.of(Stop)) == 2  # the two it left idle


def test_a_worker_that_dies_while_the_pool_grows_loses_nothing():
    harness = elastic()
    requests = [harness.submit() for _ in range(5)]
    harness.tick()
    (first,) = harness.workers(WorkerState.READY)
    held = list(first.inflight.values())
    assert held
    harness.exit(first, -signal.SIGKILL)  # while the new ones start
    harness.ready_all()
    answer_everything(harness)
    assert all(harness.answer_of(r)[1] is None for r in requests)
    assert len(harness.workers()) <= 3


def test_resize_starts_what_is_missing_and_stops_idle_workers_before_busy_ones():
    harness = Harness(workers=2)
    harness.ready_all()
    harness.take(harness.scheduler.resize(
        dataclasses.replace(harness.config, workers=4, min_workers=4), harness.now))
    assert len(harness.of(StartWorker)) == 4
    harness.ready_all()
    requests = [harness.submit(), harness.submit()]
    harness.tick()
    busy = [w for w in harness.workers() if w.inflight]
    assert len(busy) == 2
    harness.take(harness.scheduler.resize(
        dataclasses.replace(harness.config, workers=1, min_workers=1), harness.now))
    stopped = [a.worker for a in harness.of(Stop)]
    assert len(stopped) == 2 and not set(stopped) & set(busy)  # the idle ones first
    retiring = harness.workers(WorkerState.RETIRING)
    assert len(retiring) == 1  # busy: finishes what it holds, then goes
    for worker in busy:
        harness.reply(worker, list(worker.inflight.values()))
    assert retiring[0] in [a.worker for a in harness.of(Stop)]
    assert all(harness.answer_of(r)[1] is None for r in requests)
    assert len(harness.of(StartWorker)) == 4  # nothing replaced


# -- streams -----------------------------------------------------------------------------------
def test_a_stream_travels_alone_holds_its_worker_and_delivers_its_items_in_order(pool):
    for worker in pool.workers():
        worker.credits = 2
    stream = pool.submit_stream(credit=4)
    plain = pool.submit()
    actions = pool.tick()
    sends = pool.of(Send, actions)
    assert [s.requests for s in sends] == [[stream], [plain]]
    worker = stream.worker
    assert plain.worker is not worker and worker.credits == 0  # nothing queued behind it
    kind, meta = wire.read_head(sends[0].frames[1])
    assert kind == wire.TASK and meta["stream"] == 4
    pool.items(worker, stream, ["a", "b"])
    pool.items(worker, stream, ["c"])
    assert pool.streamed(stream) == ["a", "b", "c"] and stream.items == 3
    assert pool.unanswered(stream)
    pool.end(worker, stream, 3)
    assert pool.answer_of(stream) == (None, None)
    assert worker.credits == 2 and not worker.inflight


def test_credit_and_cancel_reach_the_worker_running_the_stream(pool):
    stream = pool.submit_stream()
    pool.tick()
    worker = stream.worker
    pool.take(pool.scheduler.stream_credit(stream, 8))
    assert stream.credit == 12
    pool.take(pool.scheduler.cancel_stream(stream))
    assert [(kind, meta) for kind, meta in pool.controls(worker)] == [
        (wire.MORE, {"id": stream.id, "n": 8}), (wire.CANCEL, {"id": stream.id})]
    stream.future.close()  # the consumer gave up: its sink is done
    pool.items(worker, stream, ["late"])
    assert pool.streamed(stream) == []  # dropped: nobody reads it
    pool.end(worker, stream, 1)
    assert pool.unanswered(stream) and not worker.inflight and worker.credits == 1


def test_credit_for_a_queued_stream_travels_with_its_task(pool):
    for worker in pool.workers():
        worker.credits = 0
    stream = pool.submit_stream(credit=4)
    pool.take(pool.scheduler.stream_credit(stream, 2))
    assert pool.of(Send) == []
    for worker in pool.workers():
        worker.credits = 1
    (send,) = pool.of(Send, pool.tick())
    assert wire.read_head(send.frames[1])[1]["stream"] == 6


def test_a_stream_cut_by_a_crash_after_items_fails_and_is_not_retried(pool):
    stream = pool.submit_stream()
    pool.tick()
    worker = stream.worker
    pool.items(worker, stream, ["a", "b"])
    pool.exit(worker, -signal.SIGKILL)
    _, error = pool.answer_of(stream)
    assert isinstance(error, wp.WorkerCrashed) and "after 2 items" in str(error)
    assert not pool.scheduler.retries


def test_a_stream_whose_worker_died_before_its_first_item_is_retried(pool):
    stream = pool.submit_stream()
    pool.tick()
    pool.exit(stream.worker, -signal.SIGKILL)
    assert pool.unanswered(stream) and list(pool.scheduler.retries) == [stream]


def test_a_stream_past_its_deadline_is_cancelled_then_its_worker_aborted_if_it_goes_on(pool):
    stream = pool.submit_stream(timeout=1.0)
    pool.tick()
    worker = stream.worker
    pool.items(worker, stream, ["a"])
    pool.tick(1.5)
    _, error = pool.answer_of(stream)
    assert isinstance(error, wp.TaskTimeout) and "1 items were sent" in str(error)
    assert [kind for kind, _ in pool.controls(worker)] == [wire.CANCEL]
    assert worker.state == WorkerState.READY  # told to stop; not aborted yet
    pool.tick(ABORT_GRACE_S + 0.01)  # still streaming after the grace: stuck in an item
    assert worker.state == WorkerState.ABORTED
    assert pool.of(Signal)[-1] == Signal(worker.worker_id, signal.SIGABRT)


def test_a_stream_that_stops_when_cancelled_for_its_deadline_keeps_its_worker(pool):
    stream = pool.submit_stream(timeout=1.0)
    pool.tick()
    worker = stream.worker
    pool.tick(1.5)
    pool.end(worker, stream, 0)
    pool.tick(ABORT_GRACE_S + 0.01)
    assert worker.state == WorkerState.READY and worker.credits == 1
    assert pool.of(Signal) == []
