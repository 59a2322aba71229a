"""The docs' example runner fails where an example is wrong, and reads fences as documented."""

from __future__ import annotations

import re

import pytest

from doc_examples import REPO, Runner, blocks, commands


def write(tmp_path, text):
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def run_all(tmp_path, text, path_first=None):
    runner = Runner(tmp_path)
    if path_first:
        runner.env["PATH"] = f"{path_first}:{runner.env['PATH']}"
    try:
        for block in blocks(write(tmp_path, text)):
            runner.run(block)
    finally:
        runner.close()
    return runner


def test_a_failing_python_example_fails_with_its_place(tmp_path):
    with pytest.raises(AssertionError, match=r"doc.md:3: exit 1"):
        run_all(tmp_path, "intro\n\n```python\nassert 1 + 1 == 3\n```\n")


def test_files_are_written_for_later_examples(tmp_path):
    text = ("```python file=lib.py\nVALUE = 42\n```\n\n"
            "```python\nfrom lib import VALUE\nassert VALUE == 42\n```\n"
            "```sh\ntest -f lib.py  # a comment, # and more\n```\n")
    assert run_all(tmp_path, text).count == 2


def test_an_unknown_fence_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="neither run nor written"):
        run_all(tmp_path, "```bash\necho hi\n```\n")


def test_install_lines_name_real_extras_and_installed_packages(tmp_path):
    run_all(tmp_path, "```sh\npip install '.[serve,grpc]'\npip install pytest\n```\n")
    with pytest.raises(AssertionError, match="no such extra"):
        run_all(tmp_path, "```sh\npip install '.[servr]'\n```\n")
    with pytest.raises(AssertionError, match="not installed here"):
        run_all(tmp_path, "```sh\npip install surely-not-a-package-here\n```\n")


def test_a_curl_error_answer_fails(tmp_path):
    """curl exits 0 on an HTTP error; the answer's `error` is what fails the example."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text("#!/bin/sh\necho 'data: {\"error\": \"no such model\"}'\n")
    (bin_dir / "curl").chmod(0o755)
    with pytest.raises(AssertionError, match="answered"):
        run_all(tmp_path, "```sh\ncurl -s localhost:8000/v2/models/x/generate_stream\n```\n",
                path_first=bin_dir)


def test_commands_join_continuations_and_drop_comments():
    assert commands("a \\\n  b  # note\n# only a comment\nc '#not' d\n") == \
        ["a    b", "c '#not' d"]


def test_relative_links_of_the_docs_exist():
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
