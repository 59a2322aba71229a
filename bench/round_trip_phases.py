"""Where a sequential ``submit(x).result()`` spends its time: the caller's phases, timed by
probes wrapped around the dispatcher's own methods, beside a raw pyzmq round trip of the
same message in the same run (bench/overhead.py's row 1 and its baseline), that raw round
trip again waiting in a zmq.Poller, as a driving caller waits, and its send alone.

A no-op model, 2 workers. Each call in which the caller drove the pool itself (it sent its
request and polled for its answer: pool/driven_future.py) is split into:

    to_send          submit() until the TASK's send starts: encode, Request, the scheduler
    send             the TASK's send (ZeroMQ)
    after_send       the send until submit() returns (the baton given back)
    to_wait          submit() returned until the caller polls for its answer
    wait             looking for the answer (spin_wait_ms), then polling, until it is
                     in: ZeroMQ both ways and the worker's part
    read_answer      the answer in until its Future is settled: recv, head, scheduler, decode
    to_result        the Future settled until result() returns (the baton given back)

and, inside ``wait``, the worker's own timing of decoding the call and running predict
(``pool.stats()``'s compute p50).

The other calls (the answer read by the pool's thread, or within submit) are counted apart.
Each phase is its mean over the driven calls whose total lies in the middle 80% (so the
phases add up to the total), medians of ``--rounds`` rounds. The probes cost a
few microseconds each, so the phases' total may exceed the p50 of an unprobed call, given
beside them. Prints JSON and writes bench/results/round_trip_phases.md.

    .venv/bin/python bench/round_trip_phases.py [--rounds 3] [--calls 3000]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import ZmqEcho, emit, log, markdown_table, p50_us

WORKERS = 2
PHASES = ("to_send", "send", "after_send", "to_wait", "wait", "read_answer", "to_result")


def load():
    return {}


def echo(model, x):
    return x


class Probes:
    """perf_counter stamps taken by wrappers of the dispatcher's methods, the first of
    each kind per call (a call may poll more than once)."""

    def __init__(self):
        from workerpool.pool import dispatcher

        self.stamps: dict[str, float] = {}
        self.saved = {}
        self._wrap(dispatcher.wire, "send", "send0", "send1")
        self._wrap(dispatcher, "settle", "settled", None)
        self._wrap(dispatcher.Dispatcher, "_poll_for_caller", "poll0", "poll1")

    def _stamp(self, name: str | None) -> None:
        if name is not None and name not in self.stamps:
            self.stamps[name] = time.perf_counter()

    def _wrap(self, owner, name: str, before: str, after: str | None) -> None:
        """``owner.name`` (a module's function, or a class's method: its instance comes
        in ``args``) stamped ``before`` it runs and ``after`` it returns."""
        original = getattr(owner, name)
        self.saved[(owner, name)] = original

        def probed(*args, **kwargs):
            self._stamp(before)
            try:
                return original(*args, **kwargs)
            finally:
                self._stamp(after)
        setattr(owner, name, probed)

    def remove(self) -> None:
        for (owner, name), original in self.saved.items():
            setattr(owner, name, original)

    def call(self, pool) -> dict | None:
        """One probed call: its phases in seconds, or None when the caller did not drive
        it (no poll of its own)."""
        self.stamps.clear()
        start = time.perf_counter()
        future = pool.submit(1.0)
        returned = time.perf_counter()
        future.result()
        end = time.perf_counter()
        s = self.stamps
        if not {"send0", "send1", "poll0", "poll1", "settled"} <= s.keys() or \
                not start < s["send0"] < returned < s["poll0"] <= s["poll1"] <= s["settled"]:
            return None
        return {"to_send": s["send0"] - start, "send": s["send1"] - s["send0"],
                "after_send": returned - s["send1"], "to_wait": s["poll0"] - returned,
                "wait": s["poll1"] - s["poll0"], "read_answer": s["settled"] - s["poll1"],
                "to_result": end - s["settled"], "total": end - start}


def polled_round_trip(raw: ZmqEcho, poller, frames: list) -> list:
    """The raw round trip, waiting as a driving caller does: zmq.Poller, then a recv that
    does not block."""
    import zmq

    raw.router.send_multipart([raw.identity, *frames], copy=False)
    while not poller.poll(1000):
        pass
    return raw.router.recv_multipart(zmq.NOBLOCK, copy=False)[1:]


def middle(rows: list, key=None) -> list:
    """The middle 80% of ``rows`` by ``key``: means over them add up, as medians would not
    (the wait's is bimodal: an answer may be in before the poll starts), and a stall
    (a page fault, the other core's work) does not weigh on them."""
    ordered = sorted(rows, key=key)
    return ordered[len(ordered) // 10: len(ordered) - len(ordered) // 10]


def raw_send_us(raw: ZmqEcho, frames: list, calls: int) -> float:
    """The raw round trip's send alone (its answer read untimed), as the phases are
    taken: the mean over the middle 80% of the calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        raw.router.send_multipart([raw.identity, *frames], copy=False)
        times.append(time.perf_counter() - start)
        raw.router.recv_multipart(copy=False)
    return statistics.fmean(middle(times)) * 1e6


def one_round(pool, raw: ZmqEcho, calls: int) -> dict:
    import zmq

    header, _ = pool._codec.encode_call((1.0,), {})
    poller = zmq.Poller()
    poller.register(raw.router, zmq.POLLIN)
    out = {"unprobed_us": p50_us(lambda: pool.submit(1.0).result(), calls),
           "raw_us": p50_us(lambda: raw.round_trip([header]), calls),
           "raw_polled_us": p50_us(lambda: polled_round_trip(raw, poller, [header]), calls),
           "raw_send_us": raw_send_us(raw, [header], calls)}
    probes = Probes()
    try:
        split = [probes.call(pool) for _ in range(calls)]
    finally:
        probes.remove()
    driven = [row for row in split if row is not None]
    out["driven_share"] = len(driven) / calls
    # the worker's own timing of decode + predict (the reservoir's latest calls: these)
    out["worker_compute_us"] = pool.stats()["compute_ms"]["p50"] * 1000
    typical = middle(driven, key=lambda row: row["total"])
    for key in (*PHASES, "total"):
        out[f"{key}_us"] = statistics.fmean(row[key] for row in typical) * 1e6
    return out


def main() -> None:
    import workerpool as wp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    rounds = []
    with wp.Pool(load, echo, workers=WORKERS) as pool:
        raw = ZmqEcho()
        try:
            for _ in range(500):  # warm: both workers served, the caller's poller built
                pool.submit(1.0).result()
                raw.round_trip([b"warm"])
            for number in range(args.rounds):
                rounds.append(one_round(pool, raw, args.calls))
                log(f"round {number + 1}: {rounds[-1]}")
        finally:
            raw.close()
    medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    raw_us = medians["raw_us"]
    named = [("submit(1.0).result(), no probes", "unprobed"),
             ("raw pyzmq round trip (baseline)", "raw"),
             ("raw round trip, waiting in zmq.Poller", "raw_polled"),
             ("its send alone", "raw_send"),
             *((phase, phase) for phase in (*PHASES, "total", "worker_compute"))]
    rows = [{"what": what, "us": round(medians[f"{key}_us"], 1),
             "x_raw_round_trip": round(medians[f"{key}_us"] / raw_us, 2)}
            for what, key in named]
    markdown = "\n\n".join([
        f"# Where a sequential round trip goes: a no-op model, {WORKERS} workers, medians of "
        f"{args.rounds} rounds",
        f"`bench/round_trip_phases.py --rounds {args.rounds} --calls {args.calls}`. The "
        f"round trips: p50 of each. The phases (to_send ... to_result, adding up to total) "
        f"and the raw send alone: means over the middle 80% of the calls (for the phases, "
        f"of those the caller drove itself: {medians['driven_share']:.0%}); the probes add "
        f"a few us each. "
        f"worker_compute: the worker's own timing of decode + predict, inside wait.",
        markdown_table(rows, ["what", "us", "x_raw_round_trip"])])
    emit({"rows": rows, "rounds": rounds}, "round_trip_phases", markdown)


if __name__ == "__main__":
    main()
