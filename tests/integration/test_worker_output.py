"""What workers write to stderr reaches the pool's stderr, a line at a time, prefixed with
the worker it came from: Python's and native writes, and the last words of a worker that
ends without a newline."""

from __future__ import annotations

import os
import re
import sys

import workerpool as wp


def load():
    return None


def talk(model, x):
    print(f"python says {x}", file=sys.stderr, flush=True)
    os.write(2, f"native says {x}\n".encode())
    os.write(2, b"I0000 00:00:1796131631.590720   15221 port.cc:153] INFO-like line\n")
    if x == "bye":
        os.write(2, b"last words, no newline")
        os._exit(3)
    return os.getpid()


PREFIX = re.compile(r"^\[worker (\d+) pid (\d+)\] (.*)$")


def lines_of(err: str) -> list[tuple[int, str]]:
    """(pid in the prefix, text) of each prefixed line."""
    return [(int(m[2]), m[3]) for m in map(PREFIX.match, err.splitlines()) if m]


def test_worker_stderr_comes_out_prefixed_and_quiet(capfd, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    capfd.readouterr()
    with wp.Pool(load, talk, workers=2, timeout=60) as pool:
        pids = {pool.submit(f"n{i}").result() for i in range(6)}
        try:
            pool.submit("bye").result()
        except wp.WorkerCrashed:
            pass
    lines = lines_of(capfd.readouterr().err)
    for i in range(6):
        (pid,) = [p for p, text in lines if text == f"python says n{i}"]
        assert pid in pids and (pid, f"native says n{i}") in lines
    assert sum(text == "last words, no newline" for _, text in lines) == 2  # tried twice
    assert not [text for _, text in lines if "INFO-like" in text]  # quiet by default


def test_a_user_who_set_a_tensorflow_level_sees_every_line(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    capfd.readouterr()
    with wp.Pool(load, talk, workers=1) as pool:
        pid = pool.submit("x").result()
    lines = lines_of(capfd.readouterr().err)
    assert (pid, "I0000 00:00:1796131631.590720   15221 port.cc:153] INFO-like line") in lines
