"""What workers write to stderr, relayed by the zygote: each line prefixed with the worker
it came from, and the frameworks' INFO chatter left out unless the user chose a log level.

    worker fd 2 ──pipe (one per worker)──> zygote's select loop ──"[worker 3 pid 812] line"──> zygote's fd 2
                                                                    (the pool process's stderr)

Writes to fd 2 are caught whoever makes them: Python's ``print(file=sys.stderr)``, C++
logging, a crashing library. The zygote's own start-up output (importing TensorFlow
prints before its log level applies) is held back in a file and replayed the same way.

Quiet mode is on unless ``TF_CPP_MIN_LOG_LEVEL`` is set in the pool's environment (the
user's own choice is then left alone): TensorFlow's C++ logging gets level 1 (warnings
and errors still show), and the INFO lines printed before that level applies, LiteRT's
"INFO: ..." lines and absl's pre-initialisation notice are dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

QUIET_ENV = "WORKERPOOL_QUIET_FRAMEWORKS"

_FRAMEWORK_INFO = re.compile(
    rb"^(I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "  # absl / glog INFO (TensorFlow)
    rb"|INFO: "  # LiteRT / TFLite
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR$)")
_MAX_LINE = 64 * 1024  # a line longer than this is passed on in pieces


def quiet_environment(environ: dict) -> dict:
    """Variables for a zygote's environment: quiet mode unless the user set a TF level."""
    if "TF_CPP_MIN_LOG_LEVEL" in environ:
        return {}
    return {"TF_CPP_MIN_LOG_LEVEL": "1", QUIET_ENV: "1"}


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def keep(line: bytes, quiet: bool) -> bool:
    return not (quiet and _FRAMEWORK_INFO.match(line))


def write_out(data: bytes, fd: int = 2) -> None:
    """Write all of ``data`` to ``fd``; a closed or broken stderr drops it."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return


class Relay:
    """The read ends of the workers' stderr pipes, for the zygote's select loop."""

    def __init__(self, quiet: bool, out_fd: int = 2):
        self.quiet = quiet
        self.out_fd = out_fd
        # read fd -> (prefix, partial line, [at end of file])
        self._pipes: dict[int, tuple[bytes, bytearray, list]] = {}

    def fds(self) -> list[int]:
        """The pipes worth watching (not those at end of file, closed only by ``finish``:
        a closed number could be reused by the next worker's pipe)."""
        return [fd for fd, (_, _, ended) in self._pipes.items() if not ended[0]]

    def open(self) -> tuple[int, int]:
        """A new pipe (read end, write end); the write end becomes a worker's fd 2."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        return read_fd, write_fd

    def watch(self, read_fd: int, prefix: str) -> None:
        self._pipes[read_fd] = (prefix.encode(), bytearray(), [False])

    def read(self, read_fd: int) -> None:
        """Relay the whole lines there are now."""
        prefix, partial, ended = self._pipes[read_fd]
        while True:
            try:
                data = os.read(read_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                ended[0] = True
                return
            partial += data
            self._emit(prefix, partial, final=False)

    def finish(self, read_fd: int) -> None:
        """The worker is gone: relay what is left (what is readable now), its last partial
        line included, and close the pipe."""
        if read_fd not in self._pipes:
            return
        prefix, partial, _ = self._pipes.pop(read_fd)
        try:
            while data := os.read(read_fd, 65536):
                partial += data
        except OSError:
            pass  # nothing more now (a grandchild may still hold the pipe): not waited for
        os.close(read_fd)
        self._emit(prefix, partial, final=True)

    def close_all(self) -> None:
        for read_fd in list(self._pipes):
            self.finish(read_fd)

    def close_in_child(self) -> None:
        """In a freshly forked worker: the other workers' pipes are not its to read."""
        for read_fd in self._pipes:
            os.close(read_fd)
        self._pipes.clear()

    def _emit(self, prefix: bytes, partial: bytearray, final: bool) -> None:
        out = bytearray()
        while True:
            end = partial.find(b"\n")
            if end < 0:
                if final and partial:
                    end = len(partial)
                elif len(partial) >= _MAX_LINE:
                    end = _MAX_LINE
                else:
                    break
            line = bytes(partial[:end])
            del partial[:end + 1]
            if keep(line, self.quiet):
                out += prefix + line + b"\n"
        if out:
            write_out(bytes(out), self.out_fd)


@contextlib.contextmanager
def held_back_when_quiet(prefix: str):
    """What fd 2 gets in the block held back and replayed filtered (HeldBack), in quiet
    mode; untouched otherwise."""
    held = HeldBack(prefix) if is_quiet() else None
    try:
        yield
    finally:
        if held is not None:
            held.release()


class HeldBack:
    """In quiet mode, the zygote's own fd 2 held in a file while it starts (imports,
    attaching), then replayed filtered: nothing can block on a pipe nobody reads yet."""

    def __init__(self, prefix: str):
        self.prefix = prefix.encode()
        self.saved = os.dup(2)
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 2)

    def release(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        lines = self.file.read().splitlines()
        self.file.close()
        out = b"".join(self.prefix + line + b"\n" for line in lines if keep(line, quiet=True))
        if out:
            write_out(out)
