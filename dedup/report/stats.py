"""The duplication-count distribution and the other numbers of ``report.json``.

Everything here is an aggregation over the manifest and the links, so ``dedup report`` can
recompute it from a finished run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dedup import __version__
from dedup.config import ReportConfig, RunConfig, to_dict
from dedup.errors import error_kind
from dedup.report.phrases import key_phrases
from dedup.search import Edges, Signal


def build_report(
    manifest: pa.Table,
    edges: Edges,
    levels: dict[float, tuple[int, int]],
    cfg: RunConfig,
    *,
    shard_stats: dict[str, Any],
    embedding_label: str = "embedding",
) -> dict[str, Any]:
    status = np.asarray(manifest.column("status").to_numpy(zero_copy_only=False))
    ok = status == "ok"
    keep = np.asarray(manifest.column("keep").to_numpy(zero_copy_only=False), bool)
    cluster = np.asarray(manifest.column("cluster_id").fill_null(-1).to_numpy(), np.int64)[ok]
    _, size_of_cluster = np.unique(cluster, return_counts=True)
    # Per sample: how many other samples are copies of it (the paper's "duplicate count").
    dup_count = np.repeat(size_of_cluster - 1, size_of_cluster)
    sizes, counts = np.unique(size_of_cluster, return_counts=True)
    n_ok = int(ok.sum())
    dropped = int((ok & ~keep).sum())
    in_dups = dup_count[dup_count > 0]

    errors: dict[str, int] = {}
    for err in manifest.filter(pa.compute.equal(manifest.column("status"), "failed")).column("error").to_pylist():
        kind = error_kind(err)
        errors[kind] = errors.get(kind, 0) + 1

    links = edges.counts_by_signal()
    if "embedding" in links:
        links[embedding_label] = links.pop("embedding")
    return {
        "dedup_version": __version__,
        "summary": {
            "samples": manifest.num_rows,
            "ok": n_ok,
            "failed": int((~ok).sum()),
            "clusters": int(size_of_cluster.shape[0]),
            "duplicate_clusters": int((size_of_cluster > 1).sum()),
            "samples_in_duplicate_clusters": int(size_of_cluster[size_of_cluster > 1].sum()),
            "kept": int(keep.sum()),
            "dropped": dropped,
            "share_removable": dropped / n_ok if n_ok else 0.0,
            "largest_cluster": int(size_of_cluster.max()) if size_of_cluster.size else 0,
        },
        "cluster_size_histogram": [[int(s), int(c)] for s, c in zip(sizes, counts, strict=True)],
        # Samples per duplicate count: the distribution the report plots (histogram and CCDF).
        "duplicate_count_histogram": [[int(d), int(c)] for d, c in zip(*np.unique(dup_count, return_counts=True), strict=True)],
        "duplicate_count": {
            "all_samples": _dist(dup_count),
            "samples_with_duplicates": _dist(in_dups),
        },
        "links_per_signal": links,
        "embedding_pairs_at": {
            f"{t:g}": {"pairs": p, "samples": s}
            for t, (p, s) in sorted(levels.items(), reverse=True)
        },
        "failures": dict(sorted(errors.items())),
        "thresholds": {
            "embedding_model": embedding_label,
            "embedding_similarity": cfg.search.threshold,
            "pdq_distance": cfg.search.pdq_distance,
            "phash_distance": cfg.search.phash_distance,
            "exact": cfg.search.exact,
        },
        "largest_clusters": largest_clusters(manifest, cfg.report),
        "caption_phrases": caption_phrases(manifest, cfg.report),
        "shards": shard_stats,
        "config": to_dict(cfg),
        "signals": [s.label for s in Signal],
    }


def _dist(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0, "mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0}
    return {
        "n": int(values.size),
        "mean": round(float(values.mean()), 6),
        "median": float(np.median(values)),
        "p99": float(np.percentile(values, 99)),
        "max": int(values.max()),
    }


def largest_clusters(manifest: pa.Table, cfg: ReportConfig) -> list[dict[str, Any]]:
    """The ``cfg.top_clusters`` largest duplicate clusters (ties: lower cluster id first), each
    with up to ``cfg.thumbs_per_cluster`` of its samples (the kept one first, then input order)
    and how many of its links each signal made."""
    if cfg.top_clusters <= 0:
        return []
    ok = np.asarray(manifest.column("status").to_numpy(zero_copy_only=False) == "ok")
    cluster = np.asarray(manifest.column("cluster_id").fill_null(-1).to_numpy(), np.int64)
    size = np.asarray(manifest.column("cluster_size").fill_null(0).to_numpy(), np.int64)
    rows = np.flatnonzero(ok & (size > 1))
    if rows.size == 0:
        return []
    ids, first = np.unique(cluster[rows], return_index=True)
    order = np.lexsort((ids, -size[rows][first]))[: cfg.top_clusters]
    chosen = set(ids[order].tolist())
    keep = np.asarray(manifest.column("keep").to_numpy(zero_copy_only=False), bool)
    cols = {name: manifest.column(name) for name in ("sample_id", "shard", "url", "caption", "reason", "signal", "similarity")}
    members: dict[int, list[int]] = {}
    signals: dict[int, dict[str, int]] = {}
    for r in rows[np.isin(cluster[rows], list(chosen))].tolist():
        c = int(cluster[r])
        members.setdefault(c, []).append(r)
        sig = cols["signal"][r].as_py()
        if sig is not None:
            signals.setdefault(c, {})
            signals[c][sig] = signals[c].get(sig, 0) + 1
    out: list[dict[str, Any]] = []
    for c in ids[order].tolist():
        rs = sorted(members[c], key=lambda r: (not keep[r], r))[: max(0, cfg.thumbs_per_cluster)]
        samples = []
        for r in rs:
            sim = cols["similarity"][r].as_py()
            samples.append(
                {
                    "sample_id": cols["sample_id"][r].as_py(),
                    "shard": cols["shard"][r].as_py(),
                    "url": cols["url"][r].as_py(),
                    "caption": cols["caption"][r].as_py(),
                    "reason": cols["reason"][r].as_py(),
                    "signal": cols["signal"][r].as_py(),
                    "similarity": None if sim is None else round(float(sim), 4),
                }
            )
        out.append(
            {
                "cluster_id": int(c),
                "size": int(len(members[c])),
                "signals": dict(sorted(signals.get(c, {}).items())),
                "samples": samples,
            }
        )
    return out


def caption_phrases(manifest: pa.Table, cfg: ReportConfig) -> dict[str, Any]:
    """Caption n-grams over-represented in duplicate clusters (see :mod:`dedup.report.phrases`)."""
    ok = np.asarray(manifest.column("status").to_numpy(zero_copy_only=False) == "ok")
    rows = np.flatnonzero(ok)
    captions = manifest.column("caption").take(pa.array(rows)).to_pylist()
    cluster = np.asarray(manifest.column("cluster_id").fill_null(-1).to_numpy(), np.int64)[rows]
    size = np.asarray(manifest.column("cluster_size").fill_null(0).to_numpy(), np.int64)[rows]
    return key_phrases(
        captions,
        cluster.tolist(),
        (size > 1).tolist(),
        min_support=cfg.phrase_min_support,
        min_clusters=cfg.phrase_min_clusters,
        limit=cfg.phrases,
    )
