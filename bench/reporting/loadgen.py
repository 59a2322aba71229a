"""The report's load generator, one for every contender: asyncio clients on aiohttp, each
sending the same fixed POST again and again, each reading the whole answer.

It runs in its own process (so its CPU is not the harness's) and prints one JSON object.
Each answer goes through the contender's ``parse`` (its peer.py), which gives the pid of
the worker that ran it, so the modes can say which workers served:

- ``spread``: ``--clients`` clients until each of ``--workers`` distinct pids has answered
  ``--per-worker`` times (or ``--max-requests`` were sent);
- ``load``: ``--clients`` clients for ``--seconds`` (after ``--warmup-seconds``), longer
  until ``--min-samples`` answers were measured (a p99 of fewer is a guess) or
  ``--max-seconds`` passed: requests/s, latency p50/p99, errors, samples;
- ``restart``: ``--clients`` clients; after ``--seconds`` of load, SIGKILL the worker that
  answered last; a probe on a fresh connection every 50 ms until a pid never seen before
  answers it (the replacement is serving) or ``--recover-timeout`` passes: seconds to
  that answer, and the load's requests that failed from the kill on.

With ``--reference-json`` every answer is checked against the model run in-process (its
head values, as peer.parse gives them): answers that differ count as ``wrong``. With
``--targets-json`` (a list of {"model", "inputs", "reference"}) each client calls the
contender's several models in turn, each answer checked against its own model's.

    python -m reporting.loadgen --peer bench/peers/litserve --port 18200 \
        --inputs-json DIR/input.json --mode load --clients 32 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import sys
import time

import aiohttp

REQUEST_TIMEOUT = 120.0
TOLERANCE = 1e-4  # |answer - in-process| allowed (one torch thread each side: ~1e-7 seen)


def load_peer(folder: str):
    """A contender's peer.py; it may import peer_model (standard library at import time)."""
    peers = os.path.dirname(os.path.abspath(folder.rstrip("/")))
    if peers not in sys.path:
        sys.path.append(peers)
    spec = importlib.util.spec_from_file_location(
        f"peer_{os.path.basename(folder.rstrip('/'))}", os.path.join(folder, "peer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Client:
    """One keep-alive session posting the contender's request; records every outcome.

    ``targets``: (model, inputs, reference) of each model called, in turn (round robin);
    model None: the contender's one model."""

    def __init__(self, peer, port: int, targets: list[tuple]):
        self.targets = []  # (url, body, headers, reference)
        for model, inputs, reference in targets:
            path, body, headers = peer.request(inputs, model=model)
            self.targets.append((f"http://127.0.0.1:{port}{path}", body, dict(headers),
                                 reference))
        self.turn = 0
        self.parse = peer.parse
        self.outcomes: list[tuple[float, float, bool, int | None]] = []  # end, secs, ok, pid
        self.failures: dict[str, int] = {}  # HTTP status or exception type -> count
        self.checked = self.wrong = 0  # answers compared with the reference; those that differ
        self.batched_rows = self.answered = 0  # for the mean rows per forward pass
        self.max_abs_diff = 0.0
        self.counted_from: float | None = None  # answers ending from then on are counted
        self.counted = 0

    @property
    def checking(self) -> bool:
        return any(target[3] is not None for target in self.targets)

    async def post(self, session: aiohttp.ClientSession, record: bool = True
                   ) -> tuple[bool, int | None]:
        url, data, headers, reference = self.targets[self.turn % len(self.targets)]
        self.turn += 1
        started = time.perf_counter()
        ok, pid, failure = False, None, None
        try:
            async with session.post(url, data=data, headers=headers) as r:
                body = await r.read()
                if r.status == 200:
                    answer = self.parse(r.status, body)
                    ok, pid = True, int(answer["pid"])
                    self.check(answer["y"], reference)
                    self.answered += 1
                    self.batched_rows += int(answer.get("batch", 1))
                else:
                    failure = str(r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as error:
            failure = type(error).__name__
        ended = time.perf_counter()
        if record:
            self.outcomes.append((ended, ended - started, ok, pid))
            if failure:
                self.failures[failure] = self.failures.get(failure, 0) + 1
            if ok and self.counted_from is not None and ended >= self.counted_from:
                self.counted += 1
        return ok, pid

    def check(self, values: list, reference: list | None) -> None:
        if reference is None:
            return
        diff = max((abs(a - b) for a, b in zip(values, reference)), default=float("inf"))
        if len(values) < len(reference):
            diff = float("inf")  # a short answer is a wrong one
        self.checked += 1
        self.wrong += diff > TOLERANCE
        self.max_abs_diff = max(self.max_abs_diff, diff)

    def answers(self) -> dict:
        """What the check of every answer found (None: no reference given)."""
        # mean_batch: the rows of the forward pass that made each answer, as the model
        # says (peer_model.predict_batch); 1 for a server that does not batch
        batch = self.batched_rows / self.answered if self.answered else None
        if not self.checking:
            return {"checked": None, "wrong": None, "max_abs_diff": None, "mean_batch": batch}
        return {"checked": self.checked, "wrong": self.wrong,
                "max_abs_diff": self.max_abs_diff, "mean_batch": batch}


async def drive(client: Client, clients: int, keep_going, fresh: bool = False) -> None:
    """``clients`` concurrent loops posting while ``keep_going()``; ``fresh``: a new
    connection for every request."""
    connector = aiohttp.TCPConnector(limit=clients, force_close=fresh)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def loop():
            while keep_going():
                ok, _ = await client.post(session)
                if not ok:
                    await asyncio.sleep(0.01)  # a refused connection must not spin
        await asyncio.gather(*[loop() for _ in range(clients)])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def spread(client: Client, args) -> dict:
    counts: dict[int, int] = {}
    tally = {"read": 0, "failed": 0}

    def keep_going():
        for _, _, ok, pid in client.outcomes[tally["read"]:]:
            if ok:
                counts[pid] = counts.get(pid, 0) + 1
            else:
                tally["failed"] += 1
        tally["read"] = len(client.outcomes)
        busiest = sorted(counts.values(), reverse=True)[:args.workers]
        enough = len(busiest) >= args.workers and min(busiest) >= args.per_worker
        return not enough and tally["read"] < args.max_requests
    # Fresh connections, so that servers whose workers share accept() (gunicorn) spread
    # them; kept-alive ones would stay with whichever worker accepted them first.
    await drive(client, args.clients, keep_going, fresh=True)
    keep_going()
    return {"requests": len(client.outcomes), "failed": tally["failed"],
            "pids": {str(pid): n for pid, n in sorted(counts.items())}, **client.answers()}


async def load(client: Client, args) -> dict:
    start = time.perf_counter()
    measured_from = start + args.warmup_seconds
    until = measured_from + args.seconds
    cap = measured_from + max(args.seconds, args.max_seconds)
    client.counted_from = measured_from
    ended = {}

    def keep_going() -> bool:
        now = time.perf_counter()
        going = now < until or (now < cap and client.counted < args.min_samples)
        if not going:
            ended.setdefault("at", now)
        return going
    await drive(client, args.clients, keep_going)
    stop = ended.get("at", time.perf_counter())
    window = [o for o in client.outcomes if measured_from <= o[0] <= stop]
    ok = [secs for _, secs, good, _ in window if good]
    seconds = stop - measured_from
    return {"clients": args.clients, "seconds": seconds, "requests": len(window),
            "failed": len(window) - len(ok), "rps": len(ok) / seconds, "samples": len(ok),
            "p50_ms": _ms(percentile(ok, 50)), "p99_ms": _ms(percentile(ok, 99)),
            "pids": len({o[3] for o in window if o[2]}), "failures": client.failures,
            **client.answers()}


async def restart(client: Client, args) -> dict:
    state: dict = {"killed": None, "killed_at": None, "recovered_at": None}

    async def kill_then_probe():
        await asyncio.sleep(args.seconds)
        # a slow model behind the load phase's backlog (BERT in batches of 8) may not have
        # answered yet, and the worker to kill is one that answered
        waited = time.perf_counter() + args.recover_timeout
        while not any(o[2] for o in client.outcomes):
            if time.perf_counter() > waited:
                raise RuntimeError(f"no answer in {args.seconds + args.recover_timeout:.0f} "
                                   "s of load: no worker to kill")
            await asyncio.sleep(0.1)
        state["seen"] = {o[3] for o in client.outcomes if o[2]}
        state["killed"] = next(o[3] for o in reversed(client.outcomes) if o[2])
        state["killed_at"] = time.perf_counter()
        os.kill(state["killed"], signal.SIGKILL)
        # A fresh connection for every probe: the load's keep-alive connections stay with
        # the workers that accepted them, so a new worker of an accept()-sharing server
        # (gunicorn) would never see them.
        connector = aiohttp.TCPConnector(force_close=True)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while time.perf_counter() < state["killed_at"] + args.recover_timeout:
                ok, pid = await client.post(session, record=False)
                if ok and pid not in state["seen"]:
                    state["recovered_at"] = time.perf_counter()
                    return
                await asyncio.sleep(0.05)

    def keep_going():
        if state["recovered_at"] is not None:
            return time.perf_counter() < state["recovered_at"] + 1.0  # a second after it
        return state["killed_at"] is None or \
            time.perf_counter() < state["killed_at"] + args.recover_timeout
    await asyncio.gather(drive(client, args.clients, keep_going), kill_then_probe())
    after = [o for o in client.outcomes if o[0] >= state["killed_at"]]
    recovered = state["recovered_at"]
    return {"killed_pid": state["killed"],
            "recover_s": None if recovered is None else recovered - state["killed_at"],
            "failed": sum(1 for o in after if not o[2]), "after_kill": len(after),
            "failures": client.failures, "recover_timeout": args.recover_timeout,
            **client.answers()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, help="the contender's folder (peer.py)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--inputs-json", help="a file holding the payload")
    parser.add_argument("--targets-json",
                        help="instead: several models called in turn, a file holding "
                             '[{"model": NAME, "inputs": [...], "reference": [...]}, ...]')
    parser.add_argument("--mode", choices=["spread", "load", "restart"], required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--per-worker", type=int, default=100)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=1.0)
    parser.add_argument("--min-samples", type=int, default=0,
                        help="load: go on past --seconds until this many answers")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="load: but never longer than this")
    parser.add_argument("--reference-json",
                        help="the in-process model's answer: every answer is checked")
    parser.add_argument("--recover-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.targets_json:
        with open(args.targets_json) as file:
            targets = [(t["model"], t["inputs"], t.get("reference")) for t in json.load(file)]
    elif args.inputs_json:
        with open(args.inputs_json) as file:
            inputs = json.load(file)
        reference = None
        if args.reference_json:
            with open(args.reference_json) as file:
                reference = json.load(file)
        targets = [(None, inputs, reference)]
    else:
        parser.error("give --inputs-json or --targets-json")
    client = Client(load_peer(args.peer), args.port, targets)
    mode = {"spread": spread, "load": load, "restart": restart}[args.mode]
    json.dump(asyncio.run(mode(client, args)), sys.stdout)


if __name__ == "__main__":
    main()
