"""Scoring a file with a Pool: chunks in, parts out, the output at the end.

    Reader.chunks() -> chunk i (skipped if its part exists) -> pool.submit(rows) per
    ``batch_rows`` slice -> up to ``window`` chunks in flight -> in chunk order: the
    outputs as a table -> part i -> ... -> every part -> the output (atomic rename)

Memory: at most ``window`` chunks in flight (default 2 per worker) plus the one being read
and the one being written, whatever the input's size. A chunk whose predict raises:
``on_error="fail"`` stops the run (ScoreFailed); ``"skip"`` splits it in halves until the
bad rows are alone, records them (id, row, error) and scores the rest. ``stop`` (an Event:
the CLI sets it on SIGINT/SIGTERM) ends the run after the chunks in flight are written
(Interrupted); ``resume=True`` continues it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable

from .. import errors
from ..sources.remote import fetch
from .outputs import OutputError, OutputWriter, output_columns, output_table, read_part
from .parts import Parts
from .readers import InputError, Reader, format_of



def model_failed(error: BaseException) -> bool:
    """predict's own exception (rebuilt in the caller, or RemoteError), or its worker died
    on the input: the rows' fault. The pool's errors (closed, broken, ...) are not."""
    return isinstance(error, (errors.RemoteError, errors.WorkerCrashed)) or (
        isinstance(error, Exception) and not isinstance(error, errors.WorkerpoolError))


class ScoreFailed(RuntimeError):
    """predict raised on a chunk (``on_error="fail"``), or an output could not be made."""


class Interrupted(RuntimeError):
    """Stopped on request; the finished parts are kept for ``resume``."""


@dataclasses.dataclass
class Summary:
    rows: int  # rows written to the output
    errors: int  # rows skipped (on_error="skip")
    seconds: float
    resumed_chunks: int  # chunks a resumed run found done
    output: str

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def score(pool, source: str, sink: str, *, columns: list[str] | None = None,
          id_column: str | None = None, chunk_rows: int = 10_000,
          batch_rows: int | None = None, window: int | None = None, resume: bool = False,
          on_error: str = "fail", progress: Callable[[int, int, bool], None] | None = None,
          stop: threading.Event | None = None, model_identity: str | None = None,
          dtype=None) -> Summary:
    """Score the file ``source`` with ``pool`` into ``sink`` (formats by extension:
    .parquet, .csv, .jsonl, .npy; either may be a URL fsspec opens: the input is fetched
    into the local cache first, the output built locally and uploaded when complete).
    ``predict`` gets a 2-D array of ``columns`` (default: every column but ``id_column``;
    cast to ``dtype`` if given, as text formats read numbers as float64), ``batch_rows``
    rows at a time (default: a chunk).
    ``progress(rows, errors, resumed)`` is called per chunk as it finishes (``resumed``:
    done by an earlier run). ``model_identity`` (default: ``pool.version``, the weights'
    hash) goes into the manifest a resume must match. Raises InputError, ResumeRefused,
    ScoreFailed, Interrupted."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if chunk_rows < 1 or (batch_rows is not None and batch_rows < 1):
        raise ValueError("chunk_rows and batch_rows must be >= 1")
    started = time.monotonic()
    output_format = format_of(sink)
    remote_sink = "://" in sink
    local_sink = staging_path(sink) if remote_sink else sink
    reader = Reader(fetch(source), columns, id_column, dtype)
    if output_format == "npy" and id_column is not None:
        raise InputError(f"{sink}: a .npy output holds numbers only; write .parquet, .csv "
                         "or .jsonl to keep the id column")
    parts = Parts(local_sink)
    identity = dict(reader.identity, **({"url": source} if "://" in source else {}))
    manifest = {"input": identity, "columns": reader.columns, "id_column": id_column,
                "chunk_rows": chunk_rows, "model": model_identity or pool.version,
                "output": sink if remote_sink else os.path.abspath(sink),
                "on_error": on_error, "dtype": reader.dtype}
    done = parts.start(manifest, resume)
    batch_rows = batch_rows or chunk_rows
    window = window or 2 * pool.config.workers
    chunks = 0
    in_flight: collections.deque = collections.deque()

    writer = OutputWriter(local_sink, output_format,
                          os.path.join(parts.directory, "output.tmp"))

    def finish_oldest() -> None:
        index, ids, features, futures = in_flight.popleft()
        if futures is None:  # done by an earlier run: its part, in its place
            writer.append(read_part(parts.path(index)))
            return
        table, bad = _collect(pool, index, ids, features, futures, batch_rows, id_column,
                              chunk_rows, on_error)
        parts.write(index, table, bad)
        writer.append(table)
        if progress is not None:
            progress(table.num_rows + len(bad), len(bad), False)

    try:
        for index, (size, ids, features) in enumerate(reader.chunks(chunk_rows, done)):
            chunks = index + 1
            if index in done:
                in_flight.append((index, None, None, None))
                if progress is not None:
                    progress(size, 0, True)
            elif stop is not None and stop.is_set():
                break
            else:
                in_flight.append((index, ids, features, _submit(pool, features, batch_rows)))
            if len(in_flight) >= window:
                finish_oldest()
        while in_flight:
            finish_oldest()
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped; {len(parts.done())} chunks are done in "
                              f"{parts.directory}: resume with --resume")
        rows = writer.finish([parts.path(i) for i in range(chunks)])
    except BaseException:
        writer.abort()
        raise
    error_lines = parts.errors(chunks)
    errors_path = f"{local_sink}.errors.jsonl"
    if error_lines:
        with open(errors_path, "w") as f:
            f.writelines(error_lines)
    elif os.path.exists(errors_path):
        os.unlink(errors_path)
    if remote_sink:
        upload(local_sink, sink)
        if error_lines:
            upload(errors_path, f"{sink}.errors.jsonl")
    parts.remove()
    return Summary(rows=rows, errors=len(error_lines), seconds=time.monotonic() - started,
                   resumed_chunks=len(done), output=sink)


def staging_path(url: str) -> str:
    """Where the output for a remote ``url`` is built (and its parts kept for a resume)."""
    root = os.environ.get("WORKERPOOL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "workerpool")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    directory = os.path.join(root, "score", key)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, url.rstrip("/").rsplit("/", 1)[-1])


def upload(path: str, url: str) -> None:
    """The finished file to its remote place (fsspec; one object, written whole)."""
    import fsspec

    with open(path, "rb") as source, fsspec.open(url, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 22)
    os.unlink(path)


def _submit(pool, features, batch_rows: int) -> list:
    return [pool.submit(features[start:start + batch_rows])
            for start in range(0, len(features), batch_rows)]


def _collect(pool, index: int, ids, features, futures, batch_rows: int, id_column,
             chunk_rows: int, on_error: str):
    """A chunk's output table and its bad rows."""
    first_row = index * chunk_rows
    results, bad = [], []
    for number, future in enumerate(futures):
        start = number * batch_rows
        rows = features[start:start + batch_rows]
        try:
            result = future.result()
        except Exception as error:
            if not model_failed(error):
                raise
            if on_error == "fail":
                raise ScoreFailed(f"predict failed on rows {first_row + start}.."
                                  f"{first_row + start + len(rows) - 1}: "
                                  f"{_one_line(error)}") from error
            _isolate(pool, rows, first_row + start, start, ids, results, bad, error)
            continue
        results.append((start, len(rows), _columns(result, len(rows))))
    return _table(results, ids, id_column), bad


def _isolate(pool, rows, absolute: int, start: int, ids, results: list, bad: list,
             error: BaseException) -> None:
    """``rows`` failed with ``error``: halves until each bad row is alone; the good
    halves' outputs go to ``results``, the bad rows to ``bad``."""
    if len(rows) == 1:
        bad.append({"row": absolute, "id": ids[start].as_py() if ids is not None else None,
                    "error": _one_line(error)})
        return
    half = len(rows) // 2
    for offset, part in ((0, rows[:half]), (half, rows[half:])):
        try:
            result = pool.submit(part).result()
        except Exception as failure:
            if not model_failed(failure):
                raise
            _isolate(pool, part, absolute + offset, start + offset, ids, results, bad,
                     failure)
            continue
        results.append((start + offset, len(part), _columns(result, len(part))))


def _columns(result, rows: int) -> dict:
    try:
        return output_columns(result, rows)
    except OutputError as error:
        raise ScoreFailed(str(error)) from None


def _table(results: list, ids, id_column):
    """The chunk's output rows in input order (bad rows left out), ids beside them."""
    import numpy as np

    results.sort(key=lambda r: r[0])
    names = list(results[0][2]) if results else []
    columns = {name: np.concatenate([r[2][name] for r in results]) for name in names}
    chunk_ids = None
    if id_column is not None:
        kept = sum(n for _, n, _ in results)
        chunk_ids = ids if kept == len(ids) else ids.take(np.concatenate(
            [np.arange(start, start + n) for start, n, _ in results] or [np.arange(0)]))
    return output_table(id_column, chunk_ids, columns)


def _one_line(error: BaseException) -> str:
    text = str(error).split("\n", 1)[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
