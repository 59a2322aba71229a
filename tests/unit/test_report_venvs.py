"""bench/report.py rebuilds workerpool's venv when the checkout's package changes, and says
which commit of it workerpool's rows ran: a report must never measure an older copy of
workerpool than the one it names."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from reporting import venvs  # noqa: E402


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    package = tmp_path / "src" / "workerpool"
    (package / "pool").mkdir(parents=True)
    (package / "pool" / "scheduling.py").write_text("MAX_CHUNK = 16\n")
    (tmp_path / "pyproject.toml").write_text("[build-system]\n")
    monkeypatch.setattr(venvs, "ROOT", tmp_path)
    return tmp_path


def git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                    *args], check=True, capture_output=True)


def test_the_fingerprint_follows_the_package_source_not_its_bytecode(checkout):
    before = venvs.source_fingerprint()
    cache = checkout / "src" / "workerpool" / "pool" / "__pycache__"
    cache.mkdir()
    (cache / "scheduling.cpython-311.pyc").write_bytes(b"\0" * 16)
    (checkout / "README.md").write_text("not part of the package\n")
    assert venvs.source_fingerprint() == before
    (checkout / "src" / "workerpool" / "pool" / "scheduling.py").write_text("MAX_CHUNK = 8\n")
    assert venvs.source_fingerprint() != before
    (checkout / "src" / "workerpool" / "pool" / "scheduling.py").write_text("MAX_CHUNK = 16\n")
    assert venvs.source_fingerprint() == before
    (checkout / "pyproject.toml").write_text("[build-system]\nrequires = []\n")
    assert venvs.source_fingerprint() != before


def test_the_source_commit_is_the_last_to_change_the_package(checkout):
    git(checkout, "init", "-q")
    git(checkout, "add", ".")
    git(checkout, "commit", "-qm", "package")
    package_commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short",
                                     "HEAD"], capture_output=True, text=True).stdout.strip()
    (checkout / "README.md").write_text("docs\n")
    git(checkout, "add", "README.md")
    git(checkout, "commit", "-qm", "docs only")
    assert venvs.source_commit() == package_commit
    (checkout / "src" / "workerpool" / "pool" / "scheduling.py").write_text("MAX_CHUNK = 8\n")
    assert venvs.source_commit() == f"{package_commit} +local changes"


def test_workerpools_venv_is_rebuilt_when_the_package_changes_and_only_then(checkout,
                                                                           monkeypatch):
    peers, built = checkout / "bench" / "peers", checkout / "bench" / ".venvs"
    for name, line in (("workerpool", "workerpool @ file://${WORKERPOOL_ROOT}"),
                       ("litserve", "litserve==0.2.19")):
        (peers / name).mkdir(parents=True)
        (peers / name / "requirements.txt").write_text(line + "\n")
        (built / name).mkdir(parents=True)
    monkeypatch.setattr(venvs, "PEERS", peers)
    monkeypatch.setattr(venvs, "VENVS", built)
    steps = []  # the venv and pip commands build() runs, not run here: no pip in a unit test

    def run(step, **kwargs):
        steps.append(step)
        return subprocess.CompletedProcess(step, 0, "", "")

    monkeypatch.setattr(venvs.subprocess, "run", run)

    def rebuilt(name):
        steps.clear()
        venvs.build(name, sys.stderr)
        return [step[1:3] for step in steps] == [["-m", "venv"], ["-m", "pip"]]

    assert rebuilt("workerpool") and rebuilt("litserve")  # no stamps yet
    assert not rebuilt("workerpool") and not rebuilt("litserve")
    (checkout / "src" / "workerpool" / "pool" / "scheduling.py").write_text("MAX_CHUNK = 8\n")
    assert rebuilt("workerpool") and not rebuilt("litserve")
    assert not rebuilt("workerpool")


def test_the_workerpool_venv_installs_this_checkouts_distribution_by_its_name():
    # (pip refuses `NAME @ file://checkout` when the checkout's metadata names another
    # distribution: the report then had no workerpool rows at all)
    import configparser

    root = pathlib.Path(__file__).resolve().parents[2]
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    name = setup["metadata"]["name"]
    lines = [line for line in (venvs.PEERS / "workerpool" / "requirements.txt")
             .read_text().splitlines() if "${WORKERPOOL_ROOT}" in line]
    assert len(lines) == 1 and lines[0].split("[")[0].split("@")[0].strip() == name, lines
