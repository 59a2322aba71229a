"""A connection's writes of one event-loop pass (or of one response) sent as one: uvicorn
writes a response's head on ``http.response.start`` and its body on ``http.response.body``,
and uvloop sends each write at once when nothing is buffered, so every answer cost two
send() calls (and two TCP segments for the client to read). On loopback a send runs the
receiver's side of TCP too: the two were ~17% of the server process's CPU under a light
model's load (py-spy).

    write(a); write(b)      (same loop pass)   ──> one send(a + b) when the pass ends,
                                               or at flush(): guard.py flushes as uvicorn
                                               completes a request served alone (the pass's
                                               end came ~35 us after a sequential light
                                               answer, bench/serve_phases.py --inline)
    write(head); write(256 MiB view)           ──> writelines: sent together, not joined
    close()                                    ──> what is held is written first
    abort()                                    ──> dropped, as the transport drops its buffer

Everything else is the transport's own (flow control, extra info, set_protocol).
"""

from __future__ import annotations

import asyncio


WRITE_PARTS_FROM = 64 * 1024


class CorkedTransport:
    """``transport``, its writes joined until ``loop`` runs its next callbacks."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self.is_closing = transport.is_closing  # (asked per response: no __getattr__ call)

    def write(self, data) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Write what is held now (a response that is whole need not wait for the pass's
        end: guard.py calls this as uvicorn completes one)."""
        held = self._held
        if not held:
            return
        if not self._transport.is_closing():
            if len(held) == 1:
                self._transport.write(held[0])
            elif sum(map(len, held)) < WRITE_PARTS_FROM:
                self._transport.write(b"".join(held))
            else:  # large parts (binary tensors) are not copied to be joined
                self._transport.writelines(list(held))
        held.clear()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self._held)) + self._transport.get_write_buffer_size()

    def __getattr__(self, name):
        return getattr(self._transport, name)
