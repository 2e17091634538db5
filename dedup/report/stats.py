"""The duplication-count distribution and the other numbers of ``report.json``.

Everything here is an aggregation over the manifest and the links, so ``dedup report`` can
recompute it from a finished run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from dedup._version import __version__
from dedup.config import ReportConfig, RunConfig, to_dict
from dedup.errors import error_kind
from dedup.manifest import Manifest
from dedup.report.phrases import MAX_DUPLICATE_CAPTIONS, MAX_OTHER_CAPTIONS, PHRASE_SEED, phrase_section
from dedup.search import Edges, Signal


def build_report(
    manifest: Manifest,
    edges: Edges,
    levels: dict[float, tuple[int, int]],
    cfg: RunConfig,
    *,
    shard_stats: dict[str, Any],
    embedding_label: str = "embedding",
) -> dict[str, Any]:
    """``report.json``'s numbers, from the manifest's per-row arrays (:class:`~dedup.manifest.
    Manifest`); rows are read back only for the samples the report names or samples."""
    m = manifest
    ok = m.ok
    keep = m.keep
    cluster = m.labels[ok]
    _, size_of_cluster = np.unique(cluster, return_counts=True)
    # Per sample: how many other samples are copies of it (the paper's "duplicate count").
    dup_count = np.repeat(size_of_cluster - 1, size_of_cluster)
    sizes, counts = np.unique(size_of_cluster, return_counts=True)
    n_ok = int(ok.sum())
    dropped = int((ok & ~keep).sum())
    in_dups = dup_count[dup_count > 0]

    # Failures per kind: error_kind once per distinct error text, not once per row.
    errors: dict[str, int] = {}
    failed = np.flatnonzero(~ok)
    if failed.size:
        texts = m.rows.take(["error"], failed).column(0)
        for item in pc.value_counts(texts).to_pylist():
            kind = error_kind(item["values"])
            errors[kind] = errors.get(kind, 0) + int(item["counts"])

    links = edges.counts_by_signal()
    if "embedding" in links:
        links[embedding_label] = links.pop("embedding")
    return {
        "dedup_version": __version__,
        "summary": {
            "samples": m.num_rows,
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
        "largest_clusters": largest_clusters(m, cfg.report),
        "caption_phrases": caption_phrases(m, cfg.report),
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


def largest_clusters(manifest: Manifest, cfg: ReportConfig) -> list[dict[str, Any]]:
    """The ``cfg.top_clusters`` largest duplicate clusters (ties: lower cluster id first), each
    with up to ``cfg.thumbs_per_cluster`` of its samples (the kept one first, then input order)
    and how many of its links each signal made."""
    if cfg.top_clusters <= 0:
        return []
    m = manifest
    ok = m.ok
    cluster = m.labels
    size = m.size
    rows = np.flatnonzero(ok & (size > 1))
    if rows.size == 0:
        return []
    ids, first = np.unique(cluster[rows], return_index=True)
    order = np.lexsort((ids, -size[rows][first]))[: cfg.top_clusters]
    chosen_ids = ids[order]
    keep = m.keep
    member_rows = rows[np.isin(cluster[rows], chosen_ids)]
    names = m.signal_names().to_pylist()
    members: dict[int, list[int]] = {}
    signals: dict[int, dict[str, int]] = {}
    for r in member_rows.tolist():
        c = int(cluster[r])
        members.setdefault(c, []).append(r)
        code = int(m.link_sig[r])
        if code >= 0:
            sig = names[code]
            signals.setdefault(c, {})
            signals[c][sig] = signals[c].get(sig, 0) + 1
    shown = {c: sorted(rs, key=lambda r: (not keep[r], r))[: max(0, cfg.thumbs_per_cluster)] for c, rs in members.items()}
    wanted = np.array(sorted(r for rs in shown.values() for r in rs), np.int64)
    table = m.take(wanted)
    cols = {name: table.column(name).to_pylist() for name in ("sample_id", "shard", "url", "caption", "reason", "signal", "similarity")}
    at = {int(r): k for k, r in enumerate(wanted.tolist())}
    out: list[dict[str, Any]] = []
    for c in chosen_ids.tolist():
        samples = []
        for r in shown[c]:
            k = at[r]
            sim = cols["similarity"][k]
            samples.append(
                {
                    "sample_id": cols["sample_id"][k],
                    "shard": cols["shard"][k],
                    "url": cols["url"][k],
                    "caption": cols["caption"][k],
                    "reason": cols["reason"][k],
                    "signal": cols["signal"][k],
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


def caption_phrases(manifest: Manifest, cfg: ReportConfig) -> dict[str, Any]:
    """Caption n-grams over-represented in duplicate clusters (see :mod:`dedup.report.phrases`).

    Reads the captions of at most :data:`~dedup.report.phrases.MAX_DUPLICATE_CAPTIONS`
    duplicate samples and :data:`~dedup.report.phrases.MAX_OTHER_CAPTIONS` other ones, drawn
    uniformly (fixed seed) when there are more: memory and time do not grow with the run.
    """
    m = manifest
    ok = m.ok
    dup = ok & (m.size > 1)
    dup_rows = np.flatnonzero(dup)
    other_rows = np.flatnonzero(ok & ~dup)
    rng = np.random.default_rng(PHRASE_SEED)
    dup_pick = _draw(dup_rows, MAX_DUPLICATE_CAPTIONS, rng)
    other_pick = _draw(other_rows, MAX_OTHER_CAPTIONS, rng)
    # One read of the rows drawn, in row order (the order the counts are made in).
    both = np.union1d(dup_pick, other_pick)
    captions = m.rows.take(["caption"], both).column(0).to_pylist()
    is_dup = dup[both]
    return phrase_section(
        [c for c, d in zip(captions, is_dup.tolist(), strict=True) if d],
        m.labels[both][is_dup].tolist(),
        [c for c, d in zip(captions, is_dup.tolist(), strict=True) if not d],
        duplicate_samples=int(dup_rows.size),
        other_samples=int(other_rows.size),
        min_support=cfg.phrase_min_support,
        min_clusters=cfg.phrase_min_clusters,
        limit=cfg.phrases,
    )


def _draw(rows: np.ndarray, most: int, rng: np.random.Generator) -> np.ndarray:
    """All of ``rows`` or, when there are more than ``most``, a uniform sample of them (sorted)."""
    if rows.size <= most:
        return rows
    return np.sort(rng.choice(rows, size=most, replace=False))
