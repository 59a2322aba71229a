"""The batcher's decisions, with an injected clock: no sockets, no processes, no sleeps."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch

from workerpool.pool.batching import Batcher, batch_key_of

KEY = ("numpy", "float32", (4,))
OTHER = ("numpy", "float64", (4,))


@dataclasses.dataclass
class Item:
    name: str
    batch_key: tuple | None = KEY
    rows: int = 1
    enqueued_at: float = 0.0
    nbytes: int = 100


def queue(*items):
    return collections.deque(items)


def names(batch):
    return [item.name for item in batch]


def test_lone_request_is_dispatched_at_once_without_waiting():
    batcher = Batcher(max_rows=32, max_wait_s=0.0)
    q = queue(Item("a", enqueued_at=100.0))
    batch, wake_at = batcher.take(q, now=100.0)  # the same instant it was queued
    assert names(batch) == ["a"] and wake_at is None and not q


def test_queued_compatible_requests_form_one_batch_up_to_max_rows():
    batcher = Batcher(max_rows=8)
    q = queue(*[Item(str(i), rows=3) for i in range(4)])
    batch, _ = batcher.take(q, now=0.0)
    assert names(batch) == ["0", "1"]  # 6 rows; a third would make 9
    assert names(q) == ["2", "3"]


def test_incompatible_requests_keep_their_place():
    batcher = Batcher(max_rows=8)
    q = queue(Item("a"), Item("x", batch_key=OTHER), Item("b"), Item("n", batch_key=None),
              Item("c"))
    batch, _ = batcher.take(q, now=0.0)
    assert names(batch) == ["a", "b", "c"]
    assert names(q) == ["x", "n"]
    assert names(batcher.take(q, now=0.0)[0]) == ["x"]
    assert names(batcher.take(q, now=0.0)[0]) == ["n"]


def test_oversize_request_is_served_alone():
    batcher = Batcher(max_rows=4)
    q = queue(Item("big", rows=10), Item("small"))
    assert names(batcher.take(q, now=0.0)[0]) == ["big"]
    assert names(batcher.take(q, now=0.0)[0]) == ["small"]


def test_max_wait_holds_the_head_until_full_or_due():
    batcher = Batcher(max_rows=4, max_wait_s=0.010)
    q = queue(Item("a", enqueued_at=1.000))
    assert batcher.take(q, now=1.004) == ([], 1.010)  # waits for company
    q.append(Item("b", enqueued_at=1.005))
    assert batcher.take(q, now=1.006) == ([], 1.010)
    batch, _ = batcher.take(q, now=1.010)  # due: goes with what it has
    assert names(batch) == ["a", "b"]
    q.extend(Item(n, enqueued_at=2.0) for n in "cdef")
    assert names(batcher.take(q, now=2.0)[0]) == ["c", "d", "e", "f"]  # full: no wait


def test_unbatchable_head_never_waits():
    batcher = Batcher(max_rows=4, max_wait_s=10.0)
    q = queue(Item("n", batch_key=None))
    assert names(batcher.take(q, now=0.0)[0]) == ["n"]


def test_max_rows_one_means_no_batching():
    batcher = Batcher(max_rows=1, max_wait_s=1.0)
    q = queue(Item("a"), Item("b"))
    assert names(batcher.take(q, now=0.0)[0]) == ["a"]


def test_empty_queue():
    assert Batcher(max_rows=4).take(queue(), now=0.0) == ([], None)


@pytest.mark.parametrize("args, kwargs, expected", [
    ((np.zeros((3, 4), np.float32),), {}, (("numpy", "float32", (4,)), 3)),
    ((torch.zeros(5, 2, 2),), {}, (("torch", "torch.float32", (2, 2)), 5)),
    ((np.zeros(3),), {"k": 1}, (None, 1)),
    ((np.zeros(3), np.zeros(3)), {}, (None, 1)),
    ((np.float32(1.0),), {}, (None, 1)),
    ((np.zeros(()),), {}, (None, 1)),
    (([1, 2],), {}, (None, 1)),
])
def test_batch_key_of(args, kwargs, expected):
    assert batch_key_of(args, kwargs) == expected


def test_a_batch_never_exceeds_the_message_size_limit():
    # Two requests of 600 bytes each fit max_rows but not a 1000-byte message: the second
    # waits for the next batch instead of making a TASK the worker's socket would refuse.
    batcher = Batcher(max_rows=8, max_bytes=1000)
    q = queue(Item("a", nbytes=600), Item("b", nbytes=600), Item("c", nbytes=300))
    assert names(batcher.take(q, now=0.0)[0]) == ["a", "c"]
    assert names(batcher.take(q, now=0.0)[0]) == ["b"]


# -- chunks: calls that run alone, sent together under a backlog ------------------------------
def test_a_chunk_is_the_run_of_lone_requests_at_the_head():
    batcher = Batcher(max_rows=8)
    q = queue(Item("n1", batch_key=None), Item("n2", batch_key=None),
              Item("big", rows=8), Item("n3", batch_key=None), Item("a"))
    chunk, wake_at = batcher.take(q, now=0.0, chunk=16)
    assert names(chunk) == ["n1", "n2", "big", "n3"] and wake_at is None
    assert not batcher.together(chunk)  # run one by one, each answered alone
    assert names(q) == ["a"]


def test_a_chunk_never_takes_a_batchable_request_nor_more_than_asked():
    batcher = Batcher(max_rows=8)
    q = queue(*[Item(f"n{i}", batch_key=None) for i in range(5)], Item("a"))
    assert names(batcher.take(q, now=0.0, chunk=3)[0]) == ["n0", "n1", "n2"]
    assert names(batcher.take(q, now=0.0, chunk=3)[0]) == ["n3", "n4"]
    batch, _ = batcher.take(q, now=0.0, chunk=3)
    assert names(batch) == ["a"]


def test_without_batching_every_request_can_join_a_chunk():
    batcher = Batcher(max_rows=1)
    q = queue(Item("a"), Item("x", batch_key=OTHER), Item("n", batch_key=None))
    chunk, _ = batcher.take(q, now=0.0, chunk=16)
    assert names(chunk) == ["a", "x", "n"] and not batcher.together(chunk)


def test_chunk_one_is_the_plain_take_and_batches_stay_batches():
    batcher = Batcher(max_rows=8)
    q = queue(Item("n", batch_key=None), Item("m", batch_key=None), Item("a"), Item("b"))
    assert names(batcher.take(q, now=0.0)[0]) == ["n"]
    assert names(batcher.take(q, now=0.0)[0]) == ["m"]
    batch, _ = batcher.take(q, now=0.0, chunk=16)
    assert names(batch) == ["a", "b"] and batcher.together(batch)
