"""What a worker answers to one TASK: the Runner alone, with an injected clock (each call's
duration is what the test says), messages as frame lists. No sockets, no processes."""

from __future__ import annotations

import numpy as np

from workerpool.errors import MessageTooLarge
from workerpool.ipc import wire
from workerpool.ipc.codec import Codec
from workerpool.workers.runner import FLUSH_AFTER_S, SLOW_CALL_S, Runner

CODEC = Codec(allow_pickle=True, max_message_bytes=1 << 20)


class Clock:
    """Advances only when a call says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_runner(max_message_bytes=1 << 20):
    clock = Clock()

    def predict(model, x, seconds=0.0, fail=False, size=0):
        clock.now += seconds
        if fail:
            raise ValueError(f"bad {x}")
        return np.zeros(size, np.uint8) if size else x * 10

    codec = Codec(allow_pickle=True, max_message_bytes=max_message_bytes)
    return Runner({}, predict, codec, clock=clock)


def task(calls: list[dict], each=True, coalesce=True) -> tuple[dict, list]:
    items = [CODEC.encode_call((call.pop("x"),), call) for call in calls]
    message = wire.task(list(range(len(items))), items, each, coalesce)
    frames = [bytes(memoryview(f).cast("B")) for f in message]
    return wire.read_head(frames[0])[1], frames[1:]


def replies(runner, calls, **kinds) -> list[tuple[bytes, list]]:
    """(kind, [(id, value or exception)]) per message sent."""
    out = []
    for message in runner.run(*task(calls, **kinds)):
        frames = [bytes(memoryview(f).cast("B")) for f in message]
        kind, meta = wire.read_head(frames[0])
        if kind == wire.RESULT:
            values = [CODEC.decode(*item) for item in wire.split_items(meta, frames[1:])]
            out.append((kind, list(zip(meta["ids"], values))))
        else:
            out.append((kind, [(i, wire.rebuild_exception(meta)) for i in meta["ids"]]))
    return out


def ids(reply):
    return [i for i, _ in reply[1]]


def test_fast_calls_of_a_chunk_are_answered_in_one_message():
    got = replies(make_runner(), [{"x": i} for i in range(16)])
    assert len(got) == 1 and got[0][0] == wire.RESULT
    assert got[0][1] == [(i, i * 10) for i in range(16)]


def test_without_coalesce_each_call_is_answered_alone():
    got = replies(make_runner(), [{"x": i} for i in range(4)], coalesce=False)
    assert [ids(r) for r in got] == [[0], [1], [2], [3]]


def test_a_slow_call_is_answered_at_once_with_what_was_held():
    slow = SLOW_CALL_S * 5
    got = replies(make_runner(), [{"x": 0}, {"x": 1, "seconds": slow}, {"x": 2}, {"x": 3}])
    assert [ids(r) for r in got] == [[0, 1], [2, 3]]


def test_answers_wait_for_company_at_most_flush_after():
    step = SLOW_CALL_S / 2  # fast calls, but enough of them to pass FLUSH_AFTER_S
    n = int(FLUSH_AFTER_S / step) * 3
    got = replies(make_runner(), [{"x": i, "seconds": step} for i in range(n)])
    assert sorted(i for r in got for i in ids(r)) == list(range(n))
    assert len(got) >= 3
    # an answer is held from the end of its call until its message goes
    assert all((len(r[1]) - 1) * step <= FLUSH_AFTER_S + step for r in got)


def test_an_error_is_its_own_answer_and_the_rest_go_on():
    got = replies(make_runner(), [{"x": 0}, {"x": 1, "fail": True}, {"x": 2}, {"x": 3}])
    assert [(r[0], ids(r)) for r in got] == [(wire.RESULT, [0]), (wire.ERROR, [1]),
                                             (wire.RESULT, [2, 3])]
    error = got[1][1][0][1]
    assert isinstance(error, ValueError) and str(error) == "bad 1"


def test_held_answers_never_exceed_the_size_limit_together():
    limit = 64 * 1024
    got = replies(make_runner(max_message_bytes=limit),
                  [{"x": i, "size": limit // 3} for i in range(6)])
    assert [ids(r) for r in got] == [[0, 1], [2, 3], [4, 5]]


def test_one_answer_over_the_limit_is_message_too_large():
    limit = 64 * 1024
    got = replies(make_runner(max_message_bytes=limit), [{"x": 0, "size": limit + 1},
                                                         {"x": 1}])
    assert got[0][0] == wire.ERROR and isinstance(got[0][1][0][1], MessageTooLarge)
    assert got[1] == (wire.RESULT, [(1, 10)])


def test_a_batch_is_one_predict_and_one_answer():
    calls = []

    def predict(model, x):
        calls.append(len(x))
        return x * 2

    runner = Runner({}, predict, CODEC)
    inputs = [np.arange(3, dtype=np.float32), np.arange(2, dtype=np.float32)]
    got = replies(runner, [{"x": x} for x in inputs], each=False, coalesce=False)
    assert calls == [5] and len(got) == 1
    assert [np.array_equal(v, x * 2) for (_, v), x in zip(got[0][1], inputs)] == [True, True]
