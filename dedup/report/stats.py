"""The duplication-count distribution and the other numbers of ``report.json``.

Everything here is an aggregation over the manifest and the links, so ``dedup report`` can
recompute it from a finished run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dedup import __version__
from dedup.config import RunConfig, to_dict
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
        kind = (err or "unknown").split(":", 1)[0].strip()[:60] or "unknown"
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
