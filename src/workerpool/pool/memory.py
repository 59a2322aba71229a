"""Memory accounting of the pool's processes, from one pass over /proc/PID/smaps.

PSS (proportional set size) splits each shared page among the processes mapping it, so the
PSS summed over the parent, the zygote and the workers is the pool's true footprint; USS
(private pages) is what one process costs on its own. For the published weights (the memfd
segments, TF's mapped constants, the weight files) we count what each process maps of them
(``weights_mapped``: resident bytes of those mappings, shared with every other process that
maps them) apart from everything else it holds alone (``private``: USS less the weight pages
only this process happens to map), and pages copied privately inside a weight mapping
(``weights_copied``, ``Anonymous``): that must stay 0. A worker holding its own copy of the
model shows it in ``private``, whatever the adapter claims in ``weights_source``.
"""

from __future__ import annotations

from .. import memfd

_KB = 1024
_SEGMENT_NAME = f"memfd:{memfd.MEMFD_NAME}"


def process_memory(pid: int | None, weight_files: tuple[str, ...] = ()) -> dict:
    """PSS, USS, RSS, resident shared bytes, and the weights' share (the memfd segment and
    any published ``weight_files``), of ``pid``. Zeros when the process is gone."""
    usage = dict.fromkeys(("pss", "uss", "rss", "shared", "weights_rss", "weights_pss",
                           "weights_copied", "weights_private"), 0)
    usage["weights_mappings"] = []
    if pid:  # (none yet: a worker just asked for; zeros, every key there)
        _read_smaps(pid, weight_files, usage)
    usage["weights_mapped"] = usage["weights_rss"]
    usage["private"] = usage["uss"] - usage.pop("weights_private")
    return usage


def add_process_memory(row: dict, weight_files: tuple[str, ...] = (),
                       memo: dict | None = None) -> None:
    """``row`` (a stats row with a "pid") updated with :func:`process_memory`; with a
    ``memo`` shared by one reading's rows, each process's is read once (the server's own
    process is every pool's parent)."""
    if memo is None:
        row.update(process_memory(row["pid"], weight_files))
        return
    key = (row["pid"], weight_files)
    if key not in memo:
        memo[key] = process_memory(row["pid"], weight_files)
    usage = memo[key]
    row.update(usage, weights_mappings=list(usage["weights_mappings"]))


def pss_of(pid: int) -> int | None:
    """The PSS of ``pid`` alone, from /proc/PID/smaps_rollup: the kernel's sum, a read of
    well under a millisecond where walking smaps takes 5-10 (a torch process has hundreds of
    mappings). None when the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * _KB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _read_smaps(pid: int, weight_files: tuple[str, ...], usage: dict) -> None:
    segment = None
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                key, _, rest = line.partition(" ")
                if not key.endswith(":"):  # a mapping's header line: "start-end perms ..."
                    segment = None
                    if _SEGMENT_NAME in rest or (
                            weight_files and _path_of(rest) in weight_files):
                        segment = {"perms": rest.split(None, 1)[0]}
                        usage["weights_mappings"].append(segment)
                    continue
                if not rest.endswith("kB\n"):
                    continue
                value = int(rest.split()[0]) * _KB
                _count(usage, key, value)
                if segment is not None:
                    segment[key[:-1].lower()] = value
                    _count_segment(usage, key, value)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass


def _path_of(header_rest: str) -> str:
    """The pathname of an smaps header line (after its address range)."""
    fields = header_rest.rstrip("\n").split(None, 4)
    return fields[4] if len(fields) == 5 else ""


def _count(usage: dict, key: str, value: int) -> None:
    if key == "Pss:":
        usage["pss"] += value
    elif key == "Rss:":
        usage["rss"] += value
    elif key in ("Private_Clean:", "Private_Dirty:"):
        usage["uss"] += value
    elif key in ("Shared_Clean:", "Shared_Dirty:"):
        usage["shared"] += value


def _count_segment(usage: dict, key: str, value: int) -> None:
    if key == "Rss:":
        usage["weights_rss"] += value
    elif key == "Pss:":
        usage["weights_pss"] += value
    elif key == "Anonymous:":
        usage["weights_copied"] += value
    elif key in ("Private_Clean:", "Private_Dirty:"):
        usage["weights_private"] += value


def tree_pss(root: int) -> int:
    """PSS of ``root`` and every process under it, in bytes (smaps_rollup: one short read
    per process). A process that left meanwhile counts 0."""
    import psutil

    try:
        pids = [root, *(child.pid for child in psutil.Process(root).children(recursive=True))]
    except psutil.NoSuchProcess:
        return 0
    return sum(pss_of(pid) or 0 for pid in pids)
