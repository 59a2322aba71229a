"""Which file, if any, backs a range of this process's memory.

Tensors loaded zero-copy (safetensors ``load_file``, ``torch.load(mmap=True)``,
``np.load(mmap_mode="r")``) live in a mapping of the weight file itself. Publishing them
needs no copy: workers map the same file and the page cache holds the one copy. That is
only sound while the pages still equal the file, so a mapping with any privately written
page (``Anonymous`` in smaps: copy-on-write happened) is not used, and the file must still
be the one that was mapped (same device and inode).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import stat


@dataclasses.dataclass(frozen=True)
class FileMapping:
    start: int
    end: int
    file_offset: int
    device: tuple[int, int]
    inode: int
    path: str


class FileMappings:
    """A snapshot of this process's file-backed mappings (from /proc/self/maps)."""

    def __init__(self):
        self.mappings = sorted(_read_maps(), key=lambda m: m.start)
        self._starts = [m.start for m in self.mappings]
        self._clean: dict[int, bool] = {}

    def find(self, address: int, nbytes: int) -> FileMapping | None:
        """The unmodified regular-file mapping holding [address, address + nbytes)."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or nbytes <= 0:
            return None
        mapping = self.mappings[index]
        if address + nbytes > mapping.end or not self._is_clean(mapping):
            return None
        return mapping

    def _is_clean(self, mapping: FileMapping) -> bool:
        if mapping.start not in self._clean:
            self._clean[mapping.start] = _anonymous_bytes(mapping.start) == 0
        return self._clean[mapping.start]


def open_mapped_file(mapping: FileMapping) -> int | None:
    """An O_RDONLY fd of the mapped file, or None if the path now names another file."""
    try:
        fd = os.open(mapping.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_ino != mapping.inode or \
            (os.major(info.st_dev), os.minor(info.st_dev)) != mapping.device:
        os.close(fd)
        return None
    return fd


def _read_maps():
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue  # anonymous, [heap], [stack], ...
            path = fields[5].rstrip("\n")
            if path.endswith(" (deleted)") or path.startswith("/memfd:"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            yield FileMapping(start, end, int(fields[2], 16), (major, minor), int(fields[4]),
                              path)


def _anonymous_bytes(start: int) -> int:
    """Bytes of the mapping at ``start`` that were copied privately (written to)."""
    header = f"{start:x}-"
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                if inside:
                    return 0
                inside = line.startswith(header)
            elif inside and line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0
