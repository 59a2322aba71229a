"""Every shell and Python example of the README and docs/ runs, in order, as written.

How a block is run (or why it is not) is in tests/doc_examples.py. A document's examples
share one working directory: files written by earlier blocks are there for later ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from doc_examples import REPO, Runner, blocks
from workerpool.serve.config import MODEL_KEYS
from workerpool.serve.settings import ServerSettings

DOCUMENTS = ["README.md", *sorted(p.name for p in (REPO / "docs").glob("*.md")
                                  if p.name != "benchmarks.md")]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_example_runs(name, tmp_path):
    document = REPO / name if name == "README.md" else REPO / "docs" / name
    runner = Runner(tmp_path)
    try:
        for block in blocks(document):
            runner.run(block)
    finally:
        runner.close()
    assert runner.count > 0, f"{name} has no example to run"


def test_benchmarks_md_is_the_reports_output():
    """docs/benchmarks.md is written by bench/report.py (its commands are in it), not by hand."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    assert "Written by `bench/report.py`" in text
    assert not [b for b in blocks(REPO / "docs" / "benchmarks.md") if b.language in ("python", "sh")]


def test_serving_md_names_every_setting_and_flag():
    """docs/serving.md's tables list exactly what serve.toml accepts, and every flag."""
    text = (REPO / "docs" / "serving.md").read_text()
    server_table = text[text.index("`[server]` keys"):text.index("`[models.NAME]` keys")]
    listed = set(re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", server_table, re.M))
    listed = {key for cell in listed for key in re.findall(r"`(\w+)`", cell)}
    assert listed == set(ServerSettings.FILE_KEYS)
    model_text = text[text.index("`[models.NAME]` keys"):]
    model_text = model_text[:model_text.index("\n\n")]
    assert set(MODEL_KEYS) <= set(re.findall(r"`(\w+)`", model_text))
    usage = subprocess.run([sys.executable, "-m", "workerpool", "serve", "--help"],
                           capture_output=True, text=True, check=True,
                           env=dict(os.environ, COLUMNS="1000")).stdout  # no wrapped flags
    flags = set(re.findall(r"(--[a-z][a-z-]+)", usage)) - {"--help"}
    missing = {flag for flag in flags if not re.search(rf"{flag}(?![\w-])", text)}
    assert not missing, f"flags docs/serving.md never mentions: {sorted(missing)}"
