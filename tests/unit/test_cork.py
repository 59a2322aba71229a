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


def test_flush_writes_what_is_held_at_once():
    async def main():
        raw = Recording()
        corked = CorkedTransport(raw, asyncio.get_running_loop())
        corked.write(b"head")
        corked.write(b"body")
        corked.flush()
        sent_at_once = list(raw.writes)
        await asyncio.sleep(0)  # the flush the first write queued finds nothing held
        return sent_at_once, raw

    sent_at_once, raw = asyncio.run(main())
    assert sent_at_once == [b"headbody"] and raw.writes == [b"headbody"]


def test_a_whole_response_leaves_before_the_step_that_sent_it_ends():
    """Through uvicorn and the guarded protocol (guard.py), on a real socket: a response
    is written as uvicorn completes it, head and body together, not when the loop's pass
    ends. The app blocks the loop after sending its answer until the client says it has
    it: held to the pass's end, the answer could not arrive, and the wait would time out."""
    import socket
    import threading

    import uvicorn

    from workerpool.serve.http.guard import HeadLimits, protocol_class

    client_has_it = threading.Event()
    waited: list[bool] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        waited.append(client_has_it.wait(10))  # (blocks the loop, as a long step would)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        config = uvicorn.Config(app, http=protocol_class("httptools", HeadLimits()),
                                loop="asyncio", lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
        thread.start()
        try:
            while not server.started:
                thread.join(0.01)
                assert thread.is_alive()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while not answer.endswith(b"ok"):
                    chunk = client.recv(4096)
                    assert chunk, answer
                    answer += chunk
                client_has_it.set()
        finally:
            server.should_exit = True
            thread.join(30)
    assert answer.startswith(b"HTTP/1.1 200")
    assert waited == [True]
