"""Wire the stages: per-shard features (checkpointed, parallel), then the global stages.

``run(sources, out)`` is the library form of ``dedup run``::

    sources ─► discover ─► [read → fingerprint → embed] per shard ─► search ─► cluster ─► select ─► write

The per-shard part runs through an executor and leaves a checkpoint per shard under
``OUT/.work/<settings>/``; a rerun skips finished shards, so a crash costs at most the shards in
flight. The global part is a pure function of the checkpoints and the config, so it simply runs
again and gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup import __version__
from dedup._io import atomic_write_text
from dedup._types import Shard
from dedup.cluster import components
from dedup.config import RunConfig, save_config
from dedup.errors import OutputError
from dedup.executors.base import Executor, Markers, merge_stats
from dedup.executors.local import LocalExecutor
from dedup.featurize import SCHEMA, FeatureStep
from dedup.index import write_index
from dedup.manifest import build_manifest, write_keep_list, write_manifest
from dedup.report import build_report, write_report_html
from dedup.search import (
    Edges,
    Signal,
    embedding_edges,
    exact_edges,
    hamming_edges,
    normalise_caption,
    normalise_url,
    pack_uint64,
)
from dedup.select import keepers
from dedup.sources import discover


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> object: ...
    def set_postfix_str(self, s: str) -> object: ...


ProgressFactory = Callable[[str, int | None, str], AbstractContextManager[ProgressBar]]
"""``progress(stage, total, unit)`` → a context manager whose value has ``update(n)``."""


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def _silent(stage: str, total: int | None, unit: str) -> AbstractContextManager[ProgressBar]:
    return nullcontext(_Silent())


@dataclass(frozen=True, slots=True)
class RunResult:
    out: Path
    samples: int
    failed: int
    clusters: int  # clusters of two or more
    dropped: int
    report: dict[str, Any]


WORK_DIR = ".work"


def run(
    sources: Sequence[str],
    out: str | Path,
    *,
    config: RunConfig | None = None,
    executor: Executor | None = None,
    progress: ProgressFactory | None = None,
) -> RunResult:
    """Deduplicate ``sources`` into ``out``; resumes from the checkpoints of an earlier run."""
    cfg = config or RunConfig()
    prog = progress or _silent
    out_dir = Path(out)
    _prepare_out(out_dir)
    shards = discover(sources, folder_batch=cfg.folder_batch)
    work = out_dir / WORK_DIR / cfg.stage_key()
    features_dir = work / "shards"
    features_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.json")

    step = FeatureStep(config=cfg, out_dir=features_dir)
    runner = executor or LocalExecutor(workers=cfg.workers)
    with prog("fingerprint + embed", None, "img") as bar:
        seen = {"shards": 0, "failed": 0}

        def on_done(shard: Shard, stats: dict[str, Any]) -> None:
            seen["shards"] += 1
            seen["failed"] += int(stats.get("failed", 0))
            bar.set_postfix_str(f"{seen['shards']}/{len(shards)} shards, {seen['failed']} failed")

        per_shard = runner.run(
            step, shards, markers=Markers(work / "done"), on_done=on_done, on_progress=bar.update
        )
    shard_stats = merge_stats([per_shard[s.shard_id] for s in shards])

    table, vectors = load_features(step, shards)
    return finish(table, vectors, out_dir, cfg, shard_stats=shard_stats, progress=prog)


def load_features(step: FeatureStep, shards: Sequence[Shard]) -> tuple[pa.Table, np.ndarray]:
    """All shards' feature rows (in shard order) and the embeddings of the embedded rows."""
    tables: list[pa.Table] = []
    vectors: list[np.ndarray] = []
    for shard in shards:
        parquet_path, npy_path = step.paths(shard)
        tables.append(pq.read_table(parquet_path, schema=SCHEMA))
        vectors.append(np.load(npy_path))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    dims = {v.shape[1] for v in vectors if v.shape[0]}
    dim = dims.pop() if dims else 0
    emb = np.concatenate([v for v in vectors if v.shape[0]]) if dim else np.zeros((0, 0), np.float32)
    return table, emb


def find_edges(
    table: pa.Table,
    vectors: np.ndarray,
    cfg: RunConfig,
    *,
    progress: ProgressFactory = _silent,
) -> tuple[Edges, dict[float, tuple[int, int]]]:
    """Every link the configured signals make, and the pair counts at the report thresholds."""
    search = cfg.search
    ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
    has_image = np.asarray(table.column("has_image").to_numpy(zero_copy_only=False), bool) & ok
    parts: list[Edges] = []

    if search.exact:
        sha = table.column("sha256").to_pylist()
        pix = table.column("pixel_sha256").to_pylist()
        parts.append(exact_edges([v if ok[r] else None for r, v in enumerate(sha)], signal=Signal.EXACT_BYTES))
        parts.append(exact_edges([v if ok[r] else None for r, v in enumerate(pix)], signal=Signal.EXACT_PIXELS))

    levels: dict[float, tuple[int, int]] = {}
    embedded_rows = np.flatnonzero(np.asarray(table.column("embedded").to_numpy(zero_copy_only=False), bool))
    if vectors.shape[0]:
        with progress("search (embeddings)", int(vectors.shape[0]), "vec") as bar:
            found, levels = embedding_edges(
                vectors,
                threshold=search.threshold,
                rows=embedded_rows,
                block_size=search.block_size,
                count_at=search.report_thresholds,
                progress=bar.update,
            )
        parts.append(found)

    if search.pdq_distance >= 0:
        pdq = table.column("pdq").to_pylist()
        rows = np.array([r for r, v in enumerate(pdq) if v is not None and has_image[r]], np.int64)
        if rows.size:
            codes = np.frombuffer(b"".join(pdq[r] for r in rows), np.uint8).reshape(-1, 32)
            parts.append(
                hamming_edges(codes, max_distance=search.pdq_distance, signal=Signal.PDQ, rows=rows, block_size=search.block_size)
            )
    if search.phash_distance >= 0:
        ph = table.column("phash").to_numpy(zero_copy_only=False)
        valid = np.array([v is not None for v in table.column("phash").to_pylist()]) & has_image
        rows = np.flatnonzero(valid)
        if rows.size:
            codes = pack_uint64(np.asarray(ph[rows], np.uint64))
            parts.append(
                hamming_edges(codes, max_distance=search.phash_distance, signal=Signal.PHASH, rows=rows, block_size=search.block_size)
            )

    # URL and caption links only between samples we could not look at (metadata-only rows):
    # for images, identical captions ("Canvas Wall Art Print") say nothing about the pixels.
    meta_only = ok & ~has_image
    if meta_only.any():
        if search.url:
            urls = table.column("url").to_pylist()
            parts.append(exact_edges([normalise_url(u) if meta_only[r] else None for r, u in enumerate(urls)], signal=Signal.URL))
        if search.caption:
            caps = table.column("caption").to_pylist()
            parts.append(
                exact_edges([normalise_caption(c) if meta_only[r] else None for r, c in enumerate(caps)], signal=Signal.CAPTION)
            )
    return Edges.concat(parts), levels


def finish(
    table: pa.Table,
    vectors: np.ndarray,
    out_dir: Path,
    cfg: RunConfig,
    *,
    shard_stats: dict[str, Any],
    progress: ProgressFactory = _silent,
) -> RunResult:
    """The global stages over all features: search, cluster, select, and every output."""
    edges, levels = find_edges(table, vectors, cfg, progress=progress)
    with progress("cluster + select", 1, "step") as bar:
        n = table.num_rows
        labels = components(n, edges)
        ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
        width = np.asarray(table.column("width").to_numpy(zero_copy_only=False), np.float64)
        height = np.asarray(table.column("height").to_numpy(zero_copy_only=False), np.float64)
        metric = _metric(table, cfg.keep.column) if cfg.keep.column else None
        keep_row = keepers(labels, policy=cfg.keep.policy, eligible=ok, pixels=width * height, metric=metric)
        manifest = build_manifest(table, labels, keep_row, edges, embedding_label=cfg.embed.model.value)
        bar.update(1)
    with progress("write outputs", 1, "step") as bar:
        write_manifest(manifest, out_dir / "manifest.parquet")
        write_keep_list(manifest, out_dir / "keep.parquet")
        write_index(out_dir / "index", table, vectors, labels, cfg)
        report = build_report(manifest, edges, levels, cfg, shard_stats=shard_stats, embedding_label=cfg.embed.model.value)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
        write_report_html(report, out_dir / "report.html")
        bar.update(1)
    summary = report["summary"]
    return RunResult(
        out=out_dir,
        samples=summary["samples"],
        failed=summary["failed"],
        clusters=summary["duplicate_clusters"],
        dropped=summary["dropped"],
        report=report,
    )


def _metric(table: pa.Table, column: str) -> np.ndarray:
    """A numeric metadata column for the ``column`` keep policy (NaN where missing)."""
    values = np.full(table.num_rows, np.nan)
    for r, blob in enumerate(table.column("meta").to_pylist()):
        if blob:
            v = json.loads(blob).get(column)
            if isinstance(v, int | float) and not isinstance(v, bool):
                values[r] = float(v)
    return values


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder; pick another path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {out_dir}: {err.strerror}") from None
    stamp = out_dir / "dedup.json"
    if any(p.name != WORK_DIR for p in out_dir.iterdir()) and not stamp.exists():
        raise OutputError(
            f"output folder {out_dir} is not empty and was not written by dedup; "
            "choose an empty or new folder"
        )
    if not stamp.exists():
        atomic_write_text(stamp, json.dumps({"tool": "dedup", "version": __version__}) + "\n")

