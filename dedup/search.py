"""Candidate links between samples: faiss range search on embeddings and hashes, exact keys.

Every function returns :class:`Edges` — pairs ``i < j`` of global row numbers, a score in
[0, 1] and the signal that made the link — so the cluster stage never needs to know where a
link came from, and the manifest can always say. Searches run in blocks of queries, so memory
grows with the block and the number of links found, never with N².
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import faiss
import numpy as np


class Signal(IntEnum):
    """What made a link. Codes are stored in edge files; names are what the manifest shows."""

    EXACT_BYTES = 0
    EXACT_PIXELS = 1
    EMBEDDING = 2
    PDQ = 3
    PHASH = 4
    URL = 5
    CAPTION = 6
    VERIFIED = 7  # an embedding link below the threshold, confirmed by a second look (geometry, or the full model)
    PARTIAL = 8  # a region of one image holds the other (confirmed by geometry)
    REVIEWED = 9  # a curator said *same* in `dedup review` (a must-link; OUT/decisions.parquet)

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Edges:
    """Undirected links ``i < j`` with a similarity ``score`` and the ``signal`` that made them.

    For embeddings the score is the cosine similarity; for hashes it is ``1 - distance / bits``;
    exact, URL and caption links score 1.
    """

    i: np.ndarray  # int64
    j: np.ndarray  # int64
    score: np.ndarray  # float32
    signal: np.ndarray  # int8 (Signal codes)

    @classmethod
    def empty(cls) -> Edges:
        return cls(
            np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int8)
        )

    @classmethod
    def of(cls, i: np.ndarray, j: np.ndarray, score: np.ndarray, signal: Signal) -> Edges:
        i = np.asarray(i, np.int64)
        j = np.asarray(j, np.int64)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = lo != hi
        return cls(
            lo[keep],
            hi[keep],
            np.asarray(score, np.float32)[keep],
            np.full(int(keep.sum()), int(signal), np.int8),
        )

    @classmethod
    def concat(cls, parts: Sequence[Edges]) -> Edges:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.i for p in parts]),
            np.concatenate([p.j for p in parts]),
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.signal for p in parts]),
        )

    def __len__(self) -> int:
        return int(self.i.shape[0])

    def counts_by_signal(self) -> dict[str, int]:
        codes, counts = np.unique(self.signal, return_counts=True)
        return {Signal(int(c)).label: int(n) for c, n in zip(codes, counts, strict=True)}


@dataclass(frozen=True, slots=True)
class Candidates:
    """Pairs to look at again. ``window`` is the region of ``i`` that matched ``j`` (-1: whole)."""

    i: np.ndarray  # int64 rows
    j: np.ndarray  # int64 rows
    score: np.ndarray  # float32: the proposing score
    window: np.ndarray  # int16

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int16))

    @classmethod
    def concat(cls, parts: Sequence[Candidates]) -> Candidates:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("i", "j", "score", "window")))

    def take(self, keep: np.ndarray) -> Candidates:
        """The candidates at ``keep`` (a boolean mask or indices), in that order."""
        return Candidates(self.i[keep], self.j[keep], self.score[keep], self.window[keep])

    def __len__(self) -> int:
        return int(self.i.shape[0])


@dataclass(frozen=True, slots=True)
class CrossLinks:
    """Links from the rows of a new set to the rows of an index (two row spaces, so not
    symmetric and not :class:`Edges`): what ``check`` and decontamination search for."""

    drop: np.ndarray  # int64 rows of the new set
    base: np.ndarray  # int64 rows of the index
    score: np.ndarray  # float32
    signal: np.ndarray  # int8 Signal codes

    @classmethod
    def of(cls, drop: np.ndarray, base: np.ndarray, score: np.ndarray, signal: Signal) -> CrossLinks:
        n = len(drop)
        return cls(
            np.asarray(drop, np.int64),
            np.asarray(base, np.int64),
            np.asarray(score, np.float32).reshape(n),
            np.full(n, int(signal), np.int8),
        )

    @classmethod
    def empty(cls) -> CrossLinks:
        return cls.of(np.empty(0), np.empty(0), np.empty(0), Signal.EXACT_BYTES)

    @classmethod
    def concat(cls, parts: Sequence[CrossLinks]) -> CrossLinks:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("drop", "base", "score", "signal")))

    def take(self, keep: np.ndarray) -> CrossLinks:
        return CrossLinks(self.drop[keep], self.base[keep], self.score[keep], self.signal[keep])

    def best_per_pair(self) -> CrossLinks:
        """One link per (new row, index row): its best score (ordered by the pair)."""
        return self.take(best_per_pair(self.drop, self.base, self.score))

    def __len__(self) -> int:
        return int(self.drop.shape[0])


Progress = Callable[[int], object]

RESULTS_PER_BLOCK = 1 << 22  # range-search results one query block may return before the next is made smaller


def _blocks(n: int, block_size: int) -> range:
    return range(0, n, max(1, block_size))


def embedding_edges(
    vectors: np.ndarray,
    *,
    threshold: float,
    rows: np.ndarray | None = None,
    block_size: int = 16384,
    count_at: Sequence[float] = (),
    progress: Progress | None = None,
) -> tuple[Edges, dict[float, tuple[int, int]]]:
    """All pairs with inner product ``>= threshold`` among L2-normalised ``vectors``.

    ``rows`` maps each vector to its global row number (default: its position). The search
    runs at the lowest of ``threshold`` and ``count_at`` so the report can give, for each level
    in ``count_at``, ``(pairs, samples with at least one such neighbour)`` without a second pass;
    only links at ``threshold`` are returned. Exact: a flat index, blocked over queries.
    """
    n = int(vectors.shape[0])
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    levels = sorted(set(float(t) for t in count_at))
    counts = {t: [0, np.zeros(n, bool)] for t in levels}
    if n < 2:
        return Edges.empty(), {t: (0, 0) for t in levels}
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    low = min([threshold, *levels])
    # faiss keeps scores strictly above the radius; step just below so ">= threshold" holds.
    radius = float(np.nextafter(np.float32(low), np.float32(-np.inf)))
    found: list[Edges] = []
    start, step = 0, max(1, min(block_size, 2048))  # the first block small: it measures the crowd
    while start < n:
        stop = min(n, start + step)
        lims, dist, idx = index.range_search(x[start:stop], radius)
        q = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims.astype(np.int64)))
        # A block's results (~50 bytes each here) grow with N where many images look alike (a
        # rendered or templated crowd above a low count level): the next block is sized so its
        # results stay near RESULTS_PER_BLOCK. Each pair is found from its lower row whatever
        # the blocks, so the edges and counts do not depend on them.
        per_query = idx.size / (stop - start)
        step = int(min(max(1, block_size), max(64, RESULTS_PER_BLOCK // max(1.0, per_query))))
        upper = idx > q  # each unordered pair once, no self-pairs
        q, idx, dist = q[upper], idx[upper], dist[upper]
        for t in levels:
            hit = dist >= t
            counts[t][0] += int(hit.sum())
            counts[t][1][q[hit]] = True
            counts[t][1][idx[hit]] = True
        keep = dist >= threshold
        found.append(Edges.of(rows[q[keep]], rows[idx[keep]], dist[keep], Signal.EMBEDDING))
        del lims, dist, idx, q, upper, keep
        if progress is not None:
            progress(stop - start)
        start = stop
    summary = {t: (int(c[0]), int(c[1].sum())) for t, c in counts.items()}
    return Edges.concat(found), summary


def hamming_edges(
    codes: np.ndarray,
    *,
    max_distance: int,
    signal: Signal,
    rows: np.ndarray | None = None,
    block_size: int = 16384,
) -> Edges:
    """All pairs of binary codes (``uint8`` rows, packed bits) within ``max_distance`` bits."""
    n = int(codes.shape[0])
    if n < 2 or max_distance < 0:
        return Edges.empty()
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    x = np.ascontiguousarray(codes, dtype=np.uint8)
    bits = x.shape[1] * 8
    index = faiss.IndexBinaryFlat(bits)
    index.add(x)
    found: list[Edges] = []
    for start in _blocks(n, block_size):
        stop = min(n, start + block_size)
        # faiss keeps distances strictly below the radius.
        lims, dist, idx = index.range_search(x[start:stop], max_distance + 1)
        q = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims.astype(np.int64)))
        upper = idx > q
        q, idx, dist = q[upper], idx[upper], np.asarray(dist[upper], np.float32)
        found.append(Edges.of(rows[q], rows[idx], 1.0 - dist / bits, signal))
    return Edges.concat(found)


def exact_edges(values: Sequence[object], *, signal: Signal) -> Edges:
    """Link every sample whose value equals an earlier one's to the first holder of that value.

    ``None`` and empty values never match. A star per group (not all pairs) is enough for
    connectivity and keeps the edge count linear.
    """
    first: dict[object, int] = {}
    i: list[int] = []
    j: list[int] = []
    for row, value in enumerate(values):
        if value is None or value == "" or value == b"":
            continue
        head = first.setdefault(value, row)
        if head != row:
            i.append(head)
            j.append(row)
    return Edges.of(np.array(i, np.int64), np.array(j, np.int64), np.ones(len(i), np.float32), signal)


_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def normalise_caption(text: str | None) -> str | None:
    """Case-, accent-, punctuation- and whitespace-insensitive form of a caption (None if empty)."""
    if not text:
        return None
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode() or text
    norm = _PUNCT.sub(" ", folded.casefold()).strip()
    return norm or None


def normalise_url(url: str | None) -> str | None:
    """The URL with surrounding space and a trailing slash removed (None if empty)."""
    if not url:
        return None
    return url.strip().rstrip("/") or None


def pack_uint64(values: np.ndarray) -> np.ndarray:
    """64-bit hashes (as unsigned ints) to big-endian packed bytes, the layout faiss wants."""
    return np.asarray(values, dtype=">u8").view(np.uint8).reshape(-1, 8)


def below(edges: Edges, threshold: float) -> Candidates:
    """The links scoring under ``threshold``, as whole-image candidates for a second look (the
    ones at or above it are already links)."""
    low = edges.score < threshold
    return Candidates(edges.i[low], edges.j[low], edges.score[low], np.full(int(low.sum()), -1, np.int16))


def region_candidates(
    vectors: np.ndarray,
    regions: np.ndarray,
    *,
    propose: float,
    top_k: int = 4,
    rows: np.ndarray | None = None,
    block_size: int = 2048,
    progress: Progress | None = None,
) -> Candidates:
    """Pairs where a region of image ``i`` comes within ``propose`` of image ``j``'s whole.

    ``vectors`` (n, dim) are the whole-image embeddings, ``regions`` (n, windows, dim) each
    image's region descriptors (float16 is fine; blocks are converted). Each region asks for
    its ``top_k`` nearest whole images; a pair keeps its best window. Exact: a flat index over
    the whole images, queried a block of images' regions at a time.
    """
    n = int(vectors.shape[0])
    if n < 2 or regions.ndim != 3 or regions.shape[1] == 0:
        return Candidates.empty()
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    per = int(regions.shape[1])
    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    k = min(top_k + 1, n)  # one more: an image's own whole is usually its regions' nearest
    found: list[Candidates] = []
    for start in _blocks(n, block_size):
        stop = min(n, start + block_size)
        q = np.ascontiguousarray(regions[start:stop].reshape(-1, regions.shape[2]), dtype=np.float32)
        dist, idx = index.search(q, k)
        owner = np.repeat(np.arange(start, stop, dtype=np.int64), per * k)
        window = np.tile(np.repeat(np.arange(per, dtype=np.int16), k), stop - start)
        dist, idx = dist.reshape(-1), idx.reshape(-1).astype(np.int64)
        hit = (idx >= 0) & (idx != owner) & (dist >= propose)
        found.append(Candidates(owner[hit], idx[hit], dist[hit].astype(np.float32), window[hit]))
        if progress is not None:
            progress(stop - start)
    cands = Candidates.concat(found)
    if not len(cands):
        return cands
    best = cands.take(best_per_pair(cands.i, cands.j, cands.score))  # the best window per (container, image)
    return Candidates(rows[best.i], rows[best.j], best.score, best.window)


def pdq_variant_edges(
    codes: np.ndarray,
    variants: np.ndarray,
    *,
    max_distance: int,
    rows: np.ndarray | None = None,
    block_size: int = 16384,
) -> Edges:
    """Pairs where a rotation or flip of one image's PDQ is within ``max_distance`` of the other's.

    ``codes`` (n, 32) are the images' PDQ hashes, ``variants`` (n, 7 * 32) their 7 other
    dihedral hashes (:attr:`dedup.fingerprint.Features.pdq_variants`). Each variant is searched
    against the plain hashes, so a mirrored or rotated copy meets the original in one of the
    seven; the score is ``1 - distance / 256`` of the closest variant.
    """
    n = int(codes.shape[0])
    if n < 2 or max_distance < 0:
        return Edges.empty()
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    index = faiss.IndexBinaryFlat(256)
    index.add(np.ascontiguousarray(codes, dtype=np.uint8))
    var = np.ascontiguousarray(variants, dtype=np.uint8).reshape(n, 7, 32)
    found: list[Edges] = []
    for v in range(7):
        for start in _blocks(n, block_size):
            stop = min(n, start + block_size)
            lims, dist, idx = index.range_search(np.ascontiguousarray(var[start:stop, v]), max_distance + 1)
            q = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims.astype(np.int64)))
            keep = idx != q
            found.append(Edges.of(rows[q[keep]], rows[idx[keep]], 1.0 - np.asarray(dist[keep], np.float32) / 256, Signal.PDQ))
    return _best_edge(Edges.concat(found))


def best_per_pair(i: np.ndarray, j: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices that keep, for each (i, j) pair, its highest score; ordered by (i, j)."""
    order = np.lexsort((-score, j, i))
    first = np.ones(order.size, bool)
    first[1:] = (i[order][1:] != i[order][:-1]) | (j[order][1:] != j[order][:-1])
    return order[first]


def _best_edge(edges: Edges) -> Edges:
    """One edge per pair (its best score)."""
    keep = best_per_pair(edges.i, edges.j, edges.score)
    return Edges(edges.i[keep], edges.j[keep], edges.score[keep], edges.signal[keep])
