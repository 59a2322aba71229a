"""Every test must leave nothing behind: no process, no shared segment, no ipc directory.

The pytest process makes itself a child subreaper, so a worker orphaned by a dead zygote is
re-parented to us and still counts as our descendant (instead of vanishing under init).
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import tempfile
import time

import psutil
import pytest

from testkit import our_memfds

PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

# A temp root of our own: other programs' workerpool directories are not our leaks.
TEMP_ROOT = tempfile.mkdtemp(prefix="wp-tests-", dir="/tmp")
os.environ["TMPDIR"] = tempfile.tempdir = TEMP_ROOT
os.environ["WORKERPOOL_CACHE"] = os.path.join(TEMP_ROOT, "model-cache")  # not the user's


def pytest_unconfigure(config):
    shutil.rmtree(TEMP_ROOT, ignore_errors=True)  # pytest's tmp_path dirs live here too


def live_descendants() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)  # an orphan re-parented to us; bury it
            else:
                alive.append(child)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    return alive


def snapshot() -> dict:
    return {
        "shm": set(os.listdir("/dev/shm")),
        "dirs": set(glob.glob(os.path.join(tempfile.gettempdir(), "workerpool-*"))),
    }


def check_leaks(before: dict) -> None:
    deadline = time.monotonic() + 10
    while live_descendants() and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = live_descendants()
    after = snapshot()
    problems = []
    if leaked:
        problems.append(f"processes left running: {[(p.pid, p.cmdline()) for p in leaked]}")
        for process in leaked:
            process.kill()
    if after["shm"] - before["shm"]:
        problems.append(f"/dev/shm entries left: {sorted(after['shm'] - before['shm'])}")
    if after["dirs"] - before["dirs"]:
        problems.append(f"ipc directories left: {sorted(after['dirs'] - before['dirs'])}")
    if our_memfds():
        problems.append(f"weight memfds still open in the test process: {our_memfds()}")
    if problems:
        pytest.fail("leak: " + "; ".join(problems))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "module_pool: the module shares pools between tests; leaks are checked "
        "when the module ends instead of after each test")


@pytest.fixture(autouse=True, scope="module")
def no_leaks_after_module():
    before = snapshot()
    yield
    check_leaks(before)


@pytest.fixture(autouse=True)
def no_leaks(request):
    if request.node.get_closest_marker("module_pool"):
        yield
        return
    before = snapshot()
    yield
    check_leaks(before)
