"""A worker's stdout and stderr with each line written while it serves a server's request
prefixed by that request's id (X-Request-ID: request_ids.py), so predict's prints and log
records can be matched with the access log and the client's error.

    [request 4f1c2a9e0b7d-2a] what predict printed

The id comes in the TASK (``tags``); the runner sets it around each call (workers/runner.py).
Lines written outside a request are left as they are.
"""

from __future__ import annotations

import sys

current: str | None = None  # the request id of the call running now


class serving:
    """``with serving(tag):`` lines written meanwhile carry ``tag`` (None: none). A class,
    not a generator context: it is entered around every call a worker runs."""

    __slots__ = ("tag", "previous")

    def __init__(self, tag: str | None):
        self.tag = tag
        self.previous = None

    def __enter__(self) -> None:
        global current
        self.previous, current = current, self.tag

    def __exit__(self, *exc_info) -> None:
        global current
        current = self.previous


class TaggedStream:
    """``stream``, its lines prefixed while a request is served."""

    def __init__(self, stream):
        self._stream = stream
        self._line_start = True

    def write(self, text: str) -> int:
        tag = current
        if tag is None or not text:
            if text:
                self._line_start = text.endswith("\n")
            return self._stream.write(text)
        prefix = f"[request {tag}] "
        pieces = []
        for line in text.splitlines(keepends=True):
            if self._line_start:
                pieces.append(prefix)
            pieces.append(line)
            self._line_start = line.endswith("\n")
        self._stream.write("".join(pieces))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def install() -> None:
    """Tag this process's sys.stdout and sys.stderr (a worker, before it takes work)."""
    if not isinstance(sys.stdout, TaggedStream) and sys.stdout is not None:
        sys.stdout = TaggedStream(sys.stdout)
    if not isinstance(sys.stderr, TaggedStream) and sys.stderr is not None:
        sys.stderr = TaggedStream(sys.stderr)
