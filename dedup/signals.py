"""The signals table: every way two samples get linked, written once.

Each :class:`SignalSpec` row says which feature column a signal reads, which rows qualify
(:class:`Qualifies`), whether the preset has it on, how it links the rows of one set to each
other (``within``: ``dedup run``, ``dedup index add``) and how it links a new set's rows to an
index's (``against``: ``dedup check``, decontamination). :func:`find_edges` and
:func:`cross_links` loop over :data:`SIGNALS`; nothing else decides which signal links what, so
a new signal is one row here, not four edits, and ``check`` finds the direct links that
``index add`` then makes.

The rules the rows encode:

* exact bytes and pixels link any two ``ok`` rows;
* PDQ (and its seven rotations and flips) and pHash link decoded images;
* the embedding links embedded rows (a model's, or precomputed vectors — never the two mixed,
  :func:`refuse_mixed_vectors`), and only its rows go to the second look;
* URL and caption link only rows nobody could look at (``ok``, no image, no embedding): for
  images identical captions ("Canvas Wall Art Print") say nothing about the pixels, and
  precomputed embeddings are the pixels' own signal.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup._progress import ProgressFactory, silent
from dedup._types import Shard, ShardKind
from dedup.config import EmbedModel, RunConfig, SearchConfig
from dedup.errors import ConfigError, IndexUnreadableError
from dedup.partition import auto_settings, partitioned_edges
from dedup.pixels import known_pixels, pixel_keys
from dedup.rows import FeatureRows, as_rows
from dedup.search import (
    CrossLinks,
    Edges,
    Signal,
    embedding_edges,
    exact_edges,
    hamming_edges,
    normalise_caption,
    normalise_url,
    pack_uint64,
    pdq_variant_edges,
)

__all__ = [
    "PRECOMPUTED",
    "SIGNALS",
    "Qualifies",
    "SignalSpec",
    "cross_links",
    "eligibility",
    "find_edges",
    "hash_codes",
    "refuse_mixed_vectors",
    "vector_kinds",
    "second_look_rows",
]

PRECOMPUTED = "precomputed"  # what made the vectors of a run over precomputed embeddings (CLIP, usually)


class Qualifies(StrEnum):
    """Which rows a signal may link."""

    OK = "ok"  # read without error
    IMAGE = "image"  # ok and decoded
    EMBEDDED = "embedded"  # has an embedding (a model's, or precomputed)
    METADATA = "metadata"  # ok, but neither an image nor an embedding: only its URL and caption


def eligibility(rows: pa.Table | FeatureRows) -> dict[Qualifies, np.ndarray]:
    """A boolean mask per :class:`Qualifies`, the same rule for a run's rows and an index's."""
    r = as_rows(rows)
    ok = r.equals("status", "ok")
    image = r.flags("has_image") & ok
    embedded = r.flags("embedded")
    return {
        Qualifies.OK: ok,
        Qualifies.IMAGE: image,
        Qualifies.EMBEDDED: embedded,
        Qualifies.METADATA: ok & ~image & ~embedded,
    }


@dataclass(slots=True)
class Within:
    """What a within-set search is given: the rows, their vectors, the settings."""

    rows: FeatureRows
    vectors: Any  # (n_embedded, dim) array, or a VectorFiles past search.partition_above
    search: SearchConfig
    progress: ProgressFactory = silent
    work_dir: Path | None = None
    levels: dict[float, tuple[int, int]] = field(default_factory=dict)  # the embedding's pair counts

    def present(self, column: str) -> bool:
        """Whether any row has the column (a hash column of precomputed embeddings is all null)."""
        return self.rows.null_count(column) < self.rows.num_rows


@dataclass(slots=True)
class Against:
    """What a search against an index is given: the new rows (queries) and the index (database)."""

    rows: pa.Table | FeatureRows
    vectors: np.ndarray
    search: SearchConfig
    base: Any  # dedup.store.Index, with the faiss indexes loaded (search=True)
    base_mask: dict[Qualifies, np.ndarray]


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """One row of the signals table."""

    signal: Signal
    column: str  # the feature column it reads
    qualifies: Qualifies
    enabled: Callable[[SearchConfig], bool]
    within: Callable[[SignalSpec, Within, np.ndarray], Edges]
    against: Callable[[SignalSpec, Against, np.ndarray], CrossLinks]
    second_look: bool = False  # its rows (and only they) go to the second look


# --------------------------------------------------------------------------------------------
# Within one set
# --------------------------------------------------------------------------------------------


def _exact_within(spec: SignalSpec, ctx: Within, mask: np.ndarray) -> Edges:
    if spec.signal is Signal.EXACT_PIXELS:
        # Pixel hashes are computed only where they can label a link (dedup.pixels, laid over
        # the rows by the caller); elsewhere a row's byte hash stands for its pixels.
        if not (ctx.present(spec.column) or ctx.present("sha256")):
            return Edges.empty()
        values = pixel_keys(ctx.rows.column(spec.column).to_pylist(), ctx.rows.column("sha256").to_pylist())
    elif not ctx.present(spec.column):
        return Edges.empty()
    else:
        values = ctx.rows.column(spec.column).to_pylist()
    return exact_edges([v if mask[r] else None for r, v in enumerate(values)], signal=spec.signal)


def _text_within(spec: SignalSpec, ctx: Within, mask: np.ndarray) -> Edges:
    norm = _NORMALISE[spec.signal]
    values = ctx.rows.column(spec.column).to_pylist()
    return exact_edges([norm(v) if mask[r] else None for r, v in enumerate(values)], signal=spec.signal)


def _embedding_within(spec: SignalSpec, ctx: Within, mask: np.ndarray) -> Edges:
    vectors, search = ctx.vectors, ctx.search
    if not vectors.shape[0]:
        return Edges.empty()
    rows = np.flatnonzero(mask)
    if vectors.shape[0] > search.partition_above:
        with ctx.progress("search (partitioned)", int(vectors.shape[0]), "vec") as bar, _scratch(ctx.work_dir) as scratch:
            found, ctx.levels = partitioned_edges(
                vectors,
                threshold=search.threshold,
                work_dir=scratch,
                rows=rows,
                count_at=search.report_thresholds,
                settings=auto_settings(int(vectors.shape[0]), partitions=search.partitions, margin=search.margin),
                progress=bar.update,
            )
        return found
    with ctx.progress("search (embeddings)", int(vectors.shape[0]), "vec") as bar:
        found, ctx.levels = embedding_edges(
            vectors,
            threshold=search.threshold,
            rows=rows,
            block_size=search.block_size,
            count_at=search.report_thresholds,
            progress=bar.update,
        )
    return found


def _hash_within(spec: SignalSpec, ctx: Within, mask: np.ndarray) -> Edges:
    """PDQ (with its rotated and mirrored variants) or pHash: Hamming distance within the set."""
    if not ctx.present(spec.column):
        return Edges.empty()
    rows, codes = hash_codes(ctx.rows, spec.column, mask)
    if not rows.size:
        return Edges.empty()
    distance, block = _distance(spec, ctx.search), ctx.search.block_size
    parts = [hamming_edges(codes, max_distance=distance, signal=spec.signal, rows=rows, block_size=block)]
    if spec.column == "pdq":
        have, variants = _pdq_variants(ctx.rows, rows)
        if have.any():  # rotated / mirrored copies (fingerprint.pdq_dihedral)
            parts.append(pdq_variant_edges(codes[have], variants, max_distance=distance, rows=rows[have], block_size=block))
    return Edges.concat(parts)


def _distance(spec: SignalSpec, search: SearchConfig) -> int:
    """A hash signal's Hamming distance setting."""
    return search.pdq_distance if spec.column == "pdq" else search.phash_distance


# --------------------------------------------------------------------------------------------
# Against an index
# --------------------------------------------------------------------------------------------


def _exact_against(spec: SignalSpec, ctx: Against, mask: np.ndarray) -> CrossLinks:
    """New rows whose value some qualifying index row holds, linked to the first such row. One
    link is enough: the index's holders of one value already share a cluster."""
    mine = ctx.rows.column(spec.column)
    theirs = ctx.base.samples.column(spec.column)
    their_ok = ctx.base_mask[spec.qualifies]
    if spec.signal is Signal.EXACT_PIXELS:
        mine, theirs = _pixel_keys_against(ctx)
    values = [v if mask[r] else None for r, v in enumerate(mine.to_pylist())]
    wanted = pa.array([v for v in values if v], mine.type)
    if not len(wanted):
        return CrossLinks.empty()
    hit = np.asarray(pc.is_in(theirs, value_set=wanted).fill_null(False).to_numpy(zero_copy_only=False), bool) & their_ok
    rows = np.flatnonzero(hit)
    first: dict[Any, int] = {}
    for row, value in zip(rows.tolist(), theirs.take(pa.array(rows, pa.int64())).to_pylist(), strict=True):
        first.setdefault(value, row)
    return _first_holder_links(values, first, spec.signal)


def _pixel_keys_against(ctx: Against) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The exact-pixel keys of the new rows and of the index's (:func:`dedup.pixels.pixel_keys`):
    pixel hash, else a byte twin's on either side, else the byte hash. The pixel hashes a link
    needs were laid over both by the caller (:func:`dedup.pixels.resolve_against`)."""
    rows = as_rows(ctx.rows)
    my_pix, my_sha = rows.column("pixel_sha256").to_pylist(), rows.column("sha256").to_pylist()
    their_pix, their_sha = ctx.base.samples.column("pixel_sha256"), ctx.base.samples.column("sha256")
    known = known_pixels(my_pix, my_sha)
    shared = pc.is_in(their_sha, value_set=pa.array([s for s in my_sha if s is not None], pa.binary(32)))
    both = pc.and_(shared.fill_null(False), their_pix.is_valid())
    for s, p in zip(their_sha.filter(both).to_pylist(), their_pix.filter(both).to_pylist(), strict=True):
        known.setdefault(s, p)
    mine = pa.chunked_array([pa.array(pixel_keys(my_pix, my_sha, known), pa.binary(32))])
    theirs = pc.coalesce(their_pix, their_sha)
    borrow = pc.and_(shared.fill_null(False), their_pix.is_null())
    if pc.any(borrow).as_py():
        at = np.flatnonzero(np.asarray(borrow.to_numpy(zero_copy_only=False), bool))
        keys = [known.get(s, s) for s in their_sha.take(pa.array(at)).to_pylist()]
        mask = np.zeros(len(theirs), bool)
        mask[at] = True
        theirs = pc.replace_with_mask(theirs.combine_chunks(), pa.array(mask), pa.array(keys, pa.binary(32)))
    return mine, pa.chunked_array([theirs]) if isinstance(theirs, pa.Array) else theirs


def _text_against(spec: SignalSpec, ctx: Against, mask: np.ndarray) -> CrossLinks:
    their_mask = ctx.base_mask[spec.qualifies]
    if not their_mask.any():
        return CrossLinks.empty()
    norm = _NORMALISE[spec.signal]
    mine = [norm(v) if mask[r] else None for r, v in enumerate(ctx.rows.column(spec.column).to_pylist())]
    first: dict[Any, int] = {}
    for row, value in enumerate(ctx.base.samples.column(spec.column).to_pylist()):
        if their_mask[row] and (key := norm(value)):
            first.setdefault(key, row)
    return _first_holder_links(mine, first, spec.signal)


def _embedding_against(spec: SignalSpec, ctx: Against, mask: np.ndarray) -> CrossLinks:
    base, search, vectors = ctx.base, ctx.search, ctx.vectors
    if not vectors.shape[0] or base.embeddings is None:
        return CrossLinks.empty()
    if int(base.embeddings.d) != int(vectors.shape[1]):
        raise IndexUnreadableError(
            f"the index in {base.directory} holds {base.embeddings.d}-d embeddings, its model gives "
            f"{vectors.shape[1]}-d ones; hint: the index is damaged or was built by another version: rebuild it"
        )
    rows = np.flatnonzero(mask)
    base_rows = np.flatnonzero(ctx.base_mask[Qualifies.EMBEDDED])  # faiss id (emb_row) -> sample row
    x = np.ascontiguousarray(vectors, np.float32)
    # faiss keeps scores strictly above the radius; step just below so ">= threshold" holds.
    radius = float(np.nextafter(np.float32(search.threshold), np.float32(-np.inf)))
    parts: list[CrossLinks] = []
    for start in range(0, x.shape[0], max(1, search.block_size)):
        stop = min(x.shape[0], start + search.block_size)
        lims, dist, idx = base.embeddings.range_search(x[start:stop], radius)
        q = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims.astype(np.int64)))
        keep = dist >= search.threshold
        parts.append(CrossLinks.of(rows[q[keep]], base_rows[idx[keep]], dist[keep], spec.signal))
    return CrossLinks.concat(parts)


def _hash_against(spec: SignalSpec, ctx: Against, mask: np.ndarray) -> CrossLinks:
    index = ctx.base.pdq if spec.column == "pdq" else ctx.base.phash
    distance = _distance(spec, ctx.search)
    if index is None:
        if spec.column == "phash" and ctx.base_mask[Qualifies.IMAGE].any():
            # An index of images without pHash codes was built with pHash off: searching it
            # would find nothing and say nothing.
            raise ConfigError(
                "the index holds no pHash codes (it was built with pHash off), so a pHash search against it "
                "cannot find anything; hint: leave --phash-distance at its default (off), or rebuild the "
                "index with the same --phash-distance"
            )
        return CrossLinks.empty()
    rows, codes = hash_codes(ctx.rows, spec.column, mask)
    if not rows.size:
        return CrossLinks.empty()
    queries = [(rows, codes)]
    if spec.column == "pdq":
        # A rotated or mirrored copy meets the original in one of its seven other orientations,
        # as pdq_variant_edges finds it within a set.
        have, variants = _pdq_variants(ctx.rows, rows)
        if have.any():
            var = variants.reshape(-1, 7, 32)
            queries += [(rows[have], np.ascontiguousarray(var[:, v])) for v in range(7)]
    bits = codes.shape[1] * 8
    parts: list[CrossLinks] = []
    block = max(1, ctx.search.block_size)
    for q_rows, q_codes in queries:
        for start in range(0, q_rows.shape[0], block):
            stop = min(q_rows.shape[0], start + block)
            # faiss keeps distances strictly below the radius; ids are index sample rows.
            lims, dist, ids = index.range_search(np.ascontiguousarray(q_codes[start:stop]), distance + 1)
            q = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(lims.astype(np.int64)))
            parts.append(CrossLinks.of(q_rows[q], ids, 1.0 - np.asarray(dist, np.float32) / bits, spec.signal))
    return CrossLinks.concat(parts).best_per_pair()


def _first_holder_links(mine: Sequence[object], first: dict[Any, int], signal: Signal) -> CrossLinks:
    drop, base = [], []
    for row, value in enumerate(mine):
        if value and value in first:
            drop.append(row)
            base.append(first[value])
    return CrossLinks.of(np.array(drop, np.int64), np.array(base, np.int64), np.ones(len(drop), np.float32), signal)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_NORMALISE: dict[Signal, Callable[[str | None], str | None]] = {Signal.URL: normalise_url, Signal.CAPTION: normalise_caption}

SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec(Signal.EXACT_BYTES, "sha256", Qualifies.OK, lambda s: s.exact, _exact_within, _exact_against),
    SignalSpec(Signal.EXACT_PIXELS, "pixel_sha256", Qualifies.OK, lambda s: s.exact, _exact_within, _exact_against),
    SignalSpec(Signal.EMBEDDING, "embedded", Qualifies.EMBEDDED, lambda s: True, _embedding_within, _embedding_against, second_look=True),
    SignalSpec(Signal.PDQ, "pdq", Qualifies.IMAGE, lambda s: s.pdq_distance >= 0, _hash_within, _hash_against),
    SignalSpec(Signal.PHASH, "phash", Qualifies.IMAGE, lambda s: s.phash_distance >= 0, _hash_within, _hash_against),
    SignalSpec(Signal.URL, "url", Qualifies.METADATA, lambda s: s.url, _text_within, _text_against),
    SignalSpec(Signal.CAPTION, "caption", Qualifies.METADATA, lambda s: s.caption, _text_within, _text_against),
)


def find_edges(
    table: pa.Table | FeatureRows,
    vectors: np.ndarray,
    cfg: RunConfig,
    *,
    progress: ProgressFactory = silent,
    work_dir: Path | None = None,
) -> tuple[Edges, dict[float, tuple[int, int]]]:
    """Every direct link the configured signals make within one set, and the embedding's pair
    counts at the report thresholds.

    More than ``search.partition_above`` embeddings are searched partition by partition
    (:mod:`dedup.partition`), spilling to ``work_dir`` (default: a temporary folder). Only the
    columns a signal needs are read, and a hash column that is empty is never loaded.
    """
    ctx = Within(as_rows(table), vectors, cfg.search, progress, work_dir)
    masks = eligibility(ctx.rows)
    parts = [
        spec.within(spec, ctx, masks[spec.qualifies])
        for spec in SIGNALS
        if spec.enabled(cfg.search) and masks[spec.qualifies].any()
    ]
    return Edges.concat(parts), ctx.levels


def cross_links(table: pa.Table | FeatureRows, vectors: np.ndarray, base: Any, cfg: RunConfig) -> CrossLinks:
    """Every direct link from a row of ``table`` (the queries) to a row of the index ``base``
    (:class:`dedup.store.Index` with its faiss files and the columns of :data:`BASE_COLUMNS`)
    that the configured signals make: the same rows, thresholds and rules as :func:`find_edges`."""
    masks = eligibility(table)
    ctx = Against(table, vectors, cfg.search, base, eligibility(base.samples))
    return CrossLinks.concat(
        [
            spec.against(spec, ctx, masks[spec.qualifies])
            for spec in SIGNALS
            if spec.enabled(cfg.search) and masks[spec.qualifies].any()
        ]
    )


# The index columns cross_links reads (samples.parquet).
# width, height, pdq, sample_id and shard: the pixel key and where to re-read an index row
# whose pixel hash a link needs (dedup.pixels.resolve_against).
BASE_COLUMNS = ("status", "has_image", "embedded", "sha256", "pixel_sha256", "url", "caption", "width", "height", "pdq", "sample_id", "shard")


def second_look_rows(table: pa.Table | FeatureRows) -> np.ndarray:
    """The rows the second look may pair: those of the signals that send theirs there (the
    embedding's) that have an image to re-read."""
    masks = eligibility(table)
    use = np.zeros(as_rows(table).num_rows, bool)
    for spec in SIGNALS:
        if spec.second_look:
            use |= masks[spec.qualifies]
    return np.flatnonzero(use & masks[Qualifies.IMAGE])


def hash_codes(table: pa.Table | FeatureRows, column: str, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, packed codes)`` of a hash column (``pdq``: 32 bytes, ``phash``: uint64) where
    ``eligible`` and not null: the layout faiss binary indexes take."""
    rows_of = as_rows(table)
    width = 32 if column == "pdq" else 8
    if rows_of.null_count(column) == rows_of.num_rows:  # e.g. precomputed embeddings: no hashes
        return np.zeros(0, np.int64), np.zeros((0, width), np.uint8)
    values = rows_of.column(column)
    valid = eligible & ~np.asarray(values.is_null().to_numpy(zero_copy_only=False), bool)
    rows = np.flatnonzero(valid).astype(np.int64)
    if column == "pdq":
        if not rows.size:
            return rows, np.zeros((0, 32), np.uint8)
        blobs = values.take(pa.array(rows)).to_pylist()
        return rows, np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, 32)
    if not rows.size:
        return rows, np.zeros((0, 8), np.uint8)
    ints = np.asarray(values.take(pa.array(rows)).to_numpy(zero_copy_only=False), np.uint64)
    return rows, pack_uint64(ints)


def _pdq_variants(rows_of: FeatureRows | pa.Table, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``rows`` have their seven other PDQ orientations, and those (k, 7 * 32) codes."""
    r = as_rows(rows_of)
    if "pdq_variants" not in r.column_names or r.null_count("pdq_variants") == r.num_rows:
        return np.zeros(rows.size, bool), np.zeros((0, 224), np.uint8)
    var = r.take(["pdq_variants"], rows).column(0).to_pylist()
    have = np.array([v is not None for v in var], bool)
    codes = np.frombuffer(b"".join(v for v in var if v is not None), np.uint8).reshape(-1, 224)
    return have, codes


# --------------------------------------------------------------------------------------------
# What the vectors are
# --------------------------------------------------------------------------------------------


def vector_kinds(shards: Sequence[Shard], cfg: RunConfig) -> list[str]:
    """What would make the vectors of ``shards``: :data:`PRECOMPUTED` for precomputed embeddings,
    the configured model for images (none with ``--model none``)."""
    kinds = {PRECOMPUTED} if any(s.kind is ShardKind.EMBEDDINGS for s in shards) else set()
    if any(s.kind is not ShardKind.EMBEDDINGS for s in shards) and cfg.embed.model is not EmbedModel.NONE:
        kinds.add(cfg.embed.model.value)
    return sorted(kinds)


def refuse_mixed_vectors(theirs: str | None, mine: Sequence[str], *, where: str, dim: object = None) -> None:
    """Refuse to compare vectors of two kinds: a model's with precomputed ones (CLIP, usually),
    or two models'. Scores between them mean nothing, and nothing else would notice when the
    dimensions agree. ``theirs``: what made the vectors already there (None: nothing there);
    ``mine``: what makes the new ones. The one rule ``run``, ``check`` and ``query`` apply.

    Raises:
        ConfigError: the kinds differ.
    """
    kinds = sorted(set(mine) | ({theirs} if theirs else set()))
    if len(kinds) < 2:
        return
    if theirs is None:
        raise ConfigError(
            "the sources mix precomputed embeddings (img_emb/*.npy) with images that "
            f"{next(k for k in kinds if k != PRECOMPUTED)} would embed: their vectors cannot be compared; hint: run "
            "them separately, or pass --model none to link the images by hashes only"
        )
    other = next(k for k in kinds if k != theirs)
    shape = f" ({dim}-d)" if dim else ""
    raise ConfigError(
        f"{where} holds {theirs} embeddings{shape} and the new data gives {other} ones: they cannot be "
        "compared; hint: use data of the same kind (precomputed embeddings against an index of precomputed "
        "embeddings, images against an index built from images)"
    )


@contextmanager
def _scratch(work_dir: Path | None) -> Iterator[Path]:
    """``work_dir`` (kept) or a temporary folder (removed)."""
    if work_dir is not None:
        yield work_dir
        return
    folder = Path(tempfile.mkdtemp(prefix="dedup-search-"))
    try:
        yield folder / "search"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
