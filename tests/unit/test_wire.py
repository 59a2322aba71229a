"""The link's message layout, both ends: what one side packs, the other splits back exactly;
what does not add up is ProtocolError, never an IndexError. No sockets: messages are frame
lists, as a peer would receive them (bytes)."""

from __future__ import annotations

import pickle

import msgpack
import numpy as np
import pytest

from workerpool.errors import ProtocolError, RemoteError, RemoteTraceback
from workerpool.ipc import wire
from workerpool.ipc.codec import Codec

CODEC = Codec(allow_pickle=True, max_message_bytes=1 << 26)


def received(message: list) -> list:
    """The frames as the other end holds them: independent bytes."""
    return [bytes(memoryview(f).cast("B")) for f in message]


def unpack_task(message: list):
    frames = received(message)
    kind, meta = wire.read_head(frames[0])
    return kind, meta, wire.split_items(meta, frames[1:])


def test_a_scalar_call_is_one_frame():
    message = wire.task([7], [CODEC.encode(((1.0,), {}))], each=False)
    assert len(message) == 1  # with the ROUTER's identity: two sends
    kind, meta, items = unpack_task(message)
    assert kind == wire.TASK and meta["ids"] == [7] and meta["each"] is False
    assert CODEC.decode(*items[0]) == ((1.0,), {})


def test_mixed_items_split_back_exactly():
    values = [
        1.0,
        np.arange(10, dtype=np.float32),  # inline in its body
        np.arange(100_000, dtype=np.float64),  # a frame of its own
        "x" * (wire.INLINE_BODY_LIMIT + 1),  # a body too large to inline: a frame
        {"a": np.ones((3, 4000), np.int16), "b": (np.zeros(2, np.uint8), "s")},
    ]
    items = [CODEC.encode(v) for v in values]
    message = wire.task(list(range(len(values))), items, each=True)
    kind, meta, split = unpack_task(message)
    assert meta["bodies"][3] is None and all(b is not None for i, b in
                                             enumerate(meta["bodies"]) if i != 3)
    assert len(split) == len(values)
    for (body, frames), want in zip(split, values):
        got = CODEC.decode(body, frames)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        elif isinstance(want, dict):
            assert np.array_equal(got["a"], want["a"]) and got["b"][1] == "s"
        else:
            assert got == want


def test_results_carry_compute_time():
    message = wire.result([1, 2], [CODEC.encode(3), CODEC.encode("four")], 0.25)
    kind, meta, items = unpack_task(message)
    assert kind == wire.RESULT and meta["compute_s"] == 0.25
    assert [CODEC.decode(*item) for item in items] == [3, "four"]


def meta_of(**fields):
    return {"ids": [1], **fields}


@pytest.mark.parametrize("meta, n_frames", [
    (meta_of(bodies=[b""], parts=[1]), 0),  # overruns
    (meta_of(bodies=[None], parts=[2]), 1),  # overruns with the body as a frame
    (meta_of(bodies=[None], parts=[1]), 0),  # the body's frame missing: none at all
    (meta_of(bodies=[b""], parts=[0]), 2),  # frames left over
    (meta_of(bodies=[None], parts=[0]), 0),  # a body said to be a frame, and no frame
    (meta_of(bodies=[b"", b""], parts=[0, 0]), 0),  # more items than ids
    (meta_of(parts=[0]), 0),  # no bodies
    (meta_of(bodies=[b""]), 0),  # no parts
    (meta_of(bodies=["text"], parts=[0]), 0),  # a body that is not bytes
    (meta_of(bodies=[b""], parts=[-1]), 0),
    (meta_of(bodies=[b""], parts=[True]), 0),
    ({"bodies": [b""], "parts": [0]}, 0),  # no ids
], ids=["overrun", "overrun framed body", "no frame at all", "left over", "missing body frame", "items > ids",
        "no bodies", "no parts", "str body", "negative", "bool parts", "no ids"])
def test_items_that_do_not_add_up_are_protocol_errors(meta, n_frames):
    with pytest.raises(ProtocolError):
        wire.split_items(meta, [b"\0"] * n_frames)


@pytest.mark.parametrize("head", [b"", b"T\xc1", b"T" + msgpack.packb([1]), b"T\x92"],
                         ids=["empty", "not msgpack", "not a map", "truncated"])
def test_unreadable_heads_are_protocol_errors(head):
    with pytest.raises(ProtocolError):
        wire.read_head(head)


# -- errors ----------------------------------------------------------------------------------
def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001
        return caught


def rebuilt(exc: BaseException, max_bytes: int = 1 << 20) -> Exception:
    [head] = wire.error([1, 2], raised(exc), max_bytes)
    kind, meta = wire.read_head(head)
    assert kind == wire.ERROR and meta["ids"] == [1, 2]
    wire.check_error(meta)
    return wire.rebuild_exception(meta)


def test_exceptions_come_back_by_value_with_the_remote_traceback():
    error = rebuilt(KeyError("missing"))
    assert type(error) is KeyError and error.args == ("missing",)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "KeyError: 'missing'" in str(error.__cause__)


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no")


@pytest.mark.parametrize("exc, remote_type", [
    (SystemExit(3), "builtins.SystemExit"),
    (KeyboardInterrupt(), "builtins.KeyboardInterrupt"),
    (Unpicklable("odd"), f"{__name__}.Unpicklable"),
], ids=["SystemExit", "KeyboardInterrupt", "unpicklable"])
def test_what_cannot_travel_by_value_arrives_as_remote_error(exc, remote_type):
    error = rebuilt(exc)
    assert isinstance(error, RemoteError) and error.remote_type == remote_type


def test_a_huge_error_is_cut_to_fit_the_link():
    max_bytes = 1 << 16
    [head] = wire.error([1], raised(ValueError("x" * 10 * max_bytes)), max_bytes)
    assert len(head) < max_bytes
    error = wire.rebuild_exception(wire.read_head(head)[1])
    assert type(error) is ValueError and "more characters cut" in str(error)


def test_a_pickled_error_is_only_what_the_worker_pickled():
    meta = {"ids": [1], "type": "x.Y", "message": "m", "traceback": "",
            "pickled": pickle.dumps(SystemExit(1))}
    assert isinstance(wire.rebuild_exception(meta), RemoteError)
