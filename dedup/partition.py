"""Partitioned range search: every pair at or above a threshold among more vectors than one exact
pass can afford, in memory that does not grow with N.

::

    vectors (per-shard .npy, read a block at a time)
      ─► spherical k-means on a sample ─► every vector to its nearest centroid, and to any other
         centroid near enough (soft borders) ─► regrouped on disk, one cell per centroid
         (cells of ~cell_partitions partitions; a cell over cell_rows is split again)
      ─► per cell, in memory: spherical k-means again, into partitions of ~``partition_size``
         (soft borders again) ─► exact range search inside each partition (one matrix product)
      ─► edges spilled per cell (``.npy`` parts) ─► merged: each pair once, scores exact

Why soft borders keep the pairs: two unit vectors at cosine ``>= T`` lie within
``delta = sqrt(2 - 2T)`` of each other, so their distances to the bisector of two centroids
differ by at most ``delta``. A vector also joins every centroid whose bisector with its nearest
one is within ``margin * delta``: a pair is lost only if each member lies beyond that on its
own side. ``margin = 0.5`` makes that impossible (exact, and costly); pairs whose difference
points in a random direction differ by ~``delta / sqrt(dim)`` along any bisector normal, so far
less suffices: ``bench/scale.py`` measures the recall of the default against brute force.

Cost: a cell holds at most ``cell_rows`` vectors, so memory is bounded by the settings, not by N
(the per-row arrays kept across the whole search are a few bytes a row). Each level of on-disk
splitting costs ``N * branching * dim`` and rewrites the vectors once; there are
``log(N / cell_rows)`` of them beyond the first. Inside the cells the searches cost
``N * r * partition_size * dim``, ``r`` being the copies soft borders add: 1.08 on
bench/scale.py's vectors at 1M, 1.9 at 10M, where its featureless sub-topics must be cut into
several partitions each. So the whole search grows like N log N.

Counts for the report at levels below the search threshold (0.5 for the paper's "copy" level)
are an approximation here: a pair is counted only in the home partition of its first row (the
one its nearest centroids lead to, at every level), so it is counted at most once, and it is
missed when its other row is not in that partition (the margins are sized for the threshold, not
for 0.5): a lower bound (~99% of the exact count on bench/scale.py's vectors). Levels at or
above the threshold come from the merged edges and are exact up to recall.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from dedup._io import output_error
from dedup.search import Edges, Signal

Progress = Callable[[int], object]

_EDGE_DTYPE = np.dtype([("i", "<i8"), ("j", "<i8"), ("score", "<f4")])
_BLOCK_ROWS = 32_768  # rows per streamed block (assignment, spilling)
_MAX_SIM_ELEMENTS = 1 << 24  # one similarity matrix block: 64 MiB of float32
_SPILL_FLUSH_BYTES = 8 << 20  # per cell buffer before it is appended to disk
_SPILL_TOTAL_BYTES = 256 << 20  # all cell buffers together


def unit32(raw: np.ndarray) -> np.ndarray:
    """Rows as float32 unit vectors. float32 rows are taken as stored (they were normalised when
    written); float16 rows are widened and renormalised, so every reader computes the same
    float32 values from the same stored bytes (rows of zeros stay zero)."""
    if raw.dtype == np.float32:
        return np.ascontiguousarray(raw)
    x = np.asarray(raw, dtype=np.float32)
    for start in range(0, x.shape[0], 65_536):
        block = x[start : start + 65_536]
        norm = np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
        np.divide(block, norm, out=block, where=norm > 0)
    return x


class VectorFiles:
    """The rows of several ``.npy`` files (one per shard) as one read-only matrix, never loaded
    whole: :meth:`blocks` streams it, :meth:`take` gathers rows. Each read maps the file
    (``np.load(mmap_mode="r")``), copies what it needs and unmaps again, so the pages read do not
    stay in this process's resident memory.

    Rows come out as float32 unit vectors (:func:`unit32`). ``np.asarray`` works and
    materialises everything: fine for small inputs, and what consumers that need one array get.
    """

    def __init__(self, paths: Sequence[Path | tuple[Path, int, int]]) -> None:
        # Each item: a whole file, or ``(path, start, stop)``: rows start..stop-1 of one file
        # (``index add`` reads the index's vector parts and the new shards' checkpoints this way).
        self.paths: list[Path] = []
        self.starts: list[int] = []
        self.dtypes: list[np.dtype[Any]] = []
        counts: list[int] = []
        dims: set[int] = set()
        dtypes: set[np.dtype[Any]] = set()
        for item in paths:
            path, start, stop = (Path(item[0]), int(item[1]), int(item[2])) if isinstance(item, tuple) else (Path(item), 0, -1)
            shape, dtype = _npy_shape(path)
            if len(shape) != 2 or shape[0] == 0:
                continue
            stop = int(shape[0]) if stop < 0 else min(stop, int(shape[0]))
            if stop <= start:
                continue
            self.paths.append(path)
            self.dtypes.append(np.dtype(dtype))
            self.starts.append(start)
            counts.append(stop - start)
            dims.add(int(shape[1]))
            dtypes.add(dtype)
        if len(dims) > 1:
            raise ValueError(f"embedding files disagree on the dimension: {sorted(dims)}")
        self.dim = dims.pop() if dims else 0
        # float16 only when every file is float16; otherwise spills widen to float32.
        self.storage_dtype: np.dtype[Any] = np.dtype(np.float16) if dtypes == {np.dtype(np.float16)} else np.dtype(np.float32)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), self.dim

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def raw_blocks(self, block_rows: int = _BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows as stored)`` blocks, in order; a block never spans two files."""
        for f, path in enumerate(self.paths):
            base = int(self.offsets[f])
            count = int(self.offsets[f + 1]) - base
            first = self.starts[f]
            for start in range(0, count, block_rows):
                stop = min(count, start + block_rows)
                mm = np.load(path, mmap_mode="r")
                block = self._stored(mm[first + start : first + stop], f)
                del mm
                yield base + start, block

    def _stored(self, raw: np.ndarray, f: int) -> np.ndarray:
        """Rows of file ``f`` in the storage dtype. A float16 file among float32 ones is
        widened through :func:`unit32` (renormalised, as when it is read alone), since float32
        rows are taken as stored: the same stored bytes give the same vectors either way."""
        if self.dtypes[f] != self.storage_dtype and self.storage_dtype == np.float32:
            return unit32(np.asarray(raw))
        return np.array(raw, dtype=self.storage_dtype)

    def blocks(self, block_rows: int = _BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 unit rows)`` blocks, in order."""
        for start, raw in self.raw_blocks(block_rows):
            yield start, unit32(raw)

    def take_raw(self, rows: np.ndarray) -> np.ndarray:
        """Rows (any order, repeats allowed) as stored."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((rows.shape[0], self.dim), self.storage_dtype)
        if rows.size == 0:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError("row out of range")
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for f in np.unique(which):
            sel = np.flatnonzero(which == f)
            mm = np.load(self.paths[int(f)], mmap_mode="r")
            out[sel] = self._stored(mm[rows[sel] - self.offsets[f] + self.starts[int(f)]], int(f))
            del mm
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (any order) as float32 unit vectors."""
        return unit32(self.take_raw(rows))

    def __getitem__(self, key: Any) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            return self.take(np.arange(n, dtype=np.int64)[key])
        if isinstance(key, int | np.integer):
            return self.take(np.array([int(key) % n if n else 0]))[0]
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return self.take(rows)

    def write_npy(self, fh: Any, dtype: Any = np.float32) -> None:
        """Write every row into the open binary file ``fh`` as one ``.npy`` (float32 unit rows
        by default), a block at a time: memory holds one block, never the matrix."""
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": self.shape}
        )
        fh.write(buf.getvalue())
        for _, block in self.blocks():
            fh.write(np.ascontiguousarray(block, dtype).tobytes())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        for start, block in self.blocks():
            out[start : start + block.shape[0]] = block
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"VectorFiles({len(self.paths)} files, shape={self.shape}, stored as {self.storage_dtype})"


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an ``.npy`` header (an empty array cannot be memory-mapped)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return tuple(int(d) for d in shape), np.dtype(dtype)


@dataclass(frozen=True, slots=True)
class PartitionSettings:
    """How :func:`partitioned_edges` cuts the vectors. The defaults are what ``bench/scale.py``
    measured as the best trade-off on a 2-core machine; recall comes from ``margin``."""

    partition_size: int = 1024  # vectors per partition searched exactly (one matrix product)
    cell_partitions: int = 8  # partitions per cell of the first on-disk split
    cell_rows: int = 1 << 20  # most vectors in memory at once (as stored); more are split again
    # Soft borders: a vector also joins every centroid whose bisector with its nearest centroid
    # is closer than ``margin * sqrt(2 - 2 * threshold)`` (the farthest two vectors at the
    # threshold can be apart). 0.5 guarantees every pair shares a partition (and replicates a
    # lot); pairs that differ in a random direction need far less.
    margin: float = 0.08
    max_assign: int = 8  # at most this many centroids per vector and level
    branching: int = 512  # at most this many cells per on-disk split
    sample_per_centroid: int = 64  # k-means training points per centroid
    niter: int = 12  # k-means iterations
    seed: int = 1234
    # Scratch on disk (regrouped cells, their assignments, edge parts) at most this many times
    # the input vectors' own bytes as stored: a split whose cells would hold more is written and
    # searched in several passes over its input, each pass a range of its cells.
    scratch_ratio: float = 1.0


class _Cell(Protocol):
    n: int
    dim: int
    storage_dtype: np.dtype[Any]

    def blocks(self, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...
    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray: ...
    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class _SourceCell:
    """The whole input: positions ``0..n-1``, every row on its home path."""

    def __init__(self, source: VectorFiles | np.ndarray) -> None:
        self.source = source
        self.n, self.dim = int(source.shape[0]), int(source.shape[1])
        if isinstance(source, VectorFiles):
            self.storage_dtype = source.storage_dtype
        else:
            self.storage_dtype = np.dtype(np.float16) if source.dtype == np.float16 else np.dtype(np.float32)

    def _raw(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        if isinstance(self.source, VectorFiles):
            yield from self.source.raw_blocks(block_rows)
        else:
            for start in range(0, self.n, block_rows):
                yield start, np.asarray(self.source[start : start + block_rows], self.storage_dtype)

    def blocks(self, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start, raw in self._raw(block_rows):
            m = raw.shape[0]
            yield np.arange(start, start + m, dtype=np.int64), raw, np.ones(m, bool)

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        rows = np.sort(rng.choice(self.n, size=min(m, self.n), replace=False))
        if isinstance(self.source, VectorFiles):
            return self.source.take(rows)
        return unit32(np.asarray(self.source[rows], self.storage_dtype))

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raw = np.empty((self.n, self.dim), self.storage_dtype)
        for start, block in self._raw(_BLOCK_ROWS):
            raw[start : start + block.shape[0]] = block
        return np.arange(self.n, dtype=np.int64), raw, np.ones(self.n, bool)


class _DiskCell:
    """Rows regrouped on disk by a split: positions, rows as stored, and the home-path flag."""

    def __init__(self, directory: Path, dim: int, storage_dtype: np.dtype[Any]) -> None:
        self.directory = directory
        self.dim = dim
        self.storage_dtype = storage_dtype
        pos = directory / "pos.bin"
        self.n = pos.stat().st_size // 8 if pos.exists() else 0

    def _read(self, name: str, dtype: np.dtype[Any], start: int, count: int, width: int = 1) -> np.ndarray:
        with open(self.directory / name, "rb") as fh:
            fh.seek(start * width * dtype.itemsize)
            out = np.fromfile(fh, dtype=dtype, count=count * width)
        return out.reshape(count, width) if width > 1 else out

    def blocks(self, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, self.n, block_rows):
            m = min(self.n, start + block_rows) - start
            yield (
                self._read("pos.bin", np.dtype(np.int64), start, m),
                self._read("vec.bin", self.storage_dtype, start, m, self.dim),
                self._read("home.bin", np.dtype(np.bool_), start, m),
            )

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        rows = np.sort(rng.choice(self.n, size=min(m, self.n), replace=False))
        mm = np.memmap(self.directory / "vec.bin", dtype=self.storage_dtype, mode="r", shape=(self.n, self.dim))
        raw = np.array(mm[rows])
        del mm
        return unit32(raw)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            self._read("pos.bin", np.dtype(np.int64), 0, self.n),
            self._read("vec.bin", self.storage_dtype, 0, self.n, self.dim),
            self._read("home.bin", np.dtype(np.bool_), 0, self.n),
        )


class _Scratch:
    """The bytes the search holds on disk now, their peak, and the budget they must stay under;
    every write there goes through :meth:`write`, so a full disk is an OutputError naming the
    file, not a traceback."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self.peak = 0
        self.written = 0

    def grew(self, nbytes: int) -> None:
        self.held += nbytes
        self.written += nbytes
        self.peak = max(self.peak, self.held)

    def write(self, path: Path, chunks: Sequence[bytes | memoryview | np.ndarray], *, append: bool) -> None:
        """Write (or append) ``chunks`` to ``path``."""
        nbytes = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab" if append else "wb") as fh:
                for chunk in chunks:
                    data = chunk.tobytes() if isinstance(chunk, np.ndarray) else chunk
                    fh.write(data)
                    nbytes += len(data)
        except OSError as err:
            raise _scratch_error(err, path) from err
        finally:
            self.grew(nbytes)

    def remove(self, path: Path) -> None:
        """Delete a file or folder of scratch, and stop counting its bytes."""
        if not path.exists():
            return
        if path.is_dir():
            for parent, _, names in os.walk(path):
                for name in names:
                    with contextlib.suppress(OSError):
                        self.held -= os.stat(os.path.join(parent, name)).st_size
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                self.held -= path.stat().st_size
                path.unlink()


def _scratch_error(err: OSError, path: Path) -> Exception:
    """An OutputError for a full disk (or quota, read-only...) under the search's scratch
    folder; any other error unchanged, with the path it concerns."""
    translated = output_error(err, path, hint=SCRATCH_HINT)
    if translated is not None:
        return translated
    return OSError(err.errno, err.strerror, str(path)) if not err.filename else err


SCRATCH_HINT = (
    "free space, or give scratch another disk with --work DIR, then rerun the same command: "
    "finished shards are kept and resumed"
)


class _Spill:
    """Buffered appends of rows into the cells of one split (those of one pass)."""

    def __init__(self, root: Path, k: int, scratch: _Scratch) -> None:
        self.dirs = [root / f"{c:04d}" for c in range(k)]
        self.buffers: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(k)]
        self.sizes = [0] * k
        self.total = 0
        self.scratch = scratch

    def add(self, c: int, pos: np.ndarray, raw: np.ndarray, home: np.ndarray) -> None:
        self.buffers[c].append((pos, raw, home))
        nbytes = pos.nbytes + raw.nbytes + home.nbytes
        self.sizes[c] += nbytes
        self.total += nbytes
        if self.sizes[c] >= _SPILL_FLUSH_BYTES:
            self.flush(c)
        if self.total >= _SPILL_TOTAL_BYTES:
            for other in range(len(self.dirs)):
                self.flush(other)

    def flush(self, c: int) -> None:
        parts = self.buffers[c]
        if not parts:
            return
        for name, column in (("pos.bin", 0), ("vec.bin", 1), ("home.bin", 2)):
            self.scratch.write(self.dirs[c] / name, [np.ascontiguousarray(part[column]) for part in parts], append=True)
        self.total -= self.sizes[c]
        self.sizes[c] = 0
        parts.clear()

    def close(self) -> None:
        for c in range(len(self.dirs)):
            self.flush(c)


@dataclass
class _Run:
    """What one search accumulates: settings, where edges go, the approximate low-level counts."""

    threshold: float
    low: float
    sub_levels: list[float]
    width: float  # soft-border half-width, in distance to the bisector
    settings: PartitionSettings
    edge_dir: Path
    n: int
    progress: Progress | None
    sub_pairs: dict[float, int]
    sub_samples: dict[float, np.ndarray]
    cells: int = 0
    partitions: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # where the time went, per phase
    products: int = 0  # sum of partition sizes squared: what the exact searches cost
    assigned: int = 0  # vectors placed in partitions, counting soft-border copies
    largest: int = 0
    split_in: int = 0  # rows into on-disk splits
    split_out: int = 0  # rows out of them (soft-border copies included)
    passes: int = 0  # passes over the inputs of on-disk splits (one per split when scratch allows)
    scratch: _Scratch = field(default_factory=lambda: _Scratch(0))

    def tick(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def partitioned_edges(
    vectors: VectorFiles | np.ndarray,
    *,
    threshold: float,
    work_dir: Path,
    rows: np.ndarray | None = None,
    count_at: Sequence[float] = (),
    settings: PartitionSettings | None = None,
    progress: Progress | None = None,
    stats: dict[str, Any] | None = None,
) -> tuple[Edges, dict[float, tuple[int, int]]]:
    """All pairs with cosine ``>= threshold`` among unit ``vectors`` (as
    :func:`dedup.search.embedding_edges`, up to the recall soft borders give), searched
    partition by partition. ``work_dir`` receives the regrouped vectors and the edge parts and is
    emptied first and removed at the end. ``rows`` maps positions to global row numbers.

    Returns the edges (each pair once, ``i < j``, sorted) and, per level in ``count_at``,
    ``(pairs, samples with such a neighbour)``: exact for levels at or above ``threshold``, a
    lower bound below it (see the module docstring). ``stats``, when given, receives how the
    search was cut (cells, partitions, replication).
    """
    s = settings or PartitionSettings()
    n, _ = int(vectors.shape[0]), int(vectors.shape[1])
    row_of = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    levels = sorted({float(t) for t in count_at})
    sub_levels = [t for t in levels if t < threshold]
    low = min([threshold, *levels])
    if n < 2:
        return Edges.empty(), {t: (0, 0) for t in levels}
    shutil.rmtree(work_dir, ignore_errors=True)
    edge_dir = work_dir / "edges"
    try:
        edge_dir.mkdir(parents=True)
    except OSError as err:
        raise _scratch_error(err, edge_dir) from err
    run = _Run(
        threshold=float(threshold),
        low=float(low),
        sub_levels=sub_levels,
        width=float(s.margin) * math.sqrt(max(0.0, 2.0 - 2.0 * float(threshold))),
        settings=s,
        edge_dir=edge_dir,
        n=n,
        progress=progress,
        sub_pairs={t: 0 for t in sub_levels},
        sub_samples={t: np.zeros(n, bool) for t in sub_levels},
        scratch=_Scratch(int(s.scratch_ratio * n * vectors.shape[1] * _storage_dtype(vectors).itemsize)),
    )
    try:
        _search(_SourceCell(vectors), run, work_dir / "cells", depth=0)
        i, j, score = _merge_edges(edge_dir, n)
    finally:
        run.scratch.remove(work_dir)
    counts: dict[float, tuple[int, int]] = {}
    for t in levels:
        if t >= threshold:
            hit = score >= t
            counts[t] = (int(hit.sum()), int(np.unique(np.concatenate([i[hit], j[hit]])).size))
        else:
            counts[t] = (run.sub_pairs[t], int(run.sub_samples[t].sum()))
    if stats is not None:
        stats.update(
            cells=run.cells,
            partitions=run.partitions,
            replication=round(run.assigned / n, 4),
            largest_partition=run.largest,
            work=round(run.products / n / max(1, s.partition_size), 4),
            split_replication=round(run.split_out / max(1, run.split_in), 4),
            split_passes=run.passes,
            scratch_peak_bytes=run.scratch.peak,
            scratch_written_bytes=run.scratch.written,
            scratch_budget_bytes=run.scratch.budget,
            seconds={k: round(v, 3) for k, v in run.seconds.items()},
        )
    edges = Edges(row_of[i], row_of[j], score, np.full(i.shape[0], int(Signal.EMBEDDING), np.int8))
    return edges, counts


def _storage_dtype(vectors: VectorFiles | np.ndarray) -> np.dtype[Any]:
    if isinstance(vectors, VectorFiles):
        return vectors.storage_dtype
    return np.dtype(np.float16) if vectors.dtype == np.float16 else np.dtype(np.float32)


def _search(cell: _Cell, run: _Run, root: Path, depth: int) -> None:
    s = run.settings
    target = s.cell_partitions * s.partition_size
    # The first split is by rows (many small cells, ~cell_partitions partitions each: measured
    # far fewer soft-border copies than a few large cells); deeper ones only by memory.
    too_big = cell.n > 2 * target if depth == 0 else cell.n > s.cell_rows
    if not too_big or depth >= 4:
        _search_in_memory(cell, run)
        return
    k = min(s.branching, max(2, math.ceil(cell.n / target)))
    for child in _split(cell, k, run, root / f"d{depth}"):
        if child.n >= cell.n * 0.9:  # a split that cannot shrink it (all alike): search it as is
            _search_in_memory(child, run)
        else:
            _search(child, run, child.directory, depth + 1)
        run.scratch.remove(child.directory)  # consumed: its rows (and its own split's) go


def _row_bytes(cell: _Cell) -> int:
    """Bytes a row takes in a spilled cell: position, vector as stored, home flag."""
    return 8 + cell.dim * cell.storage_dtype.itemsize + 1


_ASSIGN_DTYPE = np.dtype([("r", "<i4"), ("c", "<i4"), ("best", "?")])


def _split(cell: _Cell, k: int, run: _Run, root: Path) -> Iterator[_DiskCell]:
    """Regroup ``cell`` on disk into ``k`` cells by soft assignment to k-means centroids, and
    yield them one at a time (the caller searches each and deletes it).

    The cells are written in passes, each a range of them, so that scratch stays under its
    budget: the first pass reads the input, assigns every row, spills the cells of its range
    and keeps the assignments of the others (9 bytes a copy) for the later passes, which read
    the input again and spill only their own range. The first pass's range comes from the
    k-means sample's assignment (an estimate, with slack); the later ones from the true counts.
    A parent cell on disk is deleted once its last pass is spilled.
    """
    s = run.settings
    rng = np.random.default_rng(s.seed + run.cells)
    run.cells += 1
    t0 = time.perf_counter()
    sample = cell.sample(k * s.sample_per_centroid, rng)
    centroids = _kmeans(sample, k, s, seed=s.seed + run.cells)
    gaps = _distances(centroids)
    k = centroids.shape[0]
    row_bytes = _row_bytes(cell)
    # Estimated bytes per cell: the sample's soft assignment, scaled to the cell.
    _, est_c, _ = _assign(sample, centroids, gaps, run.width, s.max_assign)
    estimate = np.bincount(est_c, minlength=k) * (cell.n / max(1, sample.shape[0])) * row_bytes * 1.25
    del sample, est_c
    t1 = time.perf_counter()
    run.tick("split k-means", t1 - t0)
    parent = cell.directory if isinstance(cell, _DiskCell) else None
    # What this split may hold: the budget, less what is held already (other cells of the
    # levels above, edges), plus the parent's own rows once they go (after the last pass).
    room = _room(run, cell, row_bytes)
    ranges = _plan(estimate, room)
    first = ranges[0]
    single = len(ranges) == 1
    assign_dir = root / "assign"
    counts = np.zeros(k, np.int64)
    spill = _Spill(root, k, run.scratch)
    for b, (pos, raw, home) in enumerate(cell.blocks(_BLOCK_ROWS)):
        r, c, best = _assign(unit32(raw), centroids, gaps, run.width, s.max_assign)
        counts += np.bincount(c, minlength=k)
        if not single:  # the copies the later passes spill
            later = c >= first[1]
            rec = np.empty(int(later.sum()), _ASSIGN_DTYPE)
            rec["r"], rec["c"], rec["best"] = r[later], c[later], best[later]
            run.scratch.write(assign_dir / f"{b:06d}.bin", [rec], append=False)
        _spill_block(spill, pos, raw, home, r, c, best, k, first)
    spill.close()
    t2 = time.perf_counter()
    run.tick("split assign + spill", t2 - t1)
    run.split_in += cell.n
    run.split_out += int(counts.sum())
    run.passes += 1
    if single and parent is not None:
        _remove_rows(parent, run)
    yield from _children(spill, cell, first)
    if single:
        return
    # Later passes: the true sizes are known now; the cells of the first pass are gone.
    for lo, hi in _plan(counts * row_bytes, _room(run, cell, row_bytes), start=first[1]):
        t3 = time.perf_counter()
        spill = _Spill(root, k, run.scratch)
        for b, (pos, raw, home) in enumerate(cell.blocks(_BLOCK_ROWS)):
            path = assign_dir / f"{b:06d}.bin"
            rec = np.fromfile(path, dtype=_ASSIGN_DTYPE)
            mine = (rec["c"] >= lo) & (rec["c"] < hi)
            rec = rec[mine]
            _spill_block(spill, pos, raw, home, rec["r"].astype(np.int64), rec["c"].astype(np.int64), rec["best"], k, (lo, hi))
            if hi >= k:
                run.scratch.remove(path)  # the last pass has read it
        spill.close()
        run.passes += 1
        run.tick("split assign + spill", time.perf_counter() - t3)
        if hi >= k:
            run.scratch.remove(assign_dir)
            if parent is not None:
                _remove_rows(parent, run)
        yield from _children(spill, cell, (lo, hi))


def _room(run: _Run, cell: _Cell, row_bytes: int) -> int:
    """What a split may write per pass: the budget less what is held (the levels above, the
    edges). A nested split (a cell on disk too big for memory) may always write twice its own
    cell, or it would pass over its input once per child when the level above fills the
    budget: so the peak is the budget plus at most twice the largest cell split again."""
    room = max(0, run.scratch.budget - run.scratch.held)
    if isinstance(cell, _DiskCell):
        room = max(room, 2 * cell.n * row_bytes)
    return room


def _plan(nbytes: np.ndarray, room: int, *, start: int = 0) -> list[tuple[int, int]]:
    """Consecutive ranges of cells from ``start`` whose bytes fit ``room`` (at least one cell
    each, however large: a cell cannot be split across passes)."""
    k = nbytes.shape[0]
    out: list[tuple[int, int]] = []
    lo, used = start, 0.0
    for c in range(start, k):
        if c > lo and used + float(nbytes[c]) > room:
            out.append((lo, c))
            lo, used = c, 0.0
        used += float(nbytes[c])
    out.append((lo, k))
    return out


def _spill_block(
    spill: _Spill, pos: np.ndarray, raw: np.ndarray, home: np.ndarray,
    r: np.ndarray, c: np.ndarray, best: np.ndarray, k: int, span: tuple[int, int],
) -> None:  # fmt: skip
    """Append a block's copies whose cell is in ``span`` to their cells."""
    lo, hi = span
    order = np.argsort(c, kind="stable")
    r, c, best = r[order], c[order], best[order]
    bounds = np.searchsorted(c, np.arange(k + 1))
    for cc in range(lo, hi):
        a, b = int(bounds[cc]), int(bounds[cc + 1])
        if a == b:
            continue
        sel = r[a:b]
        spill.add(cc, pos[sel], raw[sel], home[sel] & best[a:b])


def _children(spill: _Spill, cell: _Cell, span: tuple[int, int]) -> Iterator[_DiskCell]:
    for c in range(*span):
        child = _DiskCell(spill.dirs[c], cell.dim, cell.storage_dtype)
        if child.n:
            yield child


def _remove_rows(directory: Path, run: _Run) -> None:
    """A split cell's own rows, once every pass has read them (its children stay)."""
    for name in ("pos.bin", "vec.bin", "home.bin"):
        run.scratch.remove(directory / name)


def _search_in_memory(cell: _Cell, run: _Run) -> None:
    s = run.settings
    t0 = time.perf_counter()
    # The cell stays as stored (float16: half the memory); rows are widened per block/partition.
    pos, raw, home = cell.load()
    n = raw.shape[0]
    t1 = time.perf_counter()
    run.tick("cell load", t1 - t0)
    k = max(1, round(n / s.partition_size))
    if k > 1:
        rng = np.random.default_rng(s.seed + 7919 * (run.cells + 1))
        sample = unit32(raw[np.sort(rng.choice(n, size=min(n, k * s.sample_per_centroid), replace=False))])
        centroids = _kmeans(sample, k, s, seed=s.seed + run.cells)
        del sample
        gaps = _distances(centroids)
        k = centroids.shape[0]
        parts = [
            _assign(unit32(raw[a : a + _BLOCK_ROWS]), centroids, gaps, run.width, s.max_assign)
            for a in range(0, n, _BLOCK_ROWS)
        ]
        member = np.concatenate([p[0] + a for p, a in zip(parts, range(0, n, _BLOCK_ROWS), strict=True)])
        part = np.concatenate([p[1] for p in parts])
        best = np.concatenate([p[2] for p in parts])
        del parts
        order = np.lexsort((member, part))
        member, part, best = member[order], part[order], best[order]
        bounds = np.searchsorted(part, np.arange(k + 1))
        run.tick("partition k-means + assign", time.perf_counter() - t1)
    else:
        member = np.arange(n, dtype=np.int64)
        best = np.ones(n, bool)
        bounds = np.array([0, n])
    at_home = home[member] & best
    run.cells += 1
    run.partitions += k
    run.assigned += int(member.shape[0])
    run.products += int(np.sum(np.diff(bounds).astype(np.int64) ** 2))
    t2 = time.perf_counter()
    found: list[np.ndarray] = []
    for p in range(k):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        run.largest = max(run.largest, hi - lo)
        if hi - lo < 2:
            continue
        idx = member[lo:hi]
        a, b, score = _pairs_within(unit32(raw[idx]), run.low)
        if a.size == 0:
            continue
        ga, gb = pos[idx[a]], pos[idx[b]]
        strong = score >= run.threshold
        if strong.any():
            e = np.empty(int(strong.sum()), _EDGE_DTYPE)
            e["i"] = np.minimum(ga[strong], gb[strong])
            e["j"] = np.maximum(ga[strong], gb[strong])
            e["score"] = score[strong]
            found.append(e)
        if run.sub_levels:
            # Counted once: in the home partition of the pair's first row (each row has one).
            h = at_home[lo:hi]
            mine = np.where(ga < gb, h[a], h[b])
            for t in run.sub_levels:
                hit = mine & (score >= t)
                run.sub_pairs[t] += int(hit.sum())
                run.sub_samples[t][ga[hit]] = True
                run.sub_samples[t][gb[hit]] = True
    run.tick("exact search", time.perf_counter() - t2)
    if found:
        edges = np.concatenate(found)
        _, first = np.unique(edges["i"] * run.n + edges["j"], return_index=True)
        path = run.edge_dir / f"part-{run.cells:06d}.npy"
        buf = io.BytesIO()
        np.save(buf, edges[first])
        run.scratch.write(path, [buf.getbuffer()], append=False)
    if run.progress is not None:
        run.progress(int(home.sum()))


def _pairs_within(x: np.ndarray, low: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``a < b`` of rows of ``x`` with inner product ``>= low``, and their scores."""
    m = x.shape[0]
    # Row blocks against the columns from the block on: the products skip most of the lower
    # triangle (4 blocks: 10/16 of the full product), and one block's matrix stays bounded.
    step = max(1, min(_MAX_SIM_ELEMENTS // max(1, m), -(-m // 4) if m >= 768 else m))
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    out_s: list[np.ndarray] = []
    for start in range(0, m, step):
        stop = min(m, start + step)
        sim = x[start:stop] @ x[start:].T  # the upper part only: columns from ``start`` on
        # flatnonzero is ~20x faster than a 2-D nonzero on this (mostly empty) mask
        flat = np.flatnonzero(sim >= low)
        a, b = np.divmod(flat, sim.shape[1])
        keep = b > a  # column b (offset by start) after row a: each pair once, no self-pairs
        a, b = a[keep], b[keep]
        out_s.append(sim[a, b])
        out_a.append(a + start)
        out_b.append(b + start)
    if len(out_a) == 1:
        return out_a[0], out_b[0], out_s[0]
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)


def _distances(centroids: np.ndarray) -> np.ndarray:
    """Euclidean distances between unit centroids."""
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (centroids @ centroids.T))).astype(np.float32)


def _assign(
    x: np.ndarray, centroids: np.ndarray, gaps: np.ndarray, width: float, cap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft assignment: ``(row, centroid, is_nearest)`` for every centroid each row joins.

    A row joins centroid ``c`` when its distance to the bisector of ``c`` and its nearest
    centroid, ``(sim_nearest - sim_c) / |nearest - c|``, is at most ``width``; among its ``cap``
    most similar centroids (faiss keeps those per row: ~2x faster than masking every centroid).
    """
    k = centroids.shape[0]
    top = min(cap, k)
    sim, idx = faiss.knn(np.ascontiguousarray(x, np.float32), centroids, top, metric=faiss.METRIC_INNER_PRODUCT)
    nearest = idx[:, :1]
    join = sim >= sim[:, :1] - width * gaps[nearest, idx]
    r, j = np.divmod(np.flatnonzero(join), top)
    return r, idx[r, j].astype(np.int64), j == 0


def _kmeans(sample: np.ndarray, k: int, s: PartitionSettings, *, seed: int) -> np.ndarray:
    """Spherical k-means centroids (unit rows); fewer than ``k`` when the sample is small."""
    k = max(1, min(k, sample.shape[0]))
    if k == 1:
        c = sample.mean(axis=0, keepdims=True)
        return (c / max(float(np.linalg.norm(c)), 1e-12)).astype(np.float32)
    km = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=s.niter,
        spherical=True,
        seed=seed,
        verbose=False,
        # the sample is sized on purpose; no warnings about too few / too many points
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,
    )
    km.train(np.ascontiguousarray(sample, np.float32))
    return np.ascontiguousarray(km.centroids, np.float32)


def _merge_edges(edge_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All edge parts, each pair once (the first part's score), sorted by ``(i, j)``."""
    parts = [np.load(p) for p in sorted(edge_dir.glob("part-*.npy"))]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    edges = np.concatenate(parts)
    del parts
    _, first = np.unique(edges["i"] * n + edges["j"], return_index=True)
    edges = edges[first]
    return np.ascontiguousarray(edges["i"]), np.ascontiguousarray(edges["j"]), np.ascontiguousarray(edges["score"])


def auto_settings(n: int, *, partitions: int = 0, margin: float | None = None) -> PartitionSettings:
    """Settings for ``n`` vectors: ``partitions`` > 0 fixes the total partition count (their size
    follows); ``margin`` overrides the soft-border width."""
    s = PartitionSettings()
    changes: dict[str, Any] = {}
    if partitions > 0:
        changes["partition_size"] = max(16, math.ceil(n / partitions))
    if margin is not None and margin >= 0:
        changes["margin"] = float(margin)
    if not changes:
        return s
    from dataclasses import replace

    return replace(s, **changes)
