"""The weights exist once: workers map the same read-only pages, and adding workers adds
only their small private overhead."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import modelzoo
from testkit import segment_ranges
import workerpool as wp

MIB = modelzoo.MIB
MODEL_MIB = 64


def warm_up(pool, n_workers):
    """Run requests until every worker has served at least one (all weights touched)."""
    x = torch.randn(4, 1024)
    for _ in range(50):
        list(pool.map([x] * (4 * n_workers)))
        stats = pool.stats()
        if all(w["requests_served"] > 0 for w in stats["workers"]):
            return stats
    pytest.fail(f"not every worker served a request: {stats['workers']}")


def test_four_workers_cost_little_more_than_one():
    totals = {}
    for n_workers in (1, 4):
        with wp.Pool(modelzoo.mlp_64mib, modelzoo.torch_predict, workers=n_workers) as pool:
            stats = warm_up(pool, n_workers)
            totals[n_workers] = stats["total_pss"]
            assert stats["model_bytes"] >= MODEL_MIB * MIB
            for worker in stats["workers"]:
                # every worker has the whole model resident, and not one page copied
                assert worker["weights_rss"] >= stats["model_bytes"] * 0.95
                assert worker["weights_copied"] == 0
                if n_workers == 4:  # the pages are counted shared among the workers
                    assert worker["weights_pss"] <= worker["weights_rss"] / 3
    added = totals[4] - totals[1]
    # Copies would add >= 3 x 64 MiB; three extra workers must add less than 3 x 40 MiB.
    assert added < 3 * 40 * MIB, f"4 workers cost {added / MIB:.0f} MiB more than 1"


def test_an_idle_worker_gives_back_the_heap_its_requests_freed():
    """A worker keeps its model, not its last request's garbage: glibc would hold on to the
    freed blocks under a live one for good; the worker trims them once idle."""
    def uss_once_idle(pool, at_most=None):
        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.3)
            uss = pool.stats()["workers"][0]["uss"]
            if at_most is None or uss <= at_most or time.monotonic() > deadline:
                return uss

    with wp.Pool(modelzoo.numpy_model, modelzoo.heap_churn, workers=1) as pool:
        assert pool.submit(1).result() == 15
        before = uss_once_idle(pool)
        assert pool.submit(96).result() == 16 * 96 - 1  # 96 MiB allocated, then freed
        after = uss_once_idle(pool, at_most=before + 16 * MIB)
    assert after <= before + 16 * MIB, \
        f"an idle worker still holds {(after - before) / MIB:.0f} MiB of freed heap"


def test_a_busy_worker_reuses_its_freed_heap_instead_of_faulting_it_in_again():
    """Between requests a worker keeps what it freed (it gives it back once idle, above):
    answering 1 MiB arrays one after another, each message's buffer once went back to the
    OS and the next was faulted in again, ~36-120 page faults a request."""
    def minor_faults(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[7])

    x = np.ones(MIB // 4, np.float32)
    with wp.Pool(modelzoo.numpy_model, modelzoo.echo, workers=1) as pool:
        for _ in range(20):
            pool.submit(x).result()
        pid = pool.stats()["workers"][0]["pid"]
        before = minor_faults(pid)
        for _ in range(100):
            assert np.array_equal(pool.submit(x).result(), x)
        per_request = (minor_faults(pid) - before) / 100
    assert per_request < 8, f"{per_request:.1f} page faults per 1 MiB request"


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
def test_workers_map_the_segment_read_only_and_shared(start_method):
    with wp.Pool(modelzoo.mlp_64mib, modelzoo.torch_predict, workers=2,
                 start_method=start_method) as pool:
        stats = warm_up(pool, 2)
        for worker in stats["workers"]:
            mappings = worker["weights_mappings"]
            assert mappings, "the worker has no mapping of the weight segment"
            for mapping in mappings:
                assert mapping["perms"].startswith("r-"), mapping  # no write permission
                assert mapping["perms"][3] == "s", mapping  # shared, not a private copy
            assert worker["weights_copied"] == 0
            assert worker["weights_rss"] >= stats["model_bytes"] * 0.95
            assert worker["weights_pss"] <= worker["weights_rss"] * 0.6  # shared by two


def test_zygote_is_single_threaded():
    with wp.Pool(modelzoo.mlp, modelzoo.torch_predict, workers=1) as pool:
        assert pool.stats()["zygote"]["threads_at_boot"] == 1


def test_parent_model_is_repointed_at_the_segment():
    net = modelzoo.mlp_of_size(8)
    x = torch.randn(2, 1024)
    with modelzoo.torch_threads(1), torch.inference_mode():
        before = net(x)
    with wp.Pool(lambda: net, modelzoo.torch_predict, workers=1, threads_per_worker=1) as pool:
        ranges = segment_ranges()
        for parameter in net.parameters():
            pointer = parameter.data_ptr()
            assert any(lo <= pointer < hi for lo, hi in ranges), "parameter still private"
        with modelzoo.torch_threads(1), torch.inference_mode():
            assert torch.equal(net(x), before)
        assert torch.equal(pool.submit(x).result(timeout=60), before)


def test_one_reading_of_many_pools_reads_each_process_once():
    """A server's scrape passes one memo to every pool's stats(): the parent (every pool's)
    is read once, each pool's own processes once, and every pool still gets its rows."""
    first = wp.Pool(modelzoo.numpy_model, modelzoo.numpy_predict, workers=1)
    second = wp.Pool(modelzoo.numpy_model, modelzoo.numpy_predict, workers=2)
    try:
        memo: dict = {}
        a, b = first.stats(memory_memo=memo), second.stats(memory_memo=memo)
        assert a["parent"] == b["parent"] and a["parent"]["pss"] > 0
        own = [a["zygote"]["pid"], b["zygote"]["pid"],
               *(w["pid"] for w in a["workers"] + b["workers"])]
        assert sorted(pid for pid, _ in memo) == sorted([a["parent"]["pid"], *own])
        for stats in (a, b):
            assert all(w["pss"] > 0 and w["uss"] > 0 for w in stats["workers"])
            assert stats["total_pss"] == sum(
                row["pss"] for row in (stats["parent"], stats["zygote"], *stats["workers"]))
    finally:
        first.close()
        second.close()
