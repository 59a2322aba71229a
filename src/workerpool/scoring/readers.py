"""Input files, streamed as chunks of exactly ``chunk_rows`` rows (the last may be shorter).

    .parquet  pyarrow.parquet, record batch by record batch (never the whole file)
    .csv      pyarrow.csv.open_csv, block by block
    .jsonl    pyarrow.json.open_json, block by block (one JSON object per line)
    .npy      np.load(mmap_mode="r"): a 2-D array (rows x features), sliced

A chunk is (rows, ids: a pyarrow Array or None, features): ``features`` is what predict gets, a 2-D array of the
chosen columns (``--columns`` in that order, else every column but the id column) in their
common dtype. Chunk boundaries depend only on the file and ``chunk_rows``, so a resumed run
cuts the same chunks and skips the ones already scored.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".npy": "npy"}


class InputError(ValueError):
    """An input that cannot be scored as asked; the message says what to change."""


def format_of(path: str) -> str:
    """parquet, csv, jsonl or npy, from the path's extension."""
    for extension, name in EXTENSIONS.items():
        if path.lower().endswith(extension):
            return name
    raise InputError(f"{path}: the format comes from the extension, one of "
                     f"{sorted(EXTENSIONS)}")


class Reader:
    """One input file. ``identity``: what a resumed run must find unchanged."""

    def __init__(self, path: str, columns: list[str] | None, id_column: str | None,
                 dtype=None):
        self.path = path
        self.dtype = np.dtype(dtype).name if dtype is not None else None
        self.format = format_of(path)
        stat = os.stat(path)
        self.identity = {"path": os.path.realpath(path), "size": stat.st_size,
                         "mtime_ns": stat.st_mtime_ns}
        self.id_column = id_column
        self.total_rows: int | None = None
        if self.format == "npy":
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
            if self.array.ndim != 2:
                raise InputError(f"{path}: a .npy input must be 2-D (rows x features), "
                                 f"not {self.array.shape}")
            if id_column is not None:
                raise InputError(f"{path}: a .npy input has no columns, so no "
                                 "--id-column; the output's rows are in input order")
            names = [str(i) for i in range(self.array.shape[1])]
            self.columns = _chosen(path, names, columns, None)
            self.indices = [int(c) for c in self.columns]
            self.total_rows = self.array.shape[0]
            return
        schema = self._schema()
        if id_column is not None and id_column not in schema.names:
            raise InputError(f"{path}: no id column {id_column!r}; it has {schema.names}")
        self.columns = _chosen(path, schema.names, columns, id_column)

    def _schema(self):
        if self.format == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(self.path)
            self.total_rows = meta.metadata.num_rows
            return meta.schema_arrow
        reader = self._stream()
        try:
            return reader.schema
        finally:
            reader.close()

    def _stream(self):
        if self.format == "csv":
            import pyarrow.csv as pc

            return pc.open_csv(self.path, read_options=pc.ReadOptions(block_size=1 << 22))
        import pyarrow.json as pj

        return pj.open_json(self.path, read_options=pj.ReadOptions(block_size=1 << 22))

    def chunks(self, chunk_rows: int, skip=frozenset()) -> Iterator[tuple]:
        """(rows, ids, features) for each chunk, in input order; for the chunk numbers in
        ``skip`` (done by an earlier run) only their row count: (rows, None, None)."""
        if self.format == "npy":
            for index, start in enumerate(range(0, self.total_rows, chunk_rows)):
                rows = min(chunk_rows, self.total_rows - start)
                if index in skip:
                    yield rows, None, None
                    continue
                yield rows, None, np.ascontiguousarray(
                    self.array[start:start + rows][:, self.indices], dtype=self.dtype)
                self._release(start + rows)
            return
        wanted = self.columns + ([self.id_column] if self.id_column else [])
        for index, table in enumerate(_rechunked(self._batches(wanted), chunk_rows)):
            if index in skip:
                yield table.num_rows, None, None
                continue
            ids = table.column(self.id_column).combine_chunks() if self.id_column else None
            yield table.num_rows, ids, _features(self.path, table, self.columns, self.dtype)

    def _release(self, rows: int) -> None:
        """Drop the mapped pages of rows already read from this process's RSS (they stay
        in the page cache): a mapped input would otherwise grow RSS to the file's size."""
        mapping = getattr(self.array, "_mmap", None)
        if mapping is None or not hasattr(mapping, "madvise"):
            return
        end = self.array.offset + rows * self.array.strides[0]
        end -= end % mmap.PAGESIZE
        if end > 0:
            mapping.madvise(mmap.MADV_DONTNEED, 0, min(end, len(mapping)))

    def _batches(self, columns: list[str]):
        if self.format == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(self.path).iter_batches(batch_size=65536,
                                                             columns=columns)
            return
        reader = self._stream()
        try:
            for batch in reader:
                yield batch.select(columns)
        finally:
            reader.close()


def _chosen(path: str, names: list[str], columns: list[str] | None,
            id_column: str | None) -> list[str]:
    if columns is None:
        chosen = [n for n in names if n != id_column]
    else:
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"{path}: no columns {missing}; it has {names}")
        chosen = list(columns)
    if not chosen:
        raise InputError(f"{path}: no feature columns to score")
    return chosen


def _rechunked(batches, chunk_rows: int):
    """pyarrow record batches regrouped into tables of exactly ``chunk_rows`` rows."""
    import pyarrow as pa

    pending, rows = [], 0
    for batch in batches:
        while batch.num_rows:
            take = min(chunk_rows - rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            rows += take
            batch = batch.slice(take)
            if rows == chunk_rows:
                yield pa.Table.from_batches(pending)
                pending, rows = [], 0
    if rows:
        yield pa.Table.from_batches(pending)


def _features(path: str, table, columns: list[str], dtype) -> np.ndarray:
    arrays = []
    for name in columns:
        column = table.column(name)
        if column.null_count:
            raise InputError(f"{path}: column {name!r} has {column.null_count} empty values "
                             "in this chunk; fill them before scoring")
        arrays.append(column.to_numpy())
    dtype = dtype or np.result_type(*arrays)
    out = np.empty((table.num_rows, len(arrays)), dtype=dtype)
    for i, array in enumerate(arrays):
        out[:, i] = array
    return out
