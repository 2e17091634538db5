"""The manifest: one row per input sample, saying which cluster it is in and whether to keep it.

Columns (DESIGN.md's contract): ``sample_id, source, shard, key, url, caption, width, height,
status, error, cluster_id, cluster_size, keep, reason, duplicate_of, similarity, signal``.
``reason`` is one of ``unique``, ``representative`` (kept for its cluster), ``duplicate``
(dropped: ``duplicate_of`` names the kept sample, ``signal``/``similarity`` the strongest link
to it, or to the cluster when there is no direct one), ``failed`` (``error`` says why),
``contaminates:<eval>`` (dropped: it copies an image of that evaluation set, which
``duplicate_of`` names as ``<eval>:<sample id>``; :mod:`dedup.contamination`) and ``reviewed``
(a curator's decision in ``dedup review`` changed whether this sample is kept: ``keep`` says
which way; see :mod:`dedup.decisions`).

It is built columnar: :class:`Manifest` holds a few numpy arrays per row (cluster, keeper,
strongest link: ~30 bytes a row) and assembles the parquet rows one row group at a time from
the feature rows (:class:`~dedup.rows.FeatureRows`), so neither the manifest nor the features
table is ever held whole, and no Python object is made per row. It is always one
``manifest.parquet``, written a row group (2²⁰ rows) at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup._io import atomic_path
from dedup.cluster import sizes
from dedup.contamination import Contamination
from dedup.featurize import SCHEMA
from dedup.rows import ROW_GROUP_ROWS, FeatureRows, as_rows, rechunk
from dedup.search import Edges, Signal

# The sample's own columns come from the feature table, so the two schemas cannot drift apart.
_SAMPLE_COLUMNS = ("sample_id", "source", "shard", "key", "url", "caption", "width", "height", "status", "error")
MANIFEST_SCHEMA = pa.schema(
    [SCHEMA.field(name) for name in _SAMPLE_COLUMNS]
    + [
        ("cluster_id", pa.int64()),
        ("cluster_size", pa.int64()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float32()),
        ("signal", pa.string()),
    ]
)
KEEP_COLUMNS = ("url", "caption", "sample_id", "key", "width", "height")
# The removal list (NeMo Curator / DataComp style): what to take out of a dataset one already
# holds, keyed by ``key`` (img2dataset's join key) and ``sample_id``, with the evidence.
REMOVE_SCHEMA = pa.schema(
    [MANIFEST_SCHEMA.field(c) for c in ("sample_id", "source", "shard", "key", "url")]
    + [SCHEMA.field("sha256")]
    + [MANIFEST_SCHEMA.field(c) for c in ("cluster_id", "reason", "duplicate_of", "signal", "similarity")]
)

REASONS = ("unique", "representative", "duplicate", "failed", "reviewed")


def strongest_links(n: int, edges: Edges, dropped: np.ndarray, keep_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the signal code (``-1``: none) and score of the link the manifest shows.

    Per dropped row: a direct link to the keeper first, then the strongest signal (exact before
    embedding before hashes), then the highest score. Only the ends of links that are dropped
    rows are sorted, so memory follows the links of the duplicates.
    """
    link_sig = np.full(n, -1, np.int8)
    link_score = np.full(n, np.nan, np.float32)
    if not len(edges) or not dropped.any():
        return link_sig, link_score
    a_parts, b_parts, s_parts, g_parts = [], [], [], []
    for a, b in ((edges.i, edges.j), (edges.j, edges.i)):
        mine = dropped[a]
        a_parts.append(a[mine])
        b_parts.append(b[mine])
        s_parts.append(edges.score[mine])
        g_parts.append(edges.signal[mine])
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    s, g = np.concatenate(s_parts), np.concatenate(g_parts).astype(np.int8)
    del a_parts, b_parts, s_parts, g_parts
    direct = b == keep_row[a]
    del b
    order = np.lexsort((-s, g, ~direct, a))
    a, s, g = a[order], s[order], g[order]
    first = np.ones(a.shape[0], bool)
    first[1:] = a[1:] != a[:-1]
    link_sig[a[first]] = g[first]
    link_score[a[first]] = s[first]
    return link_sig, link_score


@dataclass
class Manifest:
    """A run's manifest as per-row arrays over its feature rows; rows are assembled on demand."""

    rows: FeatureRows
    labels: np.ndarray  # int64 cluster id (smallest row of the cluster)
    keep_row: np.ndarray  # int64 the row each row's cluster keeps (-1: not eligible)
    ok: np.ndarray  # bool
    size: np.ndarray  # int64 cluster size
    link_sig: np.ndarray  # int8 Signal code of the link shown (-1: none)
    link_score: np.ndarray  # float32 (NaN: none)
    embedding_label: str
    keeper_rows: np.ndarray  # sorted rows that some dropped row names in duplicate_of
    keeper_ids: pa.Array  # their sample ids
    contamination: Contamination | None = None  # training rows that copy an evaluation image
    reviewed: np.ndarray | None = None  # bool: a review decision changed this row's keep/drop

    @classmethod
    def build(
        cls,
        table: pa.Table | FeatureRows,
        labels: np.ndarray,
        keep_row: np.ndarray,
        edges: Edges,
        *,
        embedding_label: str = "embedding",
        ok: np.ndarray | None = None,
        contamination: Contamination | None = None,
        reviewed: np.ndarray | None = None,
    ) -> Manifest:
        rows = as_rows(table)
        n = rows.num_rows
        ok = rows.equals("status", "ok") if ok is None else ok
        if contamination is not None and len(contamination):
            # A contaminated cluster keeps nothing (every member copies the evaluation image).
            keep_row = np.where(contamination.mask(n), -1, keep_row)
        keep = ok & (keep_row == np.arange(n, dtype=np.int64))
        dropped = ok & ~keep
        link_sig, link_score = strongest_links(n, edges, dropped, keep_row)
        keeper_rows = np.unique(keep_row[dropped & (keep_row >= 0)])
        keeper_ids = rows.take(["sample_id"], keeper_rows).column(0).combine_chunks()
        return cls(
            rows, labels, keep_row, ok, sizes(labels), link_sig, link_score, embedding_label, keeper_rows, keeper_ids,
            contamination if contamination is not None and len(contamination) else None, reviewed,
        )  # fmt: skip

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @property
    def keep(self) -> np.ndarray:
        return self.ok & (self.keep_row == np.arange(self.num_rows, dtype=np.int64))

    def signal_names(self) -> pa.Array:
        """The manifest's ``signal`` text of each Signal code (index = code)."""
        names = [""] * (max(int(c) for c in Signal) + 1)
        for c in Signal:
            names[int(c)] = self.embedding_label if c == Signal.EMBEDDING else c.label
        return pa.array(names, pa.string())

    def assemble(self, sample: pa.Table, idx: np.ndarray) -> pa.Table:
        """Manifest rows for the feature rows ``sample`` (the sample columns) at global rows ``idx``."""
        ok = self.ok[idx]
        size = self.size[idx]
        keep = ok & (self.keep_row[idx] == idx)
        dropped = ok & ~keep
        reason = np.where(~ok, 3, np.where(size == 1, 0, np.where(keep, 1, 2))).astype(np.int8)
        if self.reviewed is not None:
            reason[ok & self.reviewed[idx]] = 4
        kr = self.keep_row[idx]
        named = dropped & (kr >= 0)
        pos = np.searchsorted(self.keeper_rows, kr) if self.keeper_rows.size else np.zeros(idx.shape[0], np.int64)
        pos = np.minimum(pos, max(0, self.keeper_rows.size - 1))
        sig = self.link_sig[idx]
        score = self.link_score[idx]
        cols = {name: sample.column(name) for name in _SAMPLE_COLUMNS}
        cols["cluster_id"] = pa.array(self.labels[idx], pa.int64(), mask=~ok)
        cols["cluster_size"] = pa.array(size, pa.int64(), mask=~ok)
        cols["keep"] = pa.array(keep, pa.bool_())
        cols["reason"] = pa.array(REASONS, pa.string()).take(pa.array(reason))
        if self.keeper_rows.size:
            cols["duplicate_of"] = self.keeper_ids.take(pa.array(pos, pa.int64(), mask=~named))
        else:
            cols["duplicate_of"] = pa.nulls(idx.shape[0], pa.string())
        cols["similarity"] = pa.array(score, pa.float32(), mask=np.isnan(score))
        cols["signal"] = self.signal_names().take(pa.array(sig.astype(np.int64), pa.int64(), mask=sig < 0))
        if self.contamination is not None:
            self._contaminated(cols, idx)
        return pa.table([cols[name] for name in MANIFEST_SCHEMA.names], schema=MANIFEST_SCHEMA)

    def _contaminated(self, cols: dict[str, pa.Array], idx: np.ndarray) -> None:
        """Overwrite the reason, duplicate_of and link columns of the contaminated rows at ``idx``."""
        c = self.contamination
        assert c is not None
        hit, pos = c.positions(idx)
        if not hit.any():
            return
        reasons = pa.array(REASONS + tuple(f"contaminates:{name}" for name in c.names), pa.string())
        code = np.where(hit, len(REASONS) + c.which[pos], 0)
        cols["reason"] = pa.array(np.where(hit, reasons.take(pa.array(code)).to_numpy(zero_copy_only=False), cols["reason"].to_numpy(zero_copy_only=False)), pa.string())
        named = pa.array([f"{c.names[int(c.which[p])]}:{c.eval_ids[int(p)].as_py()}" if h else None for h, p in zip(hit.tolist(), pos.tolist(), strict=True)], pa.string())
        cols["duplicate_of"] = pa.array(np.where(hit, named.to_numpy(zero_copy_only=False), cols["duplicate_of"].to_numpy(zero_copy_only=False)), pa.string())
        score = np.where(hit, c.score[pos], cols["similarity"].to_numpy(zero_copy_only=False))
        cols["similarity"] = pa.array(score.astype(np.float32), pa.float32(), mask=np.isnan(score))
        sig = np.where(hit, c.signal[pos].astype(np.int64), -1)
        names = self.signal_names().take(pa.array(sig, pa.int64(), mask=sig < 0)).to_numpy(zero_copy_only=False)
        cols["signal"] = pa.array(np.where(hit, names, cols["signal"].to_numpy(zero_copy_only=False)), pa.string())

    def batches(self, size: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
        """The manifest in consecutive slices of ``size`` rows (one chunk per column)."""
        start = 0
        for sample in self.rows.batches(_SAMPLE_COLUMNS, size):
            idx = np.arange(start, start + sample.num_rows, dtype=np.int64)
            start += sample.num_rows
            yield self.assemble(sample, idx)

    def take(self, idx: np.ndarray) -> pa.Table:
        """The manifest rows at sorted global rows ``idx``."""
        idx = np.asarray(idx, np.int64)
        return self.assemble(self.rows.take(_SAMPLE_COLUMNS, idx), idx)

    def table(self) -> pa.Table:
        """The whole manifest in memory (one chunk per column): for small inputs."""
        return pa.concat_tables(list(self.batches())).combine_chunks()


def build_manifest(
    table: pa.Table | FeatureRows,
    labels: np.ndarray,
    keep_row: np.ndarray,
    edges: Edges,
    *,
    embedding_label: str = "embedding",
) -> pa.Table:
    """The manifest of a run from its feature rows, cluster labels, keepers and links, in memory."""
    return Manifest.build(table, labels, keep_row, edges, embedding_label=embedding_label).table()


class _GroupWriter:
    """A parquet file written a row group at a time: the same bytes as ``pq.write_table`` of
    the whole table (one chunk per column) with the same settings."""

    def __init__(self, path: Path, schema: pa.Schema, **options: object) -> None:
        self.path, self.schema, self.options = path, schema, options

    def write(self, tables: Iterable[pa.Table], row_group_size: int = ROW_GROUP_ROWS) -> None:
        with atomic_path(self.path) as tmp, pq.ParquetWriter(tmp, self.schema, **self.options) as writer:  # type: ignore[arg-type]
            wrote = False
            for group in rechunk(tables, row_group_size):
                writer.write_table(group, row_group_size=row_group_size)
                wrote = True
            if not wrote:
                writer.write_table(self.schema.empty_table(), row_group_size=row_group_size)


def _tables(manifest: pa.Table | Manifest | Iterable[pa.Table]) -> Iterable[pa.Table]:
    if isinstance(manifest, Manifest):
        return manifest.batches()
    if isinstance(manifest, pa.Table):
        return [manifest.combine_chunks()]
    return manifest


def write_manifest(manifest: pa.Table | Manifest | Iterable[pa.Table], path: Path) -> None:
    """Write atomically, a row group at a time, with settings fixed so the same rows give the
    same bytes."""
    _GroupWriter(path, MANIFEST_SCHEMA, compression="zstd", write_statistics=True).write(_tables(manifest))


def write_keep_list(manifest: pa.Table | Manifest | Iterable[pa.Table], path: Path) -> None:
    """The kept samples as an img2dataset ``url_list`` (``--input_format parquet --url_col url
    --caption_col caption``), with ``sample_id`` and ``key`` to join back."""
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in KEEP_COLUMNS])
    kept = (t.filter(pc.field("keep")).select(list(KEEP_COLUMNS)) for t in _tables(manifest))
    _GroupWriter(path, schema, compression="zstd").write(kept)


def write_remove_list(manifest: Manifest, path: Path) -> None:
    """The dropped duplicates as ``remove.parquet``: :data:`REMOVE_SCHEMA`, in manifest order.

    One row per sample that a run drops (failed samples are not listed: nothing was decided
    about them), with ``sha256`` of its bytes (32 raw bytes, as in the index), the cluster,
    why (``reason``: ``duplicate``, or ``contaminates:<eval>`` once a run has evaluation
    sets), the sample it copies (``duplicate_of``: the kept one) and the link that tied it
    there (``signal``, ``similarity``). Filter a dataset with it by ``key`` (img2dataset's sidecar, a Hugging Face
    dataset's row) or ``sample_id``; written a row group at a time.
    """

    def dropped() -> Iterator[pa.Table]:
        start = 0
        for sample in manifest.rows.batches((*_SAMPLE_COLUMNS, "sha256")):
            idx = np.arange(start, start + sample.num_rows, dtype=np.int64)
            start += sample.num_rows
            mask = manifest.ok[idx] & ~(manifest.keep_row[idx] == idx)
            if not mask.any():
                continue
            rows = manifest.assemble(sample, idx).append_column("sha256", sample.column("sha256"))
            yield rows.filter(pa.array(mask)).select(REMOVE_SCHEMA.names)

    _GroupWriter(path, REMOVE_SCHEMA, compression="zstd").write(dropped())
