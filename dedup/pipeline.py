"""Wire the stages: per-shard features (checkpointed, parallel), then the global stages.

``run(sources, out)`` is the library form of ``dedup run``::

    sources ─► discover ─► [read → fingerprint → embed] per shard ─► search ─► cluster ─► select ─► write

The per-shard part runs through an executor and leaves a checkpoint per shard under
``OUT/.work/<settings>/``; a rerun skips finished shards, so a crash costs at most the shards in
flight. The global part is a pure function of the checkpoints and the config, so it simply runs
again and gives the same bytes.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup._version import __version__
from dedup._progress import ProgressFactory, silent
from dedup._io import atomic_write_text, is_temp_name, make_out_dir, output_errors, remove_stale_temps
from dedup._types import Shard, ShardKind
from dedup.cluster import components, guarded_components
from dedup.config import RunConfig, save_config
from dedup.errors import OutputError, SourceError
from dedup.executors.base import Executor, Markers, merge_stats
from dedup.executors.local import LocalExecutor
from dedup.featurize import SCHEMA, FeatureStep
from dedup.store import Catalog, index_dir, index_lock, write_index
from dedup.manifest import Manifest, write_keep_list, write_manifest
from dedup.second_look import load_regions, load_trims, second_look
from dedup.partition import VectorFiles
from dedup.report import build_report, write_report_pages
from dedup.rows import FeatureRows, as_rows
from dedup.search import (
    Edges,
)
from dedup.select import keepers
from dedup.signals import PRECOMPUTED, find_edges, refuse_mixed_vectors, vector_kinds
from dedup.sources import discover


@dataclass(frozen=True, slots=True)
class RunResult:
    out: Path
    samples: int
    failed: int
    clusters: int  # clusters of two or more
    dropped: int
    report: dict[str, Any]


WORK_DIR = ".work"
FEATURES = "shards"  # the per-shard checkpoints, inside a run's work folder
RUN_LOCK = ".lock"  # flock(2) of OUT while a run writes into it
_IMAGE_KINDS = frozenset({ShardKind.WEBDATASET, ShardKind.I2D_PARQUET, ShardKind.I2D_FILES, ShardKind.FOLDER})


@output_errors("out")  # a full disk or read-only --out: OutputError, not a traceback
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
    prog = progress or silent
    out_dir = Path(out)
    with run_lock(out_dir):
        phases = PhaseLog()
        shards = discover(sources, folder_batch=cfg.folder_batch)
        refuse_mixed_vectors(None, vector_kinds(shards, cfg), where="")
        save_config(cfg, out_dir / "config.json")
        work = out_dir / WORK_DIR / cfg.stage_key()
        # The rows stay in their per-shard checkpoints: the global stage reads the columns each
        # step needs, a row group at a time where it can (dedup.rows).
        rows, vectors, per_shard = featurize(shards, work, cfg, executor=executor, progress=prog, lazy=True)
        shard_stats = merge_stats([per_shard[s.shard_id] for s in shards])
        catalog = Catalog.of_run(sources, shards, per_shard, rows)
        phases.done("read + featurize")
        phases.close()
        # Writers of OUT/index hold its lock, so a concurrent `dedup check` never reads half of it.
        with index_lock(index_dir(out_dir), exclusive=True):
            return finish(
                rows,
                vectors,
                out_dir,
                cfg,
                shard_stats=shard_stats,
                progress=prog,
                shards=shards,
                catalog=catalog,
                features_dir=work / FEATURES,
            )


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Prepare ``out_dir`` and hold ``OUT/.lock`` (flock, exclusive) while a run writes into it:
    a second run into the same folder stops at once with an OutputError (exit 2), instead of
    the two interleaving their checkpoints and outputs."""
    _check_out(out_dir)
    fd = os.open(out_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"another dedup run is writing to {out_dir}; hint: wait for it to finish, or pick another --out"
            ) from None
        _prepare_out(out_dir)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def featurize(
    shards: Sequence[Shard],
    work: Path,
    cfg: RunConfig,
    *,
    executor: Executor | None = None,
    progress: ProgressFactory = silent,
    lazy: bool = False,
) -> tuple[Any, np.ndarray, dict[str, dict[str, Any]]]:
    """The per-shard stage: features of every shard (checkpointed under ``work``, resumed from
    there), then all rows in shard order, their embeddings and each shard's stats.

    The rows are a ``pa.Table`` in memory, or with ``lazy`` a :class:`~dedup.rows.FeatureRows`
    over the checkpoint files (read a column or a row group at a time)."""
    features_dir = work / FEATURES
    features_dir.mkdir(parents=True, exist_ok=True)
    step = FeatureStep(config=cfg, out_dir=features_dir)
    runner = executor or LocalExecutor(workers=cfg.workers)
    with progress("fingerprint + embed", None, "img") as bar:
        seen = {"shards": 0, "failed": 0}

        def on_done(shard: Shard, stats: dict[str, Any]) -> None:
            seen["shards"] += 1
            seen["failed"] += int(stats.get("failed", 0))
            bar.set_postfix_str(f"{seen['shards']}/{len(shards)} shards, {seen['failed']} failed")

        # A marker whose checkpoint files are gone (deleted by hand, a cleaned disk) is not done.
        markers = Markers(work / "done", outputs=step.paths)
        per_shard = runner.run(step, shards, markers=markers, on_done=on_done, on_progress=bar.update)
    table, vectors = load_features(step, shards, lazy=lazy)
    return table, vectors, per_shard


def load_features(step: FeatureStep, shards: Sequence[Shard], *, lazy: bool = False) -> tuple[Any, np.ndarray]:
    """All shards' feature rows (in shard order) and the embeddings of the embedded rows.

    With ``lazy`` the rows are a :class:`~dedup.rows.FeatureRows` over the checkpoint files
    (nothing read yet); otherwise one ``pa.Table``. More than ``search.partition_above``
    embeddings are not loaded: the result is then a :class:`~dedup.partition.VectorFiles`
    over the per-shard ``.npy`` files (shape, blocks, row gathers; ``np.asarray`` materialises
    it), so memory does not grow with N.
    """
    paths = [step.paths(shard) for shard in shards]
    if lazy:
        table: Any = FeatureRows([p for p, _ in paths], SCHEMA)
    else:
        table = _read_tables([p for p, _ in paths])
    try:
        files = VectorFiles([n for _, n in paths])
    except ValueError as err:
        raise SourceError(
            f"{err}; hint: the embeddings of one run must come from one model (pass precomputed "
            "embeddings of different models as separate runs)"
        ) from None
    if len(files) > step.config.search.partition_above:
        return table, files  # type: ignore[return-value]  # array-like; see VectorFiles
    return table, (np.asarray(files) if len(files) else np.zeros((0, 0), np.float32))


def _read_tables(paths: Sequence[Path]) -> pa.Table:
    tables = [pq.read_table(p, schema=SCHEMA) for p in paths]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    del tables  # the concatenation shares their buffers
    # One chunk per column, a column at a time, each column's chunks freed once combined.
    names = table.column_names
    columns: list[pa.Array] = []
    while table.num_columns:
        columns.append(table.column(0).combine_chunks())
        table = table.remove_column(0)
        pa.default_memory_pool().release_unused()
    table = pa.table(dict(zip(names, columns, strict=True)), schema=SCHEMA)
    del columns
    pa.default_memory_pool().release_unused()
    return table


def finish(
    table: pa.Table | FeatureRows,
    vectors: np.ndarray,
    out_dir: Path,
    cfg: RunConfig,
    *,
    shard_stats: dict[str, Any],
    progress: ProgressFactory = silent,
    shards: Sequence[Shard] | None = None,
    catalog: Catalog | None = None,
    features_dir: Path | None = None,
) -> RunResult:
    """The global stages over all features: search, cluster, select, and every output.

    ``table``: the rows in memory or as :class:`~dedup.rows.FeatureRows` (a run's checkpoint
    files); each step reads the columns it needs, and every per-row output is written a row
    group at a time, so the bytes depend on the rows alone, not on where they were read from.
    ``shards`` (the run's) are where report.html reads its few thumbnails back from; when None
    they are rediscovered from the manifest's ``source`` column. ``catalog`` (sources and
    shards) goes into the index, for ``dedup index add``. ``features_dir`` holds the shards'
    checkpoints (:class:`~dedup.featurize.FeatureStep`'s folder), where the partial-copy search
    finds their region descriptors. Callers hold the index lock.
    """
    rows = as_rows(table)
    timer = PhaseLog()
    edges, levels = find_edges(rows, vectors, cfg, progress=progress, work_dir=out_dir / WORK_DIR / "search")
    timer.done("search")
    if shards is not None and (cfg.search.verify_from >= 0 or cfg.search.partial):
        # Uncertain and partial-copy candidates, confirmed on the re-read images (dedup.second_look).
        step = FeatureStep(config=cfg, out_dir=features_dir) if features_dir is not None else None
        regions = load_regions([step.regions_path(s) for s in shards]) if step and cfg.search.partial else None
        trims = load_trims([step.trims_path(s) for s in shards]) if step else None
        confirmed, second = second_look(rows, vectors, edges, cfg, shards=shards, regions=regions, trims=trims, progress=progress)
        edges = Edges.concat([edges, confirmed])
        shard_stats = {**shard_stats, "second_look": second}
        timer.done("second look")
    # Precomputed embeddings (clip-retrieval: usually CLIP) are not the configured model's.
    embedding_label = PRECOMPUTED if shard_stats.get("precomputed") else cfg.embed.model.value
    with progress("cluster + select", 1, "step") as bar:
        n = rows.num_rows
        ok = rows.equals("status", "ok")
        pixels = rows.numbers("width") * rows.numbers("height")
        labels, edges, shard_stats = _cluster(n, edges, pixels, cfg, shard_stats)
        metric = _metric(rows, cfg.keep.column) if cfg.keep.column else None
        keep_row = keepers(labels, policy=cfg.keep.policy, eligible=ok, pixels=pixels, metric=metric)
        del pixels, metric
        manifest = Manifest.build(rows, labels, keep_row, edges, embedding_label=embedding_label, ok=ok)
        bar.update(1)
    timer.done("cluster + select")
    with progress("write outputs", 1, "step") as bar:
        write_manifest(manifest, out_dir / "manifest.parquet")
        write_keep_list(manifest, out_dir / "keep.parquet")
        timer.done("write manifest")
        write_index(index_dir(out_dir), rows, vectors, labels, cfg, catalog=catalog, embedding_model=_index_model(shard_stats, vectors, cfg))
        timer.done("write index")
        report = build_report(manifest, edges, levels, cfg, shard_stats=shard_stats, embedding_label=embedding_label)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
        write_report_pages(
            report, out_dir, manifest=manifest, shards=shards, features=rows, thumb_size=cfg.report.thumb_size
        )
        timer.done("write report")
        timer.close()
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


def _cluster(
    n: int, edges: Edges, pixels: np.ndarray, cfg: RunConfig, shard_stats: dict[str, Any]
) -> tuple[np.ndarray, Edges, dict[str, Any]]:
    """Cluster labels per ``[cluster]``: plain components, or the chaining guard
    (:func:`~dedup.cluster.guarded_components`). With the guard, the links that cross clusters
    (template links, links to detached rows) leave the edges the manifest and report see, and
    the report counts them (``cluster`` in its shard stats)."""
    if not cfg.cluster.guard:
        return components(n, edges), edges, shard_stats
    g = guarded_components(
        n, edges, pixels=pixels, hops=cfg.cluster.hops, merge_templates=cfg.cluster.merge_templates
    )
    inside = g.labels[edges.i] == g.labels[edges.j]
    stats = {
        "guard": True,
        "hops": cfg.cluster.hops,
        "template_links": int(g.template.sum()),
        "templates_merged": cfg.cluster.merge_templates,
        "detached_rows": g.detached,
        "links_across_clusters": int((~inside).sum()),
    }
    kept = Edges(edges.i[inside], edges.j[inside], edges.score[inside], edges.signal[inside])
    return g.labels, kept, {**shard_stats, "cluster": stats}


def _index_model(shard_stats: dict[str, Any], vectors: np.ndarray, cfg: RunConfig) -> str:
    """What made the index's vectors: the configured model, or ``precomputed`` for precomputed
    embeddings (CLIP, usually), which query and check must not compare with a model's."""
    if not shard_stats.get("precomputed"):
        return cfg.embed.model.value
    return PRECOMPUTED


class PhaseLog:
    """Per global phase: wall time and peak resident memory, to stderr when ``DEDUP_PHASES`` is
    set (bench/scale.py sets it): where the time and memory of a run go.

    The peak is the kernel's high-water mark (``VmHWM``), reset after each phase through
    ``/proc/self/clear_refs``, so each line gives that phase's own peak; the run's peak is the
    largest of them. (``ru_maxrss`` as a parent sees it is no substitute: Linux starts a child's
    at the RSS its parent had when it forked.) Where the reset is refused, the peak is sampled
    every 50 ms instead, and may miss a shorter spike."""

    def __init__(self) -> None:
        self.on = bool(os.environ.get("DEDUP_PHASES"))
        self.start = time.perf_counter()
        self.peak = 0.0
        self.exact = self.on and _reset_hwm()
        if self.on and not self.exact:
            import threading

            self._stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_gib())

    def done(self, phase: str) -> None:
        if not self.on:
            return
        now = time.perf_counter()
        rss = _rss_gib()
        if self.exact:
            peak = _status_gib("VmHWM")
            self.exact = _reset_hwm()
        else:
            peak = max(self.peak, rss)
        print(f"[phase] {phase}: {now - self.start:.1f} s, peak RSS {peak:.2f} GiB, at the end {rss:.2f} GiB", file=sys.stderr, flush=True)
        self.start, self.peak = now, rss

    def close(self) -> None:
        if self.on and not self.exact and hasattr(self, "_stop"):
            self._stop.set()


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_gib(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / (1 << 20)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def _rss_gib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 30)
    except (OSError, ValueError, IndexError):
        return float("nan")


def _metric(table: pa.Table | FeatureRows, column: str) -> np.ndarray:
    """A numeric metadata column for the ``column`` keep policy (NaN where missing)."""
    rows = as_rows(table)
    values = np.full(rows.num_rows, np.nan)
    r = 0
    for part in rows.tables(["meta"]):
        for blob in part.column(0).to_pylist():
            if blob:
                v = json.loads(blob).get(column)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    values[r] = float(v)
            r += 1
    return values


def _check_out(out_dir: Path) -> None:
    make_out_dir(out_dir)
    stamp = out_dir / "dedup.json"
    # A run killed before writing its stamp leaves only a temp file (and its lock): still ours.
    if any(p.name not in (WORK_DIR, RUN_LOCK) and not is_temp_name(p.name) for p in out_dir.iterdir()) and not stamp.exists():
        raise OutputError(
            f"output folder {out_dir} is not empty and was not written by dedup; "
            "choose an empty or new folder"
        )


def _prepare_out(out_dir: Path) -> None:
    stamp = out_dir / "dedup.json"
    remove_stale_temps(out_dir)  # temp files of killed runs (their process is gone)
    if not stamp.exists():
        atomic_write_text(stamp, json.dumps({"tool": "dedup", "version": __version__}) + "\n")
