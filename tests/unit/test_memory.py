"""Memory rows of the pool's processes: the same fields for every row, so a page or a
metric reading them never fails on a worker that has no process yet."""

from __future__ import annotations

import os

from workerpool.pool.memory import process_memory


def test_a_worker_without_a_process_yet_has_every_field_at_zero():
    none_yet, ours = process_memory(None), process_memory(os.getpid())
    assert set(none_yet) == set(ours)
    assert none_yet["weights_mapped"] == none_yet["private"] == none_yet["pss"] == 0
    assert ours["pss"] > 0 and ours["private"] > 0
