"""The feature rows of a run, read a column or a row group at a time.

The global stage (search, cluster, select, outputs) needs every row, but never every column of
every row at once: the search needs a few flags, the keep policy sizes, the manifest its sample
columns one row group at a time. :class:`FeatureRows` gives that access over either an
in-memory table (``index add``, ``check``) or the per-shard checkpoint files of a run, which
then stay on disk: the features table (~320 bytes a row for precomputed embeddings, hash
columns included) is never held whole.

Every writer of a per-row output takes its rows from :meth:`FeatureRows.batches`: consecutive
slices of exactly ``ROW_GROUP_ROWS`` rows (the last one shorter), one chunk per column. Parquet
pages follow chunk boundaries, so the bytes written depend on the rows alone, not on where
they were read from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["ROW_GROUP_ROWS", "FeatureRows", "as_rows", "rechunk"]

ROW_GROUP_ROWS = 1 << 20  # pyarrow's default row group; the manifest's row group


def rechunk(tables: Iterable[pa.Table], size: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
    """Consecutive slices of exactly ``size`` rows of the concatenated ``tables`` (the last one
    shorter), each column in one chunk. Memory holds the tables a slice spans plus the slice:
    a slice's rows are copied once, the rest stays a view of the tables read."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        if table.num_rows == 0:
            continue
        pending.append(table)
        held += table.num_rows
        while held >= size:
            head: list[pa.Table] = []
            need = size
            while need:
                first = pending[0]
                if first.num_rows <= need:
                    head.append(pending.pop(0))
                    need -= first.num_rows
                else:
                    head.append(first.slice(0, need))
                    pending[0] = first.slice(need)
                    need = 0
            held -= size
            yield _combine(head)
    if held:
        yield _combine(pending)


def _combine(tables: Sequence[pa.Table]) -> pa.Table:
    """One table of one chunk per column; a column null throughout stays lazily zeroed."""
    first = tables[0]
    n = sum(t.num_rows for t in tables)
    columns = []
    for k, field in enumerate(first.schema):
        parts = [t.column(k) for t in tables]
        if all(p.null_count == len(p) for p in parts):
            columns.append(null_array(field.type, n))
        else:
            columns.append(pa.chunked_array([c for p in parts for c in p.chunks], type=field.type).combine_chunks())
    return pa.Table.from_arrays(columns, schema=first.schema)


def null_array(kind: pa.DataType, n: int) -> pa.Array:
    """``n`` nulls of ``kind``. Fixed-width types get their value buffer from ``np.zeros``,
    which the kernel maps lazily: a column of empty 32- or 224-byte hashes costs no memory
    until written to (pa.nulls would fill it)."""
    width = getattr(kind, "byte_width", None) if pa.types.is_fixed_size_binary(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind) else None
    if not width or n == 0:
        return pa.nulls(n, kind)
    validity = pa.py_buffer(np.zeros((n + 7) // 8, np.uint8))
    values = pa.py_buffer(np.zeros(n * width, np.uint8))
    return pa.Array.from_buffers(kind, n, [validity, values], null_count=n)


class FeatureRows:
    """Rows of :data:`dedup.featurize.SCHEMA` in index order, from tables and/or parquet files.

    ``parts`` are in-memory tables or paths of parquet files (a run's per-shard checkpoints),
    read with ``schema`` (columns cast to it). Files are opened only when a column or a row
    group is asked for, and only the columns asked for are read.
    """

    def __init__(self, parts: Sequence[pa.Table | Path], schema: pa.Schema) -> None:
        self.schema = schema
        self.parts: list[pa.Table | Path] = []
        counts: list[int] = []
        for part in parts:
            if isinstance(part, pa.Table):
                n = part.num_rows
            else:
                n = pq.ParquetFile(part).metadata.num_rows
            if n:
                self.parts.append(part)
                counts.append(n)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        # Values laid over a column at some rows (sorted global rows, the values): what the
        # global stage learnt after the checkpoints were written (dedup.pixels' pixel hashes).
        self.overlays: dict[str, tuple[np.ndarray, pa.Array]] = {}

    def with_values(self, column: str, rows: np.ndarray, values: pa.Array) -> FeatureRows:
        """These rows with ``values`` in ``column`` at the global ``rows`` (no file is touched)."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        out = FeatureRows.__new__(FeatureRows)
        out.schema, out.parts, out.offsets = self.schema, list(self.parts), self.offsets
        out.overlays = dict(self.overlays)
        if column in out.overlays:  # the new values win where both name a row
            old_rows, old_values = out.overlays[column]
            keep = ~np.isin(old_rows, rows)
            rows = np.concatenate([old_rows[keep], rows])
            values = pa.concat_arrays([old_values.filter(pa.array(keep)), values.cast(old_values.type)])
            order = np.argsort(rows, kind="stable")
        out.overlays[column] = (rows[order], values.cast(self.schema.field(column).type).take(pa.array(order)))
        return out

    def _read_at(self, k: int, columns: Sequence[str]) -> pa.Table:
        """Part ``k``'s ``columns``, with the overlays laid over them."""
        table = self._read(self.parts[k], columns)
        for name in columns:
            if name not in self.overlays:
                continue
            rows, values = self.overlays[name]
            lo, hi = np.searchsorted(rows, [self.offsets[k], self.offsets[k + 1]])
            if lo == hi:
                continue
            mask = np.zeros(table.num_rows, bool)
            mask[rows[lo:hi] - self.offsets[k]] = True
            column = table.column(name).combine_chunks()
            at = table.schema.get_field_index(name)
            table = table.set_column(at, table.schema.field(name), pc.replace_with_mask(column, pa.array(mask), values.slice(lo, hi - lo)))
        return table

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def _read(self, part: pa.Table | Path, columns: Sequence[str]) -> pa.Table:
        if isinstance(part, pa.Table):
            return part.select(list(columns))
        schema = pa.schema([self.schema.field(c) for c in columns])
        # Columns the file's statistics say are all null (hashes of precomputed embeddings)
        # are not read: lazily zeroed nulls stand in (see null_array).
        # One open file for its footer and its columns: pq.read_table goes through
        # pyarrow.dataset, ~0.8 ms more a call, and the global stage reads ~30 times a part.
        file = pq.ParquetFile(part)
        n, empty = self._empty_columns(file.metadata)
        wanted = [c for c in columns if c not in empty]
        read = file.read(columns=wanted) if wanted else None
        arrays = [
            null_array(schema.field(c).type, n) if c in empty else read.column(c).cast(schema.field(c).type)  # type: ignore[union-attr]
            for c in columns
        ]
        return pa.Table.from_arrays(arrays, schema=schema)

    def _empty_columns(self, meta: pq.FileMetaData) -> tuple[int, set[str]]:
        """Rows of a file and the columns its statistics say are null in every row."""
        n = meta.num_rows
        empty: set[str] = set()
        for index, name in enumerate(meta.schema.names):
            if name not in self.schema.names:
                continue
            stats = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)]
            if all(st is not None and st.has_null_count for st in stats) and sum(st.null_count for st in stats) == n:
                empty.add(name)
        missing = set(self.schema.names) - set(meta.schema.names)  # a column the file predates
        return n, empty | missing

    def tables(self, columns: Sequence[str]) -> Iterator[pa.Table]:
        """Each part's ``columns``, in order (one part in memory at a time)."""
        for k in range(len(self.parts)):
            yield self._read_at(k, columns)

    def batches(self, columns: Sequence[str] | None = None, size: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
        """``columns`` (default: all) as consecutive slices of ``size`` rows; see :func:`rechunk`."""
        cols = list(self.schema.names if columns is None else columns)
        if self.num_rows == 0:
            yield pa.schema([self.schema.field(c) for c in cols]).empty_table()
            return
        yield from rechunk(self.tables(cols), size)

    def column(self, name: str) -> pa.ChunkedArray:
        """One whole column (one chunk per part)."""
        chunks = [t.column(0).combine_chunks() for t in self.tables([name])]
        return pa.chunked_array(chunks, type=self.schema.field(name).type)

    def flags(self, name: str) -> np.ndarray:
        """A boolean column as a numpy array (nulls are False)."""
        out = np.zeros(self.num_rows, bool)
        for k, t in enumerate(self.tables([name])):
            a = t.column(0).fill_null(False).to_numpy()
            out[self.offsets[k] : self.offsets[k + 1]] = a
        return out

    def equals(self, name: str, value: str) -> np.ndarray:
        """``column == value`` as a numpy array (nulls are False), with no Python objects per row."""
        out = np.zeros(self.num_rows, bool)
        for k, t in enumerate(self.tables([name])):
            a = pc.equal(t.column(0), pa.scalar(value, t.column(0).type)).fill_null(False).to_numpy()
            out[self.offsets[k] : self.offsets[k + 1]] = a
        return out

    def numbers(self, name: str, dtype: type = np.float64) -> np.ndarray:
        """A numeric column as a numpy array (nulls are NaN for floats)."""
        out = np.empty(self.num_rows, dtype)
        for k, t in enumerate(self.tables([name])):
            out[self.offsets[k] : self.offsets[k + 1]] = np.asarray(t.column(0).to_numpy(zero_copy_only=False), dtype)
        return out

    def null_count(self, name: str) -> int:
        """Nulls in a column, from the files' statistics where they have them."""
        total = 0
        if name in self.overlays:
            return sum(t.column(0).null_count for t in self.tables([name]))
        for part in self.parts:
            if isinstance(part, pa.Table):
                total += part.column(name).null_count
                continue
            meta = pq.ParquetFile(part).metadata
            index = meta.schema.names.index(name) if name in meta.schema.names else -1
            stats = [meta.row_group(g).column(index).statistics for g in range(meta.num_row_groups)] if index >= 0 else []
            if index >= 0 and all(s is not None and s.has_null_count for s in stats):
                total += sum(s.null_count for s in stats)
            else:
                total += self._read(part, [name]).column(0).null_count
        return total

    def take(self, columns: Sequence[str], rows: np.ndarray) -> pa.Table:
        """``columns`` of ``rows`` (sorted global row numbers), reading only the parts that hold them."""
        rows = np.asarray(rows, np.int64)
        cols = list(columns)
        if rows.size and np.any(rows[1:] < rows[:-1]):
            raise ValueError("rows must be sorted")
        pieces: list[pa.Table] = []
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for k in np.unique(which):
            sel = rows[which == k] - self.offsets[k]
            pieces.append(self._read_at(int(k), cols).take(pa.array(sel)))
        if not pieces:
            return pa.schema([self.schema.field(c) for c in cols]).empty_table()
        return pa.concat_tables(pieces).combine_chunks()

    def to_table(self) -> pa.Table:
        """Every row and column in memory (small inputs only)."""
        return pa.concat_tables(list(self.batches())).combine_chunks()


def as_rows(table: pa.Table | FeatureRows) -> FeatureRows:
    """``table`` as :class:`FeatureRows` (unchanged when it is one already)."""
    if isinstance(table, FeatureRows):
        return table
    return FeatureRows([table.combine_chunks()], table.schema)
