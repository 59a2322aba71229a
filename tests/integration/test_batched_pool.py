"""Dynamic batching, backpressure, deadlines and asyncio, with real worker processes."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest
import torch

import modelzoo
import workerpool as wp


def tagged(request_id: int, rows: int) -> np.ndarray:
    """Rows that say whose they are: [request id, row index, 1, 1]."""
    x = np.ones((rows, 4), dtype=np.float32)
    x[:, 0] = request_id
    x[:, 1] = np.arange(rows)
    return x


def slow_double(model, x):
    time.sleep(0.005)  # a worker busy long enough for requests to queue up behind it
    return x * 2


def test_concurrent_callers_are_batched_and_get_their_own_rows_back():
    callers, per_caller = 64, 5
    wrong = []
    with wp.Pool(modelzoo.numpy_model, slow_double, workers=2, max_batch_size=32) as pool:
        def caller(c):
            for k in range(per_caller):
                request_id = c * per_caller + k
                rows = 1 + request_id % 3
                y = pool.submit(tagged(request_id, rows)).result(timeout=120)
                if not np.array_equal(y, tagged(request_id, rows) * 2):
                    wrong.append(request_id)

        threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = pool.stats(memory_usage=False)
    assert not wrong
    calls = sum(stats["batch_size_histogram"].values())
    rows = sum(size * n for size, n in stats["batch_size_histogram"].items())
    assert rows == sum(1 + i % 3 for i in range(callers * per_caller))
    assert rows / calls == pytest.approx(stats["mean_batch_size"])
    assert stats["mean_batch_size"] > 4, stats["batch_size_histogram"]
    assert max(stats["batch_size_histogram"]) <= 32


def structured_output(model, x):
    return {"double": x * 2, "pair": (x[:, :1], torch.as_tensor(x).sum(dim=1))}


def test_dict_and_tuple_outputs_are_split_per_request():
    with wp.Pool(modelzoo.numpy_model, structured_output, workers=1, max_batch_size=64,
                 max_wait_ms=50) as pool:
        inputs = [tagged(i, 1 + i % 4) for i in range(12)]
        futures = [pool.submit(x) for x in inputs]
        results = [f.result(timeout=60) for f in futures]
        assert max(pool.stats(memory_usage=False)["batch_size_histogram"]) > 1
    for x, got in zip(inputs, results):
        assert np.array_equal(got["double"], x * 2)
        assert np.array_equal(got["pair"][0], x[:, :1])
        assert torch.equal(got["pair"][1], torch.as_tensor(x).sum(dim=1))


def test_incompatible_and_oversize_requests_are_served_separately():
    with wp.Pool(modelzoo.numpy_model, slow_double, workers=1, max_batch_size=8,
                 max_wait_ms=50) as pool:
        inputs = [tagged(1, 2), tagged(2, 2).astype(np.float64), tagged(3, 20),
                  tagged(4, 3), np.ones((2, 5), dtype=np.float32)]
        results = [f.result(timeout=60) for f in [pool.submit(x) for x in inputs]]
        histogram = pool.stats(memory_usage=False)["batch_size_histogram"]
    for x, y in zip(inputs, results):
        assert y.dtype == x.dtype and np.array_equal(y, x * 2)
    assert 20 in histogram  # the oversize request went alone
    assert max(size for size in histogram if size != 20) <= 8


def summarize(model, x):
    return float(x.sum())  # not batchable: one number per call


def test_unsplittable_output_is_a_clear_error_and_batched_false_serves_it():
    x = [tagged(i, 1) for i in range(16)]
    with wp.Pool(modelzoo.numpy_model, summarize, workers=1, max_batch_size=16,
                 max_wait_ms=100) as pool:
        futures = [pool.submit(v) for v in x]
        errors = [f.exception(timeout=60) for f in futures]
        assert any(isinstance(e, wp.BatchShapeError) for e in errors)
        assert "batched=False" in str(next(e for e in errors if e is not None))
    with wp.Pool(modelzoo.numpy_model, summarize, workers=1, max_batch_size=16,
                 max_wait_ms=100, batched=False) as pool:
        assert [f.result(timeout=60) for f in [pool.submit(v) for v in x]] == \
            [float(v.sum()) for v in x]


def gated(model, x, gate=None, log=None):
    if log:
        with open(log, "a") as f:
            f.write(f"{int(x[0, 0])}\n")
    while gate and not os.path.exists(gate):
        time.sleep(0.005)
    return x * 2


def wait_in_flight(pool, n, timeout=30):
    deadline = time.monotonic() + timeout
    while sum(w["in_flight"] for w in pool.stats(memory_usage=False)["workers"]) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_queue_full_past_max_queue_and_every_accepted_request_completes(tmp_path):
    gate = str(tmp_path / "open")
    with wp.Pool(modelzoo.numpy_model, gated, workers=1, max_queue=5) as pool:
        busy = [pool.submit(tagged(i, 1), gate=gate) for i in range(2)]  # both credits
        wait_in_flight(pool, 2)
        queued = [pool.submit(tagged(10 + i, 1), gate=gate) for i in range(5)]
        with pytest.raises(wp.QueueFull, match="max_queue"):
            pool.submit(tagged(99, 1), gate=gate)
        assert pool.stats(memory_usage=False)["queued"] == 5
        open(gate, "w").close()
        for i, f in enumerate(busy + queued):
            assert f.result(timeout=60)[0, 0] == 2 * (i if i < 2 else 10 + i - 2)
        # map keeps its own bounded window and never meets QueueFull
        assert len(list(pool.map((tagged(i, 1) for i in range(50)), window=20))) == 50


def test_queued_request_past_its_deadline_is_never_sent(tmp_path):
    gate, log = str(tmp_path / "open"), str(tmp_path / "seen")
    with wp.Pool(modelzoo.numpy_model, gated, workers=1) as pool:
        busy = [pool.submit(tagged(i, 1), gate=gate, log=log) for i in range(2)]
        wait_in_flight(pool, 2)
        late = pool.submit(tagged(7, 1), gate=gate, log=log, timeout=0.2)
        with pytest.raises(wp.TaskTimeout, match="never sent"):
            late.result(timeout=30)
        open(gate, "w").close()
        assert [f.result(timeout=60)[0, 0] for f in busy] == [0, 2]
        assert pool.submit(tagged(8, 1), gate=gate, log=log).result(timeout=60)[0, 0] == 16
    with open(log) as f:
        assert "7" not in f.read().split()  # the model never saw it


def sleepy(model, x, seconds=0.0):
    time.sleep(seconds)
    return x * 2


def test_running_request_past_its_deadline_fails_and_its_worker_is_replaced():
    with wp.Pool(modelzoo.numpy_model, sleepy, workers=1, timeout=60) as pool:
        before = pool.pids
        with pytest.raises(wp.TaskTimeout, match="ran past"):
            pool.submit(tagged(1, 1), seconds=30, timeout=0.3).result(timeout=30)
        assert pool.submit(tagged(2, 1)).result(timeout=60)[0, 0] == 4  # default timeout
        stats = pool.stats(memory_usage=False)
        assert stats["aborted"] == 1 and stats["timeouts"] == 1
        assert pool.pids != before


def test_asyncio_api_answers_on_the_event_loop_without_a_thread_per_request():
    async def main(pool):
        threads_before = threading.active_count()
        results = await asyncio.gather(*[pool.submit_async(tagged(i, 1)) for i in range(100)])
        assert threading.active_count() == threads_before
        streamed = [y async for y in pool.map_async(tagged(i, 2) for i in range(30))]

        async def agen():
            for i in range(5):
                yield tagged(i, 1)

        from_async = [y async for y in pool.map_async(agen())]
        return results, streamed, from_async

    with wp.Pool(modelzoo.numpy_model, slow_double, workers=2, max_batch_size=8) as pool:
        results, streamed, from_async = asyncio.run(main(pool))
    assert all(np.array_equal(y, tagged(i, 1) * 2) for i, y in enumerate(results))
    assert all(np.array_equal(y, tagged(i, 2) * 2) for i, y in enumerate(streamed))
    assert all(np.array_equal(y, tagged(i, 1) * 2) for i, y in enumerate(from_async))


def test_an_asyncio_caller_that_gives_up_frees_its_place_in_the_queue_never_a_worker(tmp_path):
    """submit_async answers on the loop (pool/loop_answer.py) with a Future's rules: a task
    cancelled while its request is queued takes it out (the model never sees it); one
    cancelled while its request runs lets it finish there, the answer dropped, the worker
    kept."""
    gate, log = str(tmp_path / "open"), str(tmp_path / "seen")

    async def main(pool):
        running = [asyncio.ensure_future(pool.submit_async(tagged(i, 1), gate=gate, log=log))
                   for i in range(2)]  # both credits of the one worker
        try:
            await asyncio.to_thread(wait_in_flight, pool, 2)
            queued = asyncio.ensure_future(pool.submit_async(tagged(7, 1), gate=gate, log=log))
            await asyncio.sleep(0.1)  # submitted: it waits for a credit
            assert pool.stats(memory_usage=False)["queued"] == 1
            queued.cancel()
            running[1].cancel()
            await asyncio.sleep(0.1)
        finally:
            open(gate, "w").close()  # (a failed check must not leave close() waiting)
        first = await running[0]
        after = await pool.submit_async(tagged(8, 1))
        return first, after, queued.cancelled(), running[1].cancelled()

    with wp.Pool(modelzoo.numpy_model, gated, workers=1) as pool:
        before = pool.pids
        first, after, queued_cancelled, running_cancelled = asyncio.run(main(pool))
        stats = pool.stats(memory_usage=False)
        assert pool.pids == before
    assert first[0, 0] == 0 and after[0, 0] == 16
    assert queued_cancelled and running_cancelled
    assert stats["crashes"] == 0 and stats["aborted"] == 0 and stats["queued"] == 0
    with open(log) as f:
        seen = f.read().split()
    assert "7" not in seen and "1" in seen


def test_stats_report_queue_and_compute_percentiles():
    with wp.Pool(modelzoo.numpy_model, slow_double, workers=2, max_batch_size=4) as pool:
        list(pool.map(tagged(i, 1) for i in range(40)))
        stats = pool.stats(memory_usage=False)
    assert stats["compute_ms"]["p50"] >= 5.0  # the model sleeps 5 ms per call
    assert stats["compute_ms"]["p99"] >= stats["compute_ms"]["p50"]
    assert stats["queue_ms"]["p99"] >= stats["queue_ms"]["p50"] >= 0
    assert sum(size * n for size, n in stats["batch_size_histogram"].items()) == 40


def test_light_sequential_traffic_keeps_every_worker_warm():
    with wp.Pool(modelzoo.numpy_model, slow_double, workers=2) as pool:
        for i in range(10):
            pool.submit(tagged(i, 1)).result(timeout=60)
        served = [w["requests_served"] for w in pool.stats(memory_usage=False)["workers"]]
    assert served == [5, 5]
