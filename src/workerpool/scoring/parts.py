"""The parts directory: what survives a crash, and what a resumed run checks.

    <output>.parts/
        manifest.json                 the run: input identity (path, size, mtime), columns,
                                      id column, chunk size, model identity, output format
        part-00000042.arrow           chunk 42's output rows (Arrow IPC), complete: it is
                                      written as a .tmp file and renamed
        part-00000042.errors.jsonl    chunk 42's bad rows (--on-error skip), renamed first
        output.tmp                    the output as it is written, chunk after chunk

A part exists only complete, so a resumed run scores exactly the chunks without one.
Leftover .tmp files (a SIGKILL mid-write) are deleted on resume.
"""

from __future__ import annotations

import json
import os
import re

MANIFEST = "manifest.json"
_PART = re.compile(r"part-(\d{8})\.arrow$")


class ResumeRefused(ValueError):
    """Parts exist for another run (another input, model or settings), or without --resume."""


class Parts:
    def __init__(self, output: str):
        self.directory = f"{output}.parts"

    def path(self, index: int, suffix: str = ".arrow") -> str:
        return os.path.join(self.directory, f"part-{index:08d}{suffix}")

    def start(self, manifest: dict, resume: bool) -> set[int]:
        """The chunks already done (none for a new run); refuses a mismatched resume."""
        existing = os.path.join(self.directory, MANIFEST)
        if os.path.exists(existing):
            if not resume:
                raise ResumeRefused(f"{self.directory} holds the parts of an unfinished run: "
                                    "add --resume to continue it, or delete it to start over")
            with open(existing) as f:
                before = json.load(f)
            changed = sorted(key for key in set(before) | set(manifest)
                             if before.get(key) != manifest.get(key))
            if changed:
                detail = "; ".join(f"{key}: was {before.get(key)!r}, now {manifest.get(key)!r}"
                                   for key in changed)
                raise ResumeRefused(f"cannot resume: this run differs from the one that wrote "
                                    f"{self.directory} ({detail}). Delete it to start over")
            for name in os.listdir(self.directory):
                if ".tmp" in name:
                    os.unlink(os.path.join(self.directory, name))
            return self.done()
        os.makedirs(self.directory, exist_ok=True)
        self._write(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return set()

    def done(self) -> set[int]:
        return {int(m[1]) for m in map(_PART.match, os.listdir(self.directory)) if m}

    def write(self, index: int, table, errors: list[dict]) -> None:
        """One chunk's output, complete or not at all (its errors first)."""
        import pyarrow as pa

        if errors:
            self._write(os.path.basename(self.path(index, ".errors.jsonl")),
                        "".join(json.dumps(e) + "\n" for e in errors).encode())
        temporary = self.path(index, ".arrow.tmp")
        with pa.OSFile(temporary, "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        os.replace(temporary, self.path(index))

    def _write(self, name: str, data: bytes) -> None:
        temporary = os.path.join(self.directory, name + ".tmp")
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, os.path.join(self.directory, name))

    def errors(self, count: int) -> list[str]:
        """Every error line of the parts, in chunk order."""
        lines = []
        for index in range(count):
            path = self.path(index, ".errors.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    lines.extend(f)
        return lines

    def remove(self) -> None:
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)
