"""serve/relay.py's framing: messages of parts over a byte stream, however the stream cuts
them, and a real unix socket between two loops' protocols."""

from __future__ import annotations

import asyncio

import numpy as np

from workerpool.serve.relay import FramedStream, NO_ANSWER


class Sink:
    """A transport that keeps what is written (the other side's data_received input)."""

    def __init__(self):
        self.data = bytearray()

    def writelines(self, parts):
        for part in parts:
            self.data += memoryview(part).cast("B")


def encoded(messages) -> bytes:
    stream = FramedStream(on_message=None)
    stream.transport = Sink()
    for request_id, parts in messages:
        stream.send(request_id, parts)
    return bytes(stream.transport.data)


MESSAGES = [(1, [b"header", b"", b"x" * 1000]),
            (2**64 - 1, [b"only"]),
            (NO_ANSWER, [b"h", np.arange(6, dtype=np.float32)])]


def received(chunks) -> list:
    got = []
    stream = FramedStream(lambda s, request_id, parts: got.append(
        (request_id, [bytes(p) for p in parts])))
    for chunk in chunks:
        stream.data_received(chunk)
    return got


def expected() -> list:
    return [(i, [bytes(memoryview(p).cast("B")) for p in parts]) for i, parts in MESSAGES]


def test_messages_come_out_whole_from_one_chunk_and_byte_by_byte():
    data = encoded(MESSAGES)
    assert received([data]) == expected()
    assert received([data[i:i + 1] for i in range(len(data))]) == expected()
    # cut inside the lengths, inside a part, and between messages
    assert received([data[:5], data[5:13], data[13:40], data[40:]]) == expected()


def test_nothing_comes_out_of_a_message_cut_short():
    data = encoded(MESSAGES[:1])
    assert received([data[:-1]]) == []


def test_a_unix_socket_carries_messages_both_ways(tmp_path):
    path = str(tmp_path / "relay.sock")

    async def run():
        loop = asyncio.get_running_loop()
        answers = loop.create_future()
        got = []

        def echo(stream, request_id, parts):
            stream.send(request_id, [bytes(p)[::-1] for p in parts])

        def collect(stream, request_id, parts):
            got.append((request_id, [bytes(p) for p in parts]))
            if len(got) == 50:
                answers.set_result(None)

        server = await loop.create_unix_server(lambda: FramedStream(echo), path)
        _, client = await loop.create_unix_connection(lambda: FramedStream(collect), path)
        for i in range(1, 51):
            client.send(i, [b"abc" * i, bytes(range(i % 256))])
        await asyncio.wait_for(answers, 30)
        client.transport.close()
        server.close()
        return got

    got = asyncio.run(run())
    assert got == [(i, [(b"abc" * i)[::-1], bytes(range(i % 256))[::-1]])
                   for i in range(1, 51)]
