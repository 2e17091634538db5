"""Proposals for the second look: which pairs are worth re-reading.

Two kinds: **band** pairs, whose embedding scored in ``[search.verify_from, search.threshold)``
(each image's ``search.verify_per_image`` best), and **partial** pairs, where a region
descriptor of one image (a window of its feature map, :mod:`dedup.embed.regions`) came close to
another's whole-image embedding, by ``search.partial_margin`` more than the two whole images.
Region scores propose but never decide: geometry decides (:mod:`dedup.second_look.geometry`).
Pairs the direct links already join need no second look.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dedup.partition import VectorFiles
from dedup.search import Candidates, Edges, best_per_pair

__all__ = [
    "IVF_ABOVE",
    "RegionFiles",
    "band_candidates",
    "best_proposals",
    "fresh",
    "ivf_lists",
    "load_regions",
    "load_trims",
    "partial_candidates",
    "top_per_image",
    "whole_index",
]


def load_regions(paths: Sequence[Path]) -> np.ndarray | None:
    """The region descriptors of a run's shards, in row order (float16), or None when any
    shard has none (regions off, or features made before they were)."""
    return _load_per_row(paths)


def load_trims(paths: Sequence[Path]) -> np.ndarray | None:
    """The trim boxes of a run's embedded rows (``FeatureStep.trims_path``), in row order, or
    None when any shard has none (features made before they were kept): the second look then
    measures the margins of the re-read images itself."""
    return _load_per_row(paths)


def _load_per_row(paths: Sequence[Path]) -> np.ndarray | None:
    """One side array per embedded row over a run's shards (memory-mapped parts, joined), or None
    when a shard lacks its file or the parts disagree in shape."""
    parts: list[np.ndarray] = []
    for path in paths:
        if not path.is_file():
            return None
        parts.append(np.load(path, mmap_mode="r"))
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return None
    if len({p.shape[1:] for p in parts}) != 1:
        return None
    return np.concatenate(parts)


class RegionFiles:
    """The region descriptors of a run's shards (``FeatureStep.regions_path``, float16
    ``(n, windows, dim)`` per shard, in the row order of its embeddings), never concatenated:
    :meth:`blocks` memory-maps one file at a time and copies a block of rows out of it."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths: list[Path] = []
        counts: list[int] = []
        shapes: set[tuple[int, ...]] = set()
        for path in paths:
            shape = _npy_shape(path)
            if shape[0] == 0:
                continue
            self.paths.append(path)
            counts.append(int(shape[0]))
            shapes.add(tuple(shape[1:]))
        if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
            raise ValueError(f"region files disagree on their shape: {sorted(shapes)}")
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    @classmethod
    def of(cls, paths: Sequence[Path]) -> RegionFiles | None:
        """The files, or None when a shard has none (regions off, or features made before
        they were) or they disagree in shape."""
        if not all(p.is_file() for p in paths):
            return None
        try:
            files = cls(paths)
        except ValueError:
            return None
        return files if len(files) else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 regions (m, windows, dim))``, in order; never two files in one."""
        for f, path in enumerate(self.paths):
            base, count = int(self.offsets[f]), int(self.offsets[f + 1] - self.offsets[f])
            for start in range(0, count, block_rows):
                mm = np.load(path, mmap_mode="r")
                block = np.asarray(mm[start : start + block_rows], np.float32)
                del mm
                yield base + start, block


IVF_PROBE = 32  # cells each region visits when the whole images are in an inverted file
IVF_ABOVE = 10_000
"""Whole images (with an image and an embedding) above which the second look's index of them is
an inverted file (:func:`ivf_lists` cells) rather than flat, whatever ``search.partition_above``:
the partial proposals ask it with every window of every image (13 an image), so flat they cost
``13 N² dim``: more than 11 minutes at 20,000 images on the shared two-core machine (measured
at a load of ~10; killed), where the cells cut it by ``ivf_lists / IVF_PROBE`` (``docs/architecture.md``)."""


def ivf_lists(n: int) -> int:
    """Cells of the inverted file for ``n`` whole images: ~4 sqrt(n) (1,800 at 200,000)."""
    return int(4 * np.sqrt(max(n, 1)))


def _npy_shape(path: Path) -> tuple[int, ...]:
    """The shape in an ``.npy`` header (an empty array cannot be memory-mapped)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(fh)
    return tuple(int(d) for d in shape)


def whole_index(vectors: np.ndarray | VectorFiles, use: np.ndarray, *, lists: int = 0, probe: int = IVF_PROBE) -> Any:
    """A faiss index of the whole images (the embedded rows with an image, ``use``), in the order
    of ``use``'s true positions: exact (flat) with ``lists`` 0, else an inverted file of
    ``lists`` k-means cells (trained on a seeded sample, so its cells are the same run after
    run) of which a query visits its ``probe`` nearest. ``4 * dim`` bytes a row either way."""
    n = int(np.count_nonzero(use))
    dim = int(vectors.shape[1])
    lists = min(lists, n // 39)  # faiss wants ~39 training points a cell
    index: Any
    if lists > 1:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234  # the cells, and so the proposals, are the same run after run
        pick = np.sort(np.random.default_rng(1234).choice(n, size=min(n, 64 * lists), replace=False))
        emb_pick = np.flatnonzero(use)[pick]
        sample = vectors.take(emb_pick) if isinstance(vectors, VectorFiles) else np.asarray(vectors, np.float32)[emb_pick]
        index.train(np.ascontiguousarray(sample, np.float32))
        del sample
        index.nprobe = min(probe, lists)
    else:
        index = faiss.IndexFlatIP(dim)
    for _, block in _use_blocks(vectors, use):
        index.add(block)
    return index


def _use_blocks(vectors: np.ndarray | VectorFiles, use: np.ndarray, block_rows: int = 32_768) -> Iterator[tuple[int, np.ndarray]]:
    """``(position among use's rows, float32 block)`` of the vectors with ``use``, in order."""
    done = 0
    if isinstance(vectors, VectorFiles):
        blocks: Iterator[tuple[int, np.ndarray]] = vectors.blocks(block_rows)
    else:
        blocks = ((s, np.asarray(vectors[s : s + block_rows], np.float32)) for s in range(0, int(vectors.shape[0]), block_rows))
    for start, block in blocks:
        sel = use[start : start + block.shape[0]]
        if sel.any():
            part = np.ascontiguousarray(block[sel], np.float32)
            yield done, part
            done += part.shape[0]


def band_candidates(
    vectors: np.ndarray | VectorFiles,
    embedded_rows: np.ndarray,
    use: np.ndarray,
    *,
    low: float,
    high: float,
    block_size: int,
    labels: np.ndarray | None = None,
    per_image: int = 0,
    index: Any = None,
    partitioned: Callable[..., Any] | None = None,
    progress: Callable[[int], object] | None = None,
) -> Candidates:
    """Whole-image pairs scoring in ``[low, high)`` among the embedded rows with an image
    (``use``).

    With ``labels`` (the direct links' component of every row) and ``per_image`` > 0: each
    image's ``per_image`` best such pairs not already joined, from a nearest-neighbour search
    over ``index`` (:func:`whole_index`; default: an exact flat one), a block of images at a
    time: what :func:`top_per_image` of :func:`fresh` of all the pairs gives, in memory bounded
    by the block and ``per_image``, not by the number of pairs in the band (which grows with N²
    where many images look alike). Otherwise every pair in the band: an exact flat range search
    over the rows in memory, or with ``partitioned`` (a :func:`dedup.partition.partitioned_edges`
    with its work folder bound) the partitioned one over the vectors on disk, whose pairs are
    then cut to the rows with an image."""
    from dedup.search import below, embedding_edges

    rows = embedded_rows[use]
    if labels is not None and per_image > 0:
        return _band_nearest(
            vectors, rows, use, labels, low=low, high=high, per_image=per_image, block_size=block_size,
            index=index if index is not None else whole_index(vectors, use), progress=progress,
        )  # fmt: skip
    if partitioned is not None:
        found, _ = partitioned(vectors, threshold=low, rows=embedded_rows, progress=progress)
        has = np.zeros(int(embedded_rows.max()) + 1 if embedded_rows.size else 0, bool)
        has[rows] = True
        keep = has[found.i] & has[found.j]
        found = Edges(found.i[keep], found.j[keep], found.score[keep], found.signal[keep])
    else:
        vecs = np.asarray(vectors, np.float32)[use]
        found, _ = embedding_edges(vecs, threshold=low, rows=rows, block_size=block_size, progress=progress)
    return below(found, high)


_FIRST_K = 16  # neighbours asked for beyond per_image; quadrupled for the images that need more
_RESULTS = 1 << 20  # neighbours asked for at once (rows x k): ~30 MB with their masks


def _band_nearest(
    vectors: np.ndarray | VectorFiles,
    rows: np.ndarray,
    use: np.ndarray,
    labels: np.ndarray,
    *,
    low: float,
    high: float,
    per_image: int,
    block_size: int,
    index: Any,
    progress: Callable[[int], object] | None,
) -> Candidates:
    """Per image its ``per_image`` best neighbours in ``[low, high)`` of another component
    (ties: the lower row first), each pair once (``i < j``), sorted by ``(i, j)``.

    A block of images asks for ``per_image + 16`` neighbours; an image whose neighbours were all
    at ``low`` or above without ``per_image`` fresh band pairs among them (a large group of
    copies already joined comes first) asks again for four times as many, until it has them,
    the band ends, or the index has no more."""
    n = int(rows.size)
    if n < 2:
        return Candidates.empty()
    lab = labels[rows]
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    found_s: list[np.ndarray] = []
    for start, block in _use_blocks(vectors, use, block_rows=max(1, min(block_size, 4096))):
        m = block.shape[0]
        pending = np.arange(m)
        k = min(n, per_image + _FIRST_K)
        while pending.size:
            again: list[np.ndarray] = []
            # a few rows at a time: the (rows x k) results held at once stay bounded as k grows
            for c in range(0, pending.size, max(1, _RESULTS // k)):
                ask = pending[c : c + max(1, _RESULTS // k)]
                dist, idx = index.search(block[ask], k)
                me = (start + ask)[:, None]
                valid = idx >= 0
                safe = np.where(valid, idx, 0)
                ok = valid & (safe != me) & (dist >= low) & (dist < high) & (lab[safe] != lab[me])
                enough = ok.sum(axis=1) >= per_image
                exhausted = (k >= n) | ~valid[:, -1] | (dist[:, -1] < low)
                finish = enough | exhausted
                again.append(ask[~finish])
                if not finish.any():
                    continue
                sub_ok, sub_d, sub_i = ok[finish], dist[finish], safe[finish]
                q = np.repeat(me[finish, 0], sub_ok.sum(axis=1))
                d, j = sub_d[sub_ok], sub_i[sub_ok]
                order = np.lexsort((j, -d, q))  # ties: the lower row first (faiss orders them arbitrarily)
                q, d, j = q[order], d[order], j[order]
                first = _rank_in_runs(q) < per_image
                q, d, j = q[first], d[first], j[first]
                found_i.append(np.minimum(q, j))
                found_j.append(np.maximum(q, j))
                found_s.append(d.astype(np.float32))
            pending = np.concatenate(again)
            k = min(n, 4 * k)
        if progress is not None:
            progress(m)
    if not found_i:
        return Candidates.empty()
    i, j, s = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    keep = best_per_pair(i, j, s)  # a pair each of whose ends kept it: once
    return Candidates(rows[i[keep]], rows[j[keep]], s[keep], np.full(keep.size, -1, np.int16))


def partial_candidates(
    vectors: np.ndarray | VectorFiles,
    regions: RegionFiles,
    embedded_rows: np.ndarray,
    use: np.ndarray,
    *,
    propose: float,
    top_k: int,
    margin: float,
    per_image: int,
    block_size: int = 2048,
    lists: int = 0,
    probe: int = IVF_PROBE,
    index: Any = None,
    progress: Callable[[int], object] | None = None,
) -> Candidates:
    """Partial-copy proposals (:func:`dedup.search.region_candidates` then :func:`best_proposals`)
    with the region descriptors read a block at a time from the per-shard files, against an
    index of the whole images (the embedded rows with an image, ``use``).

    The index is exact (flat) with ``lists`` 0; otherwise an inverted file of ``lists`` k-means
    cells of which each region visits its ``probe`` nearest: every region against every image
    costs ``N² * windows * dim`` (hours at 200,000 images on two cores), the cells cut that by
    ``lists / probe``, at the price of a proposal whose image lies in a cell not visited.
    Either index holds ``4 * dim`` bytes a row (400 MB at 200,000 rows of 512): what bounds
    this step's memory; the regions never are in memory beyond a block. ``index``: that index
    already built (:func:`whole_index`), shared with the band proposals."""
    rows = embedded_rows[use]
    n = int(rows.size)
    if n < 2 or not len(regions):
        return Candidates.empty()
    if index is None:
        index = whole_index(vectors, use, lists=lists, probe=probe)
    pos_of = np.full(use.size, -1, np.int64)  # embedded position -> position among ``use``
    pos_of[use] = np.arange(n, dtype=np.int64)
    use_pos = np.flatnonzero(use)  # and back
    k = min(top_k + 1, n)  # one more: an image's own whole is usually its regions' nearest
    found: list[Candidates] = []
    for first, regs in regions.blocks(block_size):
        m = regs.shape[0]
        for start in range(0, m, block_size):
            part = regs[start : start + block_size]
            owners = pos_of[first + start : first + start + part.shape[0]]
            sel = owners >= 0
            if sel.any() and part.shape[1]:
                per = int(part.shape[1])
                q = np.ascontiguousarray(part[sel].reshape(-1, part.shape[2]), dtype=np.float32)
                dist, idx = index.search(q, k)
                owner = np.repeat(owners[sel], per * k)
                window = np.tile(np.repeat(np.arange(per, dtype=np.int16), k), int(sel.sum()))
                dist, idx = dist.reshape(-1), idx.reshape(-1).astype(np.int64)
                hit = (idx >= 0) & (idx != owner) & (dist >= propose)
                c = Candidates(owner[hit], idx[hit], dist[hit].astype(np.float32), window[hit])
                if len(c):
                    # All of a container's windows are in this block: its best window per image,
                    # the margin over the two whole images and its per_image best are decided
                    # here, so what is held grows with per_image x N, not with the hits.
                    c = c.take(best_per_pair(c.i, c.j, c.score))
                    whole = _whole_scores(vectors, use_pos[c.i], use_pos[c.j])
                    found.append(_best_scored(c, whole, margin=margin, per_image=per_image))
            if progress is not None:
                progress(part.shape[0])
    cands = Candidates.concat(found)
    return Candidates(rows[cands.i], rows[cands.j], cands.score, cands.window)


_GATHER = 8192  # pairs whose two vectors are gathered at once (~32 MB at 512 dimensions)


def _whole_scores(vectors: np.ndarray | VectorFiles, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The whole images' own similarity for the pairs of embedded positions ``(a, b)``."""
    out = np.empty(a.size, np.float32)
    for s in range(0, a.size, _GATHER):
        pos = np.concatenate([a[s : s + _GATHER], b[s : s + _GATHER]])
        if isinstance(vectors, VectorFiles):
            uniq, inverse = np.unique(pos, return_inverse=True)
            both = vectors.take(uniq)[inverse]
        else:
            both = np.asarray(vectors[pos], np.float32)
        m = pos.size // 2
        out[s : s + m] = np.einsum("nd,nd->n", both[:m], both[m:])
    return out


def fresh(cands: Candidates, labels: np.ndarray) -> Candidates:
    """The candidates whose two rows are not yet in one component."""
    return cands.take(labels[cands.i] != labels[cands.j])


def _rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """For sorted ``keys``, each element's position within its run of equal keys (0, 1, ...)."""
    if not keys.size:
        return np.zeros(0, np.int64)
    start = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
    return np.arange(keys.size) - np.repeat(start, np.diff(np.r_[start, keys.size]))


def top_per_image(cands: Candidates, per_image: int) -> Candidates:
    """Each pair that is among the ``per_image`` best of either of its two images (all with
    ``per_image`` <= 0). A copy's own original is nearly always among its first few band
    neighbours; the rest of a look-alike crowd (a family of clip art) need not be looked at."""
    if per_image <= 0 or not len(cands):
        return cands
    order = np.argsort(-cands.score, kind="stable")
    ends = np.concatenate([cands.i[order], cands.j[order]])
    # rank of each pair among the pairs of each of its ends, best first
    by_end = np.lexsort((np.tile(np.arange(order.size), 2), ends))
    rank = np.empty(ends.size, np.int64)
    rank[by_end] = _rank_in_runs(ends[by_end])
    best = np.minimum(rank[: order.size], rank[order.size :]) < per_image
    return cands.take(np.sort(order[best]))


def best_proposals(cands: Candidates, vecs: np.ndarray, rows: np.ndarray, *, margin: float, per_image: int) -> Candidates:
    """Partial-copy proposals worth a second look: the region must beat the two whole images'
    own similarity by ``margin`` (a region of a plain background matches many whole images
    about as well as the whole does), and each containing image keeps its ``per_image`` best.
    Measured on the bench: margin 0.1 and 2 per image keep 96 % of the true pairs proposed at
    0.5 and a fifth of the false ones."""
    if not len(cands):
        return cands
    pos = np.searchsorted(rows, cands.i), np.searchsorted(rows, cands.j)
    whole = np.einsum("nd,nd->n", vecs[pos[0]], vecs[pos[1]])
    return _best_scored(cands, whole, margin=margin, per_image=per_image)


def _best_scored(cands: Candidates, whole: np.ndarray, *, margin: float, per_image: int) -> Candidates:
    kept = cands.take(cands.score - whole >= margin)
    kept = kept.take(np.lexsort((-kept.score, kept.i)))
    return kept.take(_rank_in_runs(kept.i) < per_image)
