"""The zygote's relay of worker stderr, on real pipes: whole lines, each prefixed; the
frameworks' INFO chatter left out only in quiet mode; nothing lost at a worker's end."""

from __future__ import annotations

import fcntl
import os

import pytest

from workerpool.workers.output import Relay, keep, quiet_environment

TF_INFO = (b"I0000 00:00:1796131631.590720   15221 port.cc:153] oneDNN custom operations "
           b"are on.")
ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are " \
              b"written to STDERR"
LITERT_INFO = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@pytest.fixture
def relay():
    """(relay writing to a pipe we read, a worker's write end, the read end it watches,
    a function returning what came out so far)."""
    out_read, out_write = os.pipe()
    os.set_blocking(out_read, False)
    relay = Relay(quiet=True, out_fd=out_write)
    read_fd, write_fd = relay.open()
    relay.watch(read_fd, "[worker 3 pid 77] ")
    for fd in (out_write, write_fd):  # room for the long-line test without a reader
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    seen = bytearray()

    def output() -> bytes:
        try:
            while data := os.read(out_read, 65536):
                seen.extend(data)
        except BlockingIOError:
            pass
        return bytes(seen)

    yield relay, write_fd, read_fd, output
    relay.close_all()
    for fd in (out_read, out_write):
        os.close(fd)
    try:
        os.close(write_fd)
    except OSError:
        pass


def test_whole_lines_are_relayed_with_the_worker_prefix(relay):
    relay, write_fd, read_fd, output = relay
    os.write(write_fd, b"first\nsecond half")
    relay.read(read_fd)
    assert output() == b"[worker 3 pid 77] first\n"  # the partial line waits for its end
    os.write(write_fd, b"way\n")
    relay.read(read_fd)
    assert output() == b"[worker 3 pid 77] first\n[worker 3 pid 77] second halfway\n"


def test_framework_info_lines_are_dropped_in_quiet_mode_only(relay):
    relay, write_fd, read_fd, output = relay
    os.write(write_fd, b"\n".join([ABSL_NOTICE, TF_INFO, LITERT_INFO, b"kept",
                                   b"W0000 00:00:1.5   1 x.cc:1] a warning stays", b""]))
    relay.read(read_fd)
    assert output() == (b"[worker 3 pid 77] kept\n"
                        b"[worker 3 pid 77] W0000 00:00:1.5   1 x.cc:1] a warning stays\n")
    for line in (TF_INFO, ABSL_NOTICE, LITERT_INFO):
        assert keep(line, quiet=False) and not keep(line, quiet=True)
    assert keep(b"  " + TF_INFO, quiet=True)  # only at the start of a line


def test_a_last_line_without_newline_is_relayed_when_the_worker_ends(relay):
    relay, write_fd, read_fd, output = relay
    os.write(write_fd, b"done\nno newline at the end")
    os.close(write_fd)
    relay.read(read_fd)
    assert read_fd not in relay.fds()  # at end of file: not watched, not yet closed
    relay.finish(read_fd)
    assert output() == b"[worker 3 pid 77] done\n[worker 3 pid 77] no newline at the end\n"
    relay.finish(read_fd)  # a second finish (reaped after end of file) is nothing


def test_an_endless_line_is_passed_on_in_pieces(relay):
    relay, write_fd, read_fd, output = relay
    os.write(write_fd, b"x" * 70_000)
    relay.read(read_fd)
    first = output()
    assert first.startswith(b"[worker 3 pid 77] xxx") and first.count(b"x") == 64 * 1024


def test_quiet_mode_is_left_to_a_user_who_set_a_tensorflow_level():
    assert quiet_environment({}) == {"TF_CPP_MIN_LOG_LEVEL": "1",
                                     "WORKERPOOL_QUIET_FRAMEWORKS": "1"}
    assert quiet_environment({"TF_CPP_MIN_LOG_LEVEL": "0"}) == {}
