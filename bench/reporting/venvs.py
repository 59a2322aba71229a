"""Each contender's own virtual environment, built from its pinned requirements file, so
their dependencies never touch ours (bench/.venvs/<name>, rebuilt when the file changes)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
PEERS = BENCH / "peers"
VENVS = BENCH / ".venvs"


class Unavailable(Exception):
    """A contender that cannot be installed or run here; the message says why, for its row."""


def interpreter(name: str) -> pathlib.Path:
    return VENVS / name / "bin" / "python"


def build(name: str, log) -> str:
    """The python of ``name``'s environment, built first if its requirements changed."""
    requirements = PEERS / name / "requirements.txt"
    venv = VENVS / name
    stamp = venv / ".requirements"
    wanted = requirements.read_text()
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
