"""What predict returned, as output columns; the chunks' tables, as the output file.

    predict's result for a chunk of n rows:
        1-D array (n,)           -> column "output"
        2-D array (n, k)         -> columns "output_0" ... "output_{k-1}"
        dict {key: array}        -> a column per key (a 2-D value: key_0 ... key_{k-1})
        tuple/list of arrays     -> output_0, output_1, ... each as above
    preceded by the id column when there is one.

    OutputWriter: each chunk's table, in chunk order -> <output>.parts/output.tmp -> at
    the end fsync -> rename to <output> (as chunks finish: no second pass over the parts)
        .parquet  one row group per part      .csv    a header, then every part's rows
        .jsonl    one JSON object per row     .npy    (rows, columns) of one dtype, no ids
Every step is deterministic, so a resumed run writes the same bytes as one that never
stopped.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import OutputEncodeError
from ..tensors import output_items


class OutputError(ValueError):
    """predict returned something that cannot become output columns."""


def output_columns(result, rows: int) -> dict[str, np.ndarray]:
    try:
        items = output_items(result, single="output")
    except OutputEncodeError as exc:
        raise OutputError(str(exc)) from None
    columns = {}
    for name, value in items:
        if hasattr(value, "detach") and hasattr(value, "numpy"):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != rows:
            raise OutputError(f"output {name!r} has shape {array.shape} for a chunk of {rows} "
                              "rows; predict must return one row per input row")
        if array.ndim == 1:
            columns[name] = array
        elif array.ndim == 2:
            for j in range(array.shape[1]):
                columns[f"{name}_{j}"] = np.ascontiguousarray(array[:, j])
        else:
            raise OutputError(f"output {name!r} is {array.ndim}-D; give (rows,) or "
                              "(rows, k) arrays")
    return columns


def output_table(id_column: str | None, ids, columns: dict[str, np.ndarray]):
    import pyarrow as pa

    names, arrays = [], []
    if id_column is not None:
        names.append(id_column)
        arrays.append(ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids))
    for name, values in columns.items():
        names.append(name)
        arrays.append(pa.array(values))
    return pa.Table.from_arrays(arrays, names=names)


class OutputWriter:
    """The output, written table by table in chunk order under a temporary name, then
    fsynced and renamed into place by :meth:`finish` (:meth:`abort` deletes it). A .npy
    output is built from the parts by ``finish`` instead: its header needs the row count."""

    def __init__(self, output: str, output_format: str, temporary: str):
        self.output, self.format = output, output_format
        self.temporary = temporary  # in the parts directory: a killed run's is cleaned up
        self.writer = None
        self.rows = 0

    def append(self, table) -> None:
        if not table.num_rows or self.format == "npy":  # a chunk of only bad rows: none
            return
        if self.writer is None:
            self.writer = self._open(table.schema)
        if self.format == "jsonl":
            self.writer.write("".join(json.dumps(row, separators=(",", ":")) + "\n"
                                      for row in table.to_pylist()))
        else:
            self.writer.write_table(table)
        self.rows += table.num_rows

    def _open(self, schema):
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetWriter(self.temporary, schema)
        if self.format == "csv":
            import pyarrow.csv as pc

            return pc.CSVWriter(self.temporary, schema)
        return open(self.temporary, "w")

    def finish(self, parts: list[str]) -> int:
        """Close, fsync, rename into place; returns the rows written."""
        if self.format == "npy":
            self.rows = _write_npy(parts, self.temporary)
        elif self.writer is None:
            raise OutputError("no rows were scored")
        else:
            self.writer.close()
            self.writer = None
        with open(self.temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.temporary, self.output)
        return self.rows

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - it is being deleted anyway
                pass
            self.writer = None
        if os.path.exists(self.temporary):
            os.unlink(self.temporary)


def read_part(part: str):
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(part)).read_all()  # the table keeps the map


def _write_npy(parts: list[str], temporary: str) -> int:
    """A .npy header for every part's rows, then the parts' rows one part at a time."""
    tables = [t for t in map(read_part, parts) if t.num_rows]  # memory-mapped: not read yet
    if not tables:
        raise OutputError("no rows were scored")
    rows = sum(t.num_rows for t in tables)
    names = tables[0].column_names
    dtype = np.result_type(*[tables[0].column(n).type.to_pandas_dtype() for n in names])
    with open(temporary, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                 "fortran_order": False,
                                                 "shape": (rows, len(names))})
        for i, table in enumerate(tables):
            block = np.empty((table.num_rows, len(names)), dtype=dtype)
            for j, name in enumerate(names):
                block[:, j] = table.column(name).to_numpy()
            f.write(block.tobytes())
            tables[i] = None  # unmapped once written
    return rows
