"""The report's restart phase kills a worker that answered, even when nothing has answered
by the time the load phase ends (BERT in batches of 8 behind a backlog: the harness once
raised StopIteration there), and says so plainly when nothing answers at all.

The server is a small real HTTP server in this test's loop, answering with the pid of a real
child process it stands for, as the contenders' peers do."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from aiohttp import web

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from reporting import loadgen  # noqa: E402

PEER = pathlib.Path(__file__).resolve().parents[2] / "bench" / "peers" / "gunicorn"


@pytest.fixture
def workers():
    """Two sleeping processes: the worker serving before the kill, and its replacement."""
    started = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
               for _ in range(2)]
    yield started
    for process in started:
        process.kill()
        process.wait()


def args(seconds: float, recover_timeout: float) -> argparse.Namespace:
    return argparse.Namespace(seconds=seconds, recover_timeout=recover_timeout, clients=2)


async def serve_then_restart(first_answer_after: float, workers, options):
    """A server whose first answers come ``first_answer_after`` s after it starts, from the
    first worker while that one lives, then from the second; the restart phase against it."""
    ready_at = time.perf_counter() + first_answer_after
    old, new = workers

    async def predict(request):
        await request.read()
        await asyncio.sleep(max(0.0, ready_at - time.perf_counter()))
        pid = old.pid if old.poll() is None else new.pid
        return web.json_response({"pid": pid, "y": [0.0]})

    app = web.Application()
    app.router.add_post("/predict", predict)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = loadgen.Client(loadgen.load_peer(str(PEER)), port, [(None, [[0.0]], None)])
        return await loadgen.restart(client, options)
    finally:
        await runner.cleanup()


def test_the_kill_waits_for_a_first_answer(workers):
    # nothing answers until 0.8 s, the load phase ends at 0.2 s
    result = asyncio.run(serve_then_restart(0.8, workers, args(0.2, 10.0)))
    old, _ = workers
    assert result["killed_pid"] == old.pid
    assert old.wait(timeout=5) == -signal.SIGKILL
    assert result["recover_s"] is not None and result["recover_s"] < 10.0, result


def test_no_answer_at_all_is_an_error_that_says_so(workers):
    with pytest.raises(RuntimeError, match="no worker to kill"):
        asyncio.run(serve_then_restart(3.0, workers, args(0.1, 0.5)))
    assert all(process.poll() is None for process in workers)  # nothing was killed
