"""Where the pool's socket lives: a fresh 0700 directory, so only our user can connect."""

from __future__ import annotations

import os
import shutil
import tempfile

# sun_path holds 108 bytes; keep well inside it.
_MAX_IPC_PATH = 100


def make_private_dir() -> str:
    """A new directory only this user can enter (``mkdtemp`` creates it 0700)."""
    path = tempfile.mkdtemp(prefix="workerpool-")
    if len(path) + len("/pool.sock") > _MAX_IPC_PATH:
        shutil.rmtree(path, ignore_errors=True)
        path = tempfile.mkdtemp(prefix="workerpool-", dir="/tmp")
    return path


def pool_endpoint(private_dir: str) -> str:
    return f"ipc://{os.path.join(private_dir, 'pool.sock')}"


def crash_log_path(private_dir: str, worker_id: int) -> str:
    """Where a worker's faulthandler writes the Python stack of a fatal signal."""
    return os.path.join(private_dir, f"crash-{worker_id}.log")


def remove_private_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
