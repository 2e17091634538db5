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
        # (``index add`` reads the index's embeddings.npy in pieces between new shards' files).
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


class _Spill:
    """Buffered appends of rows into the cells of one split."""

    def __init__(self, root: Path, k: int) -> None:
        self.dirs = [root / f"{c:04d}" for c in range(k)]
        self.buffers: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(k)]
        self.sizes = [0] * k
        self.total = 0

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
        self.dirs[c].mkdir(parents=True, exist_ok=True)
        for name, column in (("pos.bin", 0), ("vec.bin", 1), ("home.bin", 2)):
            with open(self.dirs[c] / name, "ab") as fh:
                for part in parts:
                    fh.write(np.ascontiguousarray(part[column]).tobytes())
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
    edge_dir.mkdir(parents=True)
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
    )
    try:
        _search(_SourceCell(vectors), run, work_dir / "cells", depth=0)
        i, j, score = _merge_edges(edge_dir, n)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
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
            seconds={k: round(v, 3) for k, v in run.seconds.items()},
        )
    edges = Edges(row_of[i], row_of[j], score, np.full(i.shape[0], int(Signal.EMBEDDING), np.int8))
    return edges, counts


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
    children = _split(cell, k, run, root / f"d{depth}")
    for child in children:
        if child.n == 0:
            continue
        if child.n >= cell.n * 0.9:  # a split that cannot shrink it (all alike): search it as is
            _search_in_memory(child, run)
        else:
            _search(child, run, child.directory, depth + 1)
        shutil.rmtree(child.directory, ignore_errors=True)


def _split(cell: _Cell, k: int, run: _Run, root: Path) -> list[_DiskCell]:
    """Regroup ``cell`` on disk into ``k`` cells by soft assignment to k-means centroids."""
    s = run.settings
    rng = np.random.default_rng(s.seed + run.cells)
    run.cells += 1
    t0 = time.perf_counter()
    centroids = _kmeans(cell.sample(k * s.sample_per_centroid, rng), k, s, seed=s.seed + run.cells)
    gaps = _distances(centroids)
    k = centroids.shape[0]
    t1 = time.perf_counter()
    run.tick("split k-means", t1 - t0)
    spill = _Spill(root, k)
    for pos, raw, home in cell.blocks(_BLOCK_ROWS):
        r, c, best = _assign(unit32(raw), centroids, gaps, run.width, s.max_assign)
        order = np.argsort(c, kind="stable")
        r, c, best = r[order], c[order], best[order]
        bounds = np.searchsorted(c, np.arange(k + 1))
        for cc in range(k):
            lo, hi = int(bounds[cc]), int(bounds[cc + 1])
            if lo == hi:
                continue
            sel = r[lo:hi]
            spill.add(cc, pos[sel], raw[sel], home[sel] & best[lo:hi])
    spill.close()
    run.tick("split assign + spill", time.perf_counter() - t1)
    children = [_DiskCell(d, cell.dim, cell.storage_dtype) for d in spill.dirs]
    run.split_in += cell.n
    run.split_out += sum(c.n for c in children)
    return children


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
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, edges[first])
        os.replace(tmp, path)
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
