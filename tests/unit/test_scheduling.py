"""The dispatcher's policies as pure decisions: worker slots built by hand, an explicit
``now``; no sockets, no processes, no sleeps."""

from __future__ import annotations

import pytest

from workerpool.pool.scheduling import (BOOT_FAILURES_BEFORE_BROKEN, CHUNK_BUDGET_S,
                                        MAX_ATTEMPTS, MAX_CHUNK, RESTART_BACKOFF_S, TRANSITIONS,
                                        AfterBootFailure, Fate, Overdue, Task, WorkerSlot,
                                        WorkerState, after_boot_failure, chunk_size, fate,
                                        overdue, pick_worker, still_running)


def slot(worker_id, state=WorkerState.READY, credits=2, last_sent=0.0, inflight=(),
         tasks=(), isolating=False, retire_after=None, sent=0):
    worker = WorkerSlot(worker_id, 0, now=0.0)
    worker.state, worker.credits, worker.last_sent = state, credits, last_sent
    worker.inflight = {i: object() for i in inflight}
    worker.tasks.extend(tasks)
    worker.isolating, worker.retire_after, worker.sent = isolating, retire_after, sent
    return worker


# -- states ---------------------------------------------------------------------------------
def test_worker_states_move_only_along_their_transitions():
    worker = WorkerSlot(1, 0)
    with pytest.raises(RuntimeError, match="no transition from starting to retiring"):
        worker.become(WorkerState.RETIRING)
    for state in (WorkerState.READY, WorkerState.RETIRING, WorkerState.HUNG,
                  WorkerState.STOPPING, WorkerState.STOPPING):  # the same state: no move
        worker.become(state)
    assert worker.state == "stopping" and str(worker.state) == "stopping"
    with pytest.raises(RuntimeError):
        worker.become(WorkerState.READY)
    # every state can stop; none comes back to starting
    assert all(WorkerState.STOPPING in TRANSITIONS[s] for s in WorkerState
               if s != WorkerState.STOPPING)
    assert not any(WorkerState.STARTING in targets for targets in TRANSITIONS.values())


# -- which worker takes work ----------------------------------------------------------------
def test_the_most_credit_wins_then_the_least_recently_used():
    a, b, c = slot(1, credits=1), slot(2, credits=2, last_sent=5.0), slot(3, credits=2,
                                                                          last_sent=3.0)
    assert pick_worker([a, b, c], idle=False) is c


@pytest.mark.parametrize("unfit", [
    dict(state=WorkerState.STARTING), dict(state=WorkerState.RETIRING),
    dict(state=WorkerState.HUNG), dict(state=WorkerState.STOPPING), dict(credits=0),
    dict(isolating=True),
], ids=["starting", "retiring", "hung", "stopping", "no credit", "isolating a retry"])
def test_only_ready_workers_with_credit_take_work(unfit):
    assert pick_worker([slot(1, **unfit)], idle=False) is None
    assert pick_worker([slot(1, **unfit), slot(2, credits=1)], idle=False).worker_id == 2


def test_a_retry_goes_only_to_a_worker_running_nothing():
    busy, idle = slot(1, credits=2, inflight=[7]), slot(2, credits=1)
    assert pick_worker([busy, idle], idle=True) is idle
    assert pick_worker([busy], idle=True) is None


# -- how many calls per TASK -----------------------------------------------------------------
def test_one_call_per_task_while_credit_covers_the_queue():
    workers = [slot(1), slot(2)]  # 4 credits
    assert chunk_size(workers, 4, workers[0]) == 1


def test_a_backlog_is_shared_out_over_the_credit_up_to_max_chunk():
    workers = [slot(1), slot(2)]
    assert chunk_size(workers, 10, workers[0]) == 3  # ceil(10 / 4)
    assert chunk_size(workers, 10_000, workers[0]) == MAX_CHUNK
    # credit of workers that cannot take work does not count
    workers.append(slot(3, state=WorkerState.STARTING, credits=2))
    assert chunk_size(workers, 10, workers[0]) == 3


def test_a_chunk_holds_at_most_the_budget_of_the_typical_call():
    workers = [slot(1), slot(2)]
    assert chunk_size(workers, 10_000, workers[0], call_s=1e-5) == MAX_CHUNK
    assert chunk_size(workers, 10_000, workers[0], call_s=CHUNK_BUDGET_S / 3.5) == 3
    assert chunk_size(workers, 10_000, workers[0], call_s=0.3) == 1
    assert chunk_size(workers, 10_000, workers[0], call_s=None) == MAX_CHUNK  # not timed yet


def test_a_chunk_never_takes_a_worker_past_its_share():
    worker = slot(1, retire_after=10, sent=8)
    assert chunk_size([worker], 1000, worker) == 2
    worker.sent = 10
    assert chunk_size([worker], 1000, worker) == 1  # (it retires on the send)


# -- what a dead worker's requests become -----------------------------------------------------
def test_requests_of_a_crashed_worker_are_retried_until_max_attempts():
    worker = slot(1, state=WorkerState.READY, tasks=[Task([1, 2], each=False)])
    assert fate(worker, 1, attempts=1) is Fate.RETRY
    assert fate(worker, 1, attempts=MAX_ATTEMPTS) is Fate.FAILED_CRASHES


def test_the_request_running_on_a_hung_worker_fails_the_others_are_retried():
    worker = slot(1, state=WorkerState.HUNG, tasks=[Task([1, 2, 3], each=True),
                                                   Task([4], each=False)])
    assert fate(worker, 1, attempts=1) is Fate.FAILED_HUNG
    assert [fate(worker, i, attempts=1) for i in (2, 3, 4)] == [Fate.RETRY] * 3


def test_a_hang_inside_a_coalesced_chunk_blames_nobody_yet():
    worker = slot(1, state=WorkerState.HUNG,
                  tasks=[Task([1, 2, 3], each=True, coalesced=True)])
    assert [fate(worker, i, attempts=1) for i in (1, 2, 3)] == [Fate.RETRY] * 3
    # retried alone, the one that hangs again is known
    alone = slot(2, state=WorkerState.HUNG, tasks=[Task([2], each=False)])
    assert fate(alone, 2, attempts=2) is Fate.FAILED_HUNG


def test_a_batch_running_on_a_hung_worker_fails_whole():
    worker = slot(1, state=WorkerState.HUNG, tasks=[Task([1, 2], each=False)])
    assert fate(worker, 1, 1) is fate(worker, 2, 1) is Fate.FAILED_HUNG


def test_a_worker_aborted_for_a_deadline_costs_its_other_requests_no_attempt():
    worker = slot(1, state=WorkerState.ABORTED, tasks=[Task([1], each=False)])
    assert fate(worker, 2, attempts=MAX_ATTEMPTS) is Fate.RETRY


# -- after a failed start ---------------------------------------------------------------------
def test_a_failed_start_while_the_pool_starts_is_a_start_error():
    assert after_boot_failure(False, False, 1, 1)[0] is AfterBootFailure.START_ERROR


def test_failed_starts_back_off_then_break_the_pool():
    delays = [after_boot_failure(True, False, n, n) for n in
              range(1, BOOT_FAILURES_BEFORE_BROKEN)]
    assert delays == [(AfterBootFailure.RESTART, RESTART_BACKOFF_S[n - 1])
                      for n in range(1, BOOT_FAILURES_BEFORE_BROKEN)]
    assert after_boot_failure(True, False, BOOT_FAILURES_BEFORE_BROKEN,
                              BOOT_FAILURES_BEFORE_BROKEN)[0] is AfterBootFailure.BROKEN


def test_workers_killed_from_outside_while_starting_back_off_but_never_break():
    # start_deaths grows, boot_failures (self-inflicted) does not
    for deaths in range(1, 10):
        then, delay = after_boot_failure(True, False, 0, deaths)
        assert then is AfterBootFailure.RESTART
        assert delay == RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1]


def test_no_replacement_while_closing():
    assert after_boot_failure(True, True, 1, 1)[0] is AfterBootFailure.NOTHING


# -- past a deadline --------------------------------------------------------------------------
def test_what_a_late_request_costs_depends_on_where_it_is():
    assert overdue(None, 1) is Overdue.UNSENT
    worker = slot(1, tasks=[Task([1, 2], each=True), Task([3], each=False)])
    assert overdue(worker, 1) is Overdue.RUNNING
    assert overdue(worker, 2) is Overdue.WAITING  # behind it in the chunk
    assert overdue(worker, 3) is Overdue.WAITING  # in the worker's next task
    batch = slot(2, tasks=[Task([4, 5], each=False)])
    assert overdue(batch, 5) is Overdue.RUNNING


def test_a_late_request_aborts_its_worker_only_once_its_call_has_run_its_timeout():
    worker = slot(1, tasks=[Task([1], each=False, started_at=10.0), Task([2], each=False)])
    assert overdue(worker, 1, now=10.4, timeout=1.0) is Overdue.STARTED_LATE  # it queued
    assert overdue(worker, 1, now=11.0, timeout=1.0) is Overdue.RUNNING
    assert overdue(worker, 2, now=11.0, timeout=1.0) is Overdue.WAITING
    assert still_running(worker, worker.tasks[0], 1)
    assert not still_running(worker, worker.tasks[1], 2)
