"""The README's and docs/' examples, read out of the markdown and run as a user would.

Every fenced block is one of:
- ```python file=NAME``` / ```toml file=NAME```: a file the following examples use, written
  into the document's working directory;
- ```python```: a script, run there with this environment's Python; it must exit 0 (examples
  assert what they promise, so a wrong claim fails here);
- ```sh```: commands, one per line (`\\` continues a line, `#` starts a comment), run by bash
  there. `workerpool serve ...` and `make serve` start a server that stays up, ready, until
  the next one starts or the document ends. `make TARGET` is checked with `make -n` (CI runs
  the real `make test`; the others build environments), and `pip install` checks that the
  extras it names exist and that other packages it names are installed here. A `curl`
  answer that is a JSON error fails the example;
- ```text```: output shown to the reader, not run.
Any other fence is an error, so an example cannot be added without being run.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(.*)$")
SERVER_PORTS = (8000, 8001, 8500)


@dataclasses.dataclass
class Block:
    doc: Path
    line: int  # 1-based, the fence's line
    language: str
    attrs: dict[str, str]
    text: str

    @property
    def where(self) -> str:
        shown = self.doc.relative_to(REPO) if self.doc.is_relative_to(REPO) else self.doc.name
        return f"{shown}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    found, lines, index = [], doc.read_text().splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index].strip())
        if not opening:
            index += 1
            continue
        info = opening.group(1).split()
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{doc}:{index + 1}: a fence that never closes")
        indent = len(lines[index]) - len(lines[index].lstrip())
        body = "\n".join(line[indent:] for line in lines[index + 1:end]) + "\n"
        attrs = dict(item.split("=", 1) for item in info[1:] if "=" in item)
        found.append(Block(doc, index + 1, info[0] if info else "", attrs, body))
        index = end + 1
    return found


def commands(text: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    joined, pending = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        line = strip_comment(line).strip()
        if line:
            joined.append(line)
    return joined


def strip_comment(line: str) -> str:
    """The line up to a `#` that starts a comment (outside quotes, after a blank)."""
    quote = None
    for position, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1] in " \t"):
            return line[:position]
    return line


class Runner:
    """Runs one document's examples in order, in one working directory."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.server: subprocess.Popen | None = None
        self.server_log: Path | None = None
        self.count = 0
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                        PYTHONUNBUFFERED="1")

    # -- blocks

    def run(self, block: Block) -> None:
        if block.language == "text":
            return
        if "file" in block.attrs:
            if block.language not in ("python", "toml"):
                raise AssertionError(f"{block.where}: file= is for python and toml blocks")
            (self.workdir / block.attrs["file"]).write_text(block.text)
            return
        if block.language == "python":
            self.python(block)
        elif block.language == "sh":
            for command in commands(block.text):
                self.shell(block, command)
        else:
            raise AssertionError(
                f"{block.where}: a ```{block.language}``` block is neither run nor written; "
                "use python, sh, text, or python/toml with file=NAME (tests/doc_examples.py)")

    def python(self, block: Block) -> None:
        script = self.workdir / f"example_{block.line}.py"
        script.write_text(block.text)
        self.check(block, [sys.executable, script.name], block.text)

    def shell(self, block: Block, command: str) -> None:
        words = shlex.split(command)
        if words[:2] == ["workerpool", "serve"] or words[:2] == ["make", "serve"]:
            self.start_server(block, command, words)
        elif words[0] == "make":
            self.check(block, ["make", "-n", *words[1:]], command, cwd=REPO)
        elif words[:2] == ["pip", "install"]:
            self.check_install(block, words[2:])
        else:
            output = self.check(block, ["bash", "-c", command], command)
            if words[0] == "curl":
                self.check_answer(block, command, output)

    # -- checks

    def check(self, block, argv, shown, cwd=None) -> str:
        self.count += 1
        result = subprocess.run(argv, cwd=cwd or self.workdir, env=self.env, text=True,
                                capture_output=True, timeout=600)
        if result.returncode != 0:
            raise AssertionError(
                f"{block.where}: exit {result.returncode} from\n{shown}\n--- stdout\n"
                f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
                + self.server_tail())
        return result.stdout

    def check_answer(self, block, command, output) -> None:
        for line in output.splitlines():
            if line.startswith("data:"):  # server-sent events
                line = line[5:]
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            if isinstance(answer, dict) and "error" in answer:
                raise AssertionError(f"{block.where}: {command}\nanswered {line}"
                                     + self.server_tail())

    def check_install(self, block, args) -> None:
        self.count += 1
        extras = extras_declared()
        for arg in args:
            if arg.startswith("-"):
                continue
            match = re.fullmatch(r"([\w.\-]+)(?:\[([\w,\- ]+)\])?", arg)
            if not match:
                raise AssertionError(f"{block.where}: cannot read {arg!r} of pip install")
            name, wanted = match.group(1), match.group(2)
            if name in (".", "workerpool-serve"):
                unknown = {w.strip() for w in (wanted or "").split(",") if w.strip()} - extras
                if unknown:
                    raise AssertionError(f"{block.where}: no such extra {sorted(unknown)} "
                                         f"in setup.cfg (there are {sorted(extras)})")
            else:
                try:
                    importlib.metadata.distribution(name)
                except importlib.metadata.PackageNotFoundError:
                    raise AssertionError(
                        f"{block.where}: {name} is not installed here, so the example "
                        "using it cannot be run; add it to the dev extra") from None

    # -- servers

    def start_server(self, block, command, words) -> None:
        self.stop_server()
        ports = [int(words[i + 1]) for i, word in enumerate(words[:-1])
                 if word in ("--port", "--grpc-port", "--tf-serving-port")]
        http_port = next((int(words[i + 1]) for i, word in enumerate(words[:-1])
                          if word == "--port"), 8000)
        for port in {http_port, *ports}:
            if not port_free(port):
                raise AssertionError(f"{block.where}: port {port} is taken; the examples use "
                                     "the server's default ports, so stop what holds it")
        self.count += 1
        self.server_log = self.workdir / f"server_{block.line}.log"
        cwd = REPO if words[0] == "make" else self.workdir
        self.server = subprocess.Popen(
            ["bash", "-c", "exec " + command], cwd=cwd, env=self.env,
            stdout=self.server_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"{block.where}: {command} exited "
                                     f"{self.server.returncode}" + self.server_tail())
            if ready(http_port):
                return
            time.sleep(0.2)
        raise AssertionError(f"{block.where}: {command} not ready in 240 s" + self.server_tail())

    def stop_server(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: drain and stop
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                raise AssertionError("a server did not stop on Ctrl-C within 60 s"
                                     + self.server_tail())

    def server_tail(self) -> str:
        if self.server_log is None or not self.server_log.exists():
            return ""
        return "\n--- the server's output\n" + self.server_log.read_text()[-4000:]

    def close(self) -> None:
        self.stop_server()


def extras_declared() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return set(parser["options.extras_require"])


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
