"""The manifest: one row per input sample, saying which cluster it is in and whether to keep it.

Columns (DESIGN.md's contract): ``sample_id, source, shard, key, url, caption, width, height,
status, error, cluster_id, cluster_size, keep, reason, duplicate_of, similarity, signal``.
``reason`` is one of ``unique``, ``representative`` (kept for its cluster), ``duplicate``
(dropped: ``duplicate_of`` names the kept sample, ``signal``/``similarity`` the strongest link
to it, or to the cluster when there is no direct one) and ``failed`` (``error`` says why).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup._io import atomic_path
from dedup.cluster import sizes
from dedup.featurize import SCHEMA
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

REASONS = ("unique", "representative", "duplicate", "failed")


def build_manifest(
    table: pa.Table,
    labels: np.ndarray,
    keep_row: np.ndarray,
    edges: Edges,
    *,
    embedding_label: str = "embedding",
) -> pa.Table:
    """The manifest of a run from its feature rows, cluster labels, keepers and links."""
    n = table.num_rows
    rows = np.arange(n, dtype=np.int64)
    ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
    size = sizes(labels)
    keep = ok & (keep_row == rows)
    reason = np.where(~ok, "failed", np.where(size == 1, "unique", np.where(keep, "representative", "duplicate")))
    dropped = ok & ~keep

    link_sig = np.full(n, -1, np.int64)
    link_score = np.full(n, np.nan, np.float32)
    if len(edges) and dropped.any():
        a = np.concatenate([edges.i, edges.j])
        b = np.concatenate([edges.j, edges.i])
        s = np.concatenate([edges.score, edges.score])
        g = np.concatenate([edges.signal, edges.signal]).astype(np.int64)
        mine = dropped[a]
        a, b, s, g = a[mine], b[mine], s[mine], g[mine]
        direct = b == keep_row[a]
        # Per dropped row: a direct link to the keeper first, then the strongest signal
        # (exact before embedding before hashes), then the highest score.
        order = np.lexsort((-s, g, ~direct, a))
        a, s, g = a[order], s[order], g[order]
        first = np.ones(a.shape[0], bool)
        first[1:] = a[1:] != a[:-1]
        link_sig[a[first]] = g[first]
        link_score[a[first]] = s[first]

    labels_for = {int(c): (embedding_label if c == Signal.EMBEDDING else Signal(c).label) for c in Signal}
    signal = [labels_for.get(int(c)) if c >= 0 else None for c in link_sig]
    sample_ids = table.column("sample_id").to_pylist()
    duplicate_of = [sample_ids[keep_row[r]] if dropped[r] and keep_row[r] >= 0 else None for r in range(n)]

    cols = {name: table.column(name) for name in _SAMPLE_COLUMNS}
    cols["cluster_id"] = pa.array(labels, pa.int64(), mask=~ok)
    cols["cluster_size"] = pa.array(size, pa.int64(), mask=~ok)
    cols["keep"] = pa.array(keep, pa.bool_())
    cols["reason"] = pa.array(reason.tolist(), pa.string())
    cols["duplicate_of"] = pa.array(duplicate_of, pa.string())
    cols["similarity"] = pa.array(link_score, pa.float32(), mask=np.isnan(link_score))
    cols["signal"] = pa.array(signal, pa.string())
    return pa.table([cols[name] for name in MANIFEST_SCHEMA.names], schema=MANIFEST_SCHEMA)


def write_manifest(manifest: pa.Table, path: Path) -> None:
    """Write atomically, with settings fixed so the same table gives the same bytes."""
    with atomic_path(path) as tmp:
        pq.write_table(manifest, tmp, compression="zstd", row_group_size=1 << 20, write_statistics=True)


def write_keep_list(manifest: pa.Table, path: Path) -> None:
    """The kept samples as an img2dataset ``url_list`` (``--input_format parquet --url_col url
    --caption_col caption``), with ``sample_id`` and ``key`` to join back."""
    kept = manifest.filter(pc.field("keep"))
    table = kept.select(["url", "caption", "sample_id", "key", "width", "height"])
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
