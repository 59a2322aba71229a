"""Each contender's own virtual environment, built from its pinned requirements file, so
their dependencies never touch ours (bench/.venvs/<name>, rebuilt when the file changes)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
PEERS = BENCH / "peers"
VENVS = BENCH / ".venvs"
# What ``pip install`` of this checkout installs from: workerpool's package and its build files.
PACKAGE_PATHS = ("src/workerpool", "pyproject.toml", "setup.cfg")


class Unavailable(Exception):
    """A contender that cannot be installed or run here; the message says why, for its row."""


def interpreter(name: str) -> pathlib.Path:
    return VENVS / name / "bin" / "python"


def source_fingerprint() -> str:
    """A hash of what ``pip install`` of this checkout installs (the package's files and
    its build metadata): a venv holding workerpool is rebuilt when it changes, so a trial
    never measures an older copy than the checkout's."""
    digest = hashlib.sha256()
    for top in (ROOT / name for name in PACKAGE_PATHS):
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def source_commit() -> str:
    """The last commit that changed workerpool's package (PACKAGE_PATHS), with
    ``+local changes`` if the checkout differs from it there: what workerpool's rows ran."""
    commit = _git("log", "-1", "--format=%h", "--", *PACKAGE_PATHS) or "unknown"
    return commit + (" +local changes" if _git("status", "--porcelain", "--", *PACKAGE_PATHS)
                     else "")


def harness_commit() -> str:
    """This checkout's commit (the harness and the peers' apps that ran), with
    ``+local changes`` if bench/ differs from it."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" +local changes" if _git("status", "--porcelain", "--", "bench",
                                               ":!bench/results") else "")


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def build(name: str, log) -> str:
    """The python of ``name``'s environment, built first if its requirements changed (or,
    for one installing this checkout, the checkout's package did)."""
    requirements = PEERS / name / "requirements.txt"
    venv = VENVS / name
    stamp = venv / ".requirements"
    wanted = requirements.read_text()
    if "${WORKERPOOL_ROOT}" in wanted:
        wanted += f"# workerpool source {source_fingerprint()}\n"
    if stamp.exists() and stamp.read_text() == wanted:
        return str(interpreter(name))
    print(f"[report] building {venv} from {requirements.relative_to(ROOT)}", file=log,
          flush=True)
    # The base interpreter, not this venv's: a venv made from a venv's python links to it.
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(venv)],
             [str(interpreter(name)), "-m", "pip", "install", "--quiet", "-r",
              str(requirements)]]
    env = {**os.environ, "WORKERPOOL_ROOT": str(ROOT), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise Unavailable(f"`{' '.join(step[-4:])}` failed: {' / '.join(tail)}")
    stamp.write_text(wanted)
    return str(interpreter(name))


def versions(python: str, names: list[str]) -> dict[str, str]:
    """{package: version} of ``names`` installed in ``python``'s environment."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    done = subprocess.run([python, "-c", code, *names], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}
