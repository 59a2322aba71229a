"""serve/http/cork.py: a connection's writes of one loop pass leave as one write, in order;
close() writes what is held first, abort() drops it."""

from __future__ import annotations

import asyncio

from workerpool.serve.http.cork import CorkedTransport


class Recording(asyncio.Transport):
    """A transport that keeps what it was asked to write (each call apart)."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, chunks) -> None:
        self.writes.append([chunk if isinstance(chunk, bytes) else chunk.obj
                            for chunk in chunks])

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 8000) if name == "sockname" else default


def test_a_pass_of_writes_is_one_write_and_the_next_pass_another():
    async def main():
        raw = Recording()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        corked.write(b"{}")
        held = corked.get_write_buffer_size()
        assert raw.writes == []  # nothing sent within the pass
        await asyncio.sleep(0)
        corked.writelines([b"a", b"b"])
        await asyncio.sleep(0)
        return raw, held, corked.get_extra_info("sockname")

    raw, held, sockname = asyncio.run(main())
    assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"ab"]
    assert held == len(raw.writes[0])
    assert sockname == ("127.0.0.1", 8000)  # the rest is the transport's own


def test_large_parts_are_written_together_without_being_joined():
    """A binary tensor's view goes to the transport as it is, beside the head (one
    vectored write), never copied into one bytes object."""
    import numpy as np

    tensor = np.ones(1 << 20, np.float32)

    async def main():
        raw = Recording()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"head")
        corked.write(memoryview(tensor).cast("B"))
        await asyncio.sleep(0)
        return raw

    raw = asyncio.run(main())
    assert len(raw.writes) == 1 and raw.writes[0][0] == b"head"
    assert raw.writes[0][1] is tensor  # the array itself: no copy was made


def test_close_writes_what_is_held_and_abort_drops_it():
    async def main():
        closed, aborted = Recording(), Recording()
        loop = asyncio.get_running_loop()
        first, second = CorkedTransport(closed, loop), CorkedTransport(aborted, loop)
        first.write(b"last words")
        first.close()
        second.write(b"never sent")
        second.abort()
        await asyncio.sleep(0)  # the flushes queued by the writes find nothing held
        return closed, aborted

    closed, aborted = asyncio.run(main())
    assert closed.writes == [b"last words"] and closed.closed
    assert aborted.writes == [] and aborted.aborted
