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
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup._version import __version__
from dedup._progress import ProgressFactory, silent
from dedup._io import atomic_write_text, is_temp_name, make_out_dir, output_errors, remove_stale_temps
from dedup._types import Shard, ShardKind
from dedup.cluster import bridged_components, components, guarded_components
from dedup.config import EmbedModel, RunConfig, save_config
from dedup.decisions import apply_decisions, load_decisions, review_section
from dedup.errors import ConfigError, OutputError, SourceError
from dedup.executors.base import Executor, Markers, held, merge_stats
from dedup.executors.local import LocalExecutor
from dedup.featurize import SCHEMA, FeatureStep
from dedup.store import Catalog, index_dir, index_lock, open_index, write_index
from dedup.manifest import Manifest, write_keep_list, write_manifest, write_remove_list
from dedup.second_look import RegionFiles, load_trims, second_look
from dedup.partition import PartitionSettings, VectorFiles
from dedup.pixels import resolve_within
from dedup.report import build_report, write_report_pages
from dedup.rows import FeatureRows, as_rows
from dedup.search import (
    Edges,
)
from dedup.contamination import EVAL_COLUMNS, EvalSet, check_compatible, find_contamination, report_section
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
REMOVE_LIST = "remove.parquet"  # the dropped duplicates (dedup.manifest.REMOVE_SCHEMA)
RUN_LOCK = ".lock"  # flock(2) of OUT while a run writes into it
_IMAGE_KINDS = frozenset({ShardKind.WEBDATASET, ShardKind.I2D_PARQUET, ShardKind.I2D_FILES, ShardKind.FOLDER, ShardKind.HF_DATASET})


@output_errors("out", "work")  # a full disk or read-only --out: OutputError, not a traceback
def run(
    sources: Sequence[str],
    out: str | Path,
    *,
    config: RunConfig | None = None,
    executor: Executor | None = None,
    progress: ProgressFactory | None = None,
    against: Sequence[str | Path] = (),
    decisions: Sequence[str | Path] = (),
    work: str | Path | None = None,
    disk_check: bool = True,
) -> RunResult:
    """Deduplicate ``sources`` into ``out``; resumes from the checkpoints of an earlier run.

    ``work``: where every scratch file goes (the per-shard checkpoints and the partitioned
    search's spill; default ``OUT/.work``), e.g. another disk. ``disk_check``: estimate the disk
    the run needs from its input first and refuse (OutputError) when free space is short.

    ``against``: evaluation sets to decontaminate from: output folders of ``dedup run`` over
    them (their indexes), each as ``PATH`` or ``NAME=PATH``. Every training sample that copies
    one of their images is dropped with the reason ``contaminates:<NAME>``
    (:mod:`dedup.contamination`). ``decisions``: decisions files of ``dedup review`` (of
    another run over the same data) to honour besides ``OUT/decisions.parquet``."""
    cfg = config or RunConfig()
    prog = progress or silent
    out_dir = Path(out)
    evals = open_eval_sets(against)
    with run_lock(out_dir), held(executor):
        phases = PhaseLog()
        shards = discover(sources, folder_batch=cfg.folder_batch)
        refuse_mixed_vectors(None, vector_kinds(shards, cfg), where="")
        for ev in evals:
            check_compatible(cfg, ev)
        work_root = Path(work) if work is not None else out_dir / WORK_DIR
        work = work_root / cfg.stage_key()
        if disk_check:
            check_free_space(estimate_disk(shards, cfg, work, out_dir), out_dir, work_root)
        save_config(cfg, out_dir / "config.json")
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
                evals=evals,
                decisions=[Path(d) for d in decisions],
                executor=executor,
                search_dir=work_root / "search",
                stored_vectors=VectorFiles([FeatureStep(config=cfg, out_dir=work / FEATURES).paths(s)[1] for s in shards]),
            )


def open_eval_sets(against: Sequence[str | Path]) -> list[EvalSet]:
    """The evaluation indexes of ``--against``: ``PATH`` (named by its folder) or ``NAME=PATH``.

    Raises:
        ConfigError: two sets share a name, or a name is empty.
        IndexUnreadableError: a path holds no index.
    """
    sets: list[EvalSet] = []
    for item in against:
        text = str(item)
        name, sep, path = text.partition("=")
        if not sep or "/" in name:
            name, path = Path(text.rstrip("/")).name, text
        if not name or any(s.name == name for s in sets):
            raise ConfigError(
                f"evaluation set name {name!r} is empty or given twice; hint: name them: --against NAME=PATH"
            )
        sets.append(EvalSet(name, open_index(path, columns=EVAL_COLUMNS, search=True)))
    return sets


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
    runner = executor or LocalExecutor(workers=cfg.workers, threads=cfg.local_threads())
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
    evals: Sequence[EvalSet] = (),
    decisions: Sequence[Path] = (),
    executor: Executor | None = None,
    search_dir: Path | None = None,
    stored_vectors: Any = None,
) -> RunResult:
    """The global stages over all features: search, cluster, select, and every output.

    ``table``: the rows in memory or as :class:`~dedup.rows.FeatureRows` (a run's checkpoint
    files); each step reads the columns it needs, and every per-row output is written a row
    group at a time, so the bytes depend on the rows alone, not on where they were read from.
    ``shards`` (the run's) are where report.html reads its few thumbnails back from; when None
    they are rediscovered from the manifest's ``source`` column. ``catalog`` (sources and
    shards) goes into the index, for ``dedup index add``. ``features_dir`` holds the shards'
    checkpoints (:class:`~dedup.featurize.FeatureStep`'s folder), where the partial-copy search
    finds their region descriptors; the second look works beside it (``second_look/``, resumed
    from there) through ``executor`` (default: this machine, ``cfg.workers`` processes).
    ``OUT/decisions.parquet`` (``dedup review``) and the ``decisions`` files are honoured
    (:mod:`dedup.decisions`). Callers hold the index lock.
    """
    rows = as_rows(table)
    timer = PhaseLog()
    if shards is not None and cfg.search.exact:
        # Pixel hashes where they can label a link (dedup.pixels): the per-shard stage leaves
        # them out when PDQ is on; the few rows that need one are re-read here. The index
        # keeps them (null where never needed: format 5).
        pixels_root = (features_dir.parent if features_dir is not None else out_dir / WORK_DIR) / "pixels"
        rows, _ = resolve_within(
            rows, shards, max_pixels=cfg.fingerprint.max_pixels, root=pixels_root, executor=executor,
            workers=cfg.workers or os.cpu_count() or 1,
        )  # fmt: skip
        timer.done("pixel hashes")
    search_dir = search_dir if search_dir is not None else out_dir / WORK_DIR / "search"
    edges, levels = find_edges(rows, vectors, cfg, progress=progress, work_dir=search_dir)
    timer.done("search")
    if shards is not None and (cfg.search.verify_from >= 0 or cfg.search.partial):
        # Uncertain and partial-copy candidates, confirmed on the re-read images (dedup.second_look).
        step = FeatureStep(config=cfg, out_dir=features_dir) if features_dir is not None else None
        regions = RegionFiles.of([step.regions_path(s) for s in shards]) if step and cfg.search.partial else None
        trims = load_trims([step.trims_path(s) for s in shards]) if step else None
        work = features_dir.parent if features_dir is not None else out_dir / WORK_DIR / "second-look"
        confirmed, second = second_look(
            rows, vectors, edges, cfg, shards=shards, regions=regions, trims=trims, work_dir=work,
            executor=executor, progress=progress, on_phase=timer.done,
        )  # fmt: skip
        edges = Edges.concat([edges, confirmed])
        shard_stats = {**shard_stats, "second_look": second}
        timer.done("second look: verify")
    # Precomputed embeddings (clip-retrieval: usually CLIP) are not the configured model's.
    embedding_label = PRECOMPUTED if shard_stats.get("precomputed") else cfg.embed.model.value
    with progress("cluster + select", 1, "step") as bar:
        n = rows.num_rows
        ok = rows.equals("status", "ok")
        pixels = rows.numbers("width") * rows.numbers("height")
        # Links -> clusters ([cluster]: the chaining guard), then a curator's decisions (dedup
        # review) on top: cannot-links cut clusters, must-links join them.
        _, edges, shard_stats = _cluster(n, edges, pixels, cfg, shard_stats)
        applied = apply_decisions(n, rows, edges, load_decisions(out_dir, decisions))
        labels = applied.labels
        metric = _metric(rows, cfg.keep.column) if cfg.keep.column else None
        select = partial(keepers, policy=cfg.keep.policy, eligible=ok, pixels=pixels, metric=metric)
        keep_row = select(labels)
        reviewed = applied.changed(keep_row, select(applied.before) if applied.before is not None else None)
        del pixels, metric, select
        edges = applied.links
        contamination = find_contamination(rows, vectors, labels, cfg, evals, shards=shards) if evals else None
        manifest = Manifest.build(
            rows, labels, keep_row, edges, embedding_label=embedding_label, ok=ok, contamination=contamination, reviewed=reviewed
        )
        if applied.before is not None or applied.stats["decisions"]:
            shard_stats = {**shard_stats, "review": applied.stats}
        bar.update(1)
    timer.done("cluster + select")
    with progress("write outputs", 1, "step") as bar:
        write_manifest(manifest, out_dir / "manifest.parquet")
        write_keep_list(manifest, out_dir / "keep.parquet")
        write_remove_list(manifest, out_dir / REMOVE_LIST)
        timer.done("write manifest")
        report = build_report(manifest, edges, levels, cfg, shard_stats=shard_stats, embedding_label=embedding_label)
        if evals:
            assert contamination is not None
            section = report_section(contamination, rows.column("sample_id").combine_chunks())
            for ev in evals:
                section[ev.name]["index"] = str(ev.index.directory.parent)
            report["contamination"] = section
        if (reviewing := review_section(out_dir)) is not None:
            report["review"] = reviewing
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
        write_report_pages(
            report, out_dir, manifest=manifest, shards=shards, features=rows, thumb_size=cfg.report.thumb_size
        )
        timer.done("write report")
        # The index last: its meta.json is what `index add` (and check --update) resume from, so
        # once it names the new generation, every other output is already written.
        # It stores the vectors as the checkpoints hold them (hard links where it can):
        # ``stored_vectors`` are those files when ``vectors`` were read into memory.
        stored = stored_vectors if stored_vectors is not None else vectors
        write_index(index_dir(out_dir), rows, stored, labels, cfg, catalog=catalog, embedding_model=_index_model(shard_stats, vectors, cfg))
        timer.done("write index")
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
    if cfg.cluster.bridge > 0 and not cfg.cluster.guard:
        b = bridged_components(n, edges, max_side=cfg.cluster.bridge)
        inside = b.labels[edges.i] == b.labels[edges.j]
        kept = Edges(edges.i[inside], edges.j[inside], edges.score[inside], edges.signal[inside])
        stats = {"bridge": cfg.cluster.bridge, "links_refused": int(b.refused.sum())}
        return b.labels, kept, {**shard_stats, "cluster": stats}
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
    """Per global phase: wall time, peak resident memory and CPU time, to stderr when
    ``DEDUP_PHASES`` is set (bench/scale.py sets it): where the time and memory of a run go.
    The CPU is this process's and its ended children's (a local pool's worker processes count
    in the phase their pool shut down in).

    The peak is the kernel's high-water mark (``VmHWM``), reset after each phase through
    ``/proc/self/clear_refs``, so each line gives that phase's own peak; the run's peak is the
    largest of them. (``ru_maxrss`` as a parent sees it is no substitute: Linux starts a child's
    at the RSS its parent had when it forked.) Where the reset is refused, the peak is sampled
    every 50 ms instead, and may miss a shorter spike."""

    def __init__(self) -> None:
        self.on = bool(os.environ.get("DEDUP_PHASES"))
        self.start = time.perf_counter()
        self.cpu = _cpu_s()
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
        cpu = _cpu_s()
        print(
            f"[phase] {phase}: {now - self.start:.1f} s, peak RSS {peak:.2f} GiB, at the end {rss:.2f} GiB, "
            f"CPU {cpu - self.cpu:.2f} s",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        self.start, self.peak, self.cpu = now, rss, cpu

    def close(self) -> None:
        if self.on and not self.exact and hasattr(self, "_stop"):
            self._stop.set()


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its children that have ended (the
    worker processes of a local pool once it shuts down; not Ray's, which are not ours)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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


# --------------------------------------------------------------------------------------------
# Disk: what a run will need, known before it starts
# --------------------------------------------------------------------------------------------

# Bytes per sample beside its vector, measured on bench/scale.py's outputs (ids, URL, caption):
# the checkpoint's parquet row, and manifest + keep list + index/samples.parquet together.
_ROW_BYTES = 60
_OUTPUT_ROW_BYTES = 160
_IMAGE_BYTES = 16_000  # an image in a tar / parquet shard whose rows are not counted (LAION's ~256 px JPEGs are larger)
_IMAGE_DIM = 512  # SSCD and its distilled student


@dataclass(frozen=True, slots=True)
class DiskEstimate:
    """What a run will write, in bytes: per-shard checkpoints still to write, the partitioned
    search's scratch at its peak, and the outputs (manifest, keep list, report, index)."""

    checkpoints: int
    scratch: int
    outputs: int
    samples: int

    @property
    def total(self) -> int:
        return self.checkpoints + max(self.scratch, 0) + self.outputs


def estimate_disk(
    shards: Sequence[Shard], cfg: RunConfig, work: Path, out_dir: Path, *, indexed: tuple[int, int] = (0, 0)
) -> DiskEstimate:
    """The disk a run over ``shards`` needs, from its input alone (headers, row counts, file
    sizes); shards already checkpointed under ``work`` cost nothing again. Precomputed
    embeddings are counted exactly (their ``.npy`` headers); images by the number of files (a
    folder) or by size (a tar or parquet: ~16 kB an image): an estimate, for a refusal that
    comes before hours of work, not an accounting. ``indexed``: ``(samples, vector bytes)``
    an index already holds, which an ``index add`` of ``shards`` searches and rewrites again
    (its vectors are not copied: the new generation links them)."""
    from dedup.sources._embeddings import read_header

    step = FeatureStep(config=cfg, out_dir=work / FEATURES)
    markers = Markers(work / "done", outputs=step.paths)
    samples = vectors = todo = 0
    for shard in shards:
        rows, width = _shard_rows(shard, cfg, read_header)
        samples += rows
        vectors += rows * width
        if markers.read(shard) is None:
            todo += rows * (width + _ROW_BYTES)
    new_vectors = vectors
    samples, vectors = samples + indexed[0], vectors + indexed[1]
    scratch = 0
    if samples > cfg.search.partition_above:
        scratch = int(PartitionSettings().scratch_ratio * vectors) + 24 * samples  # spill + edge parts
    outputs = _OUTPUT_ROW_BYTES * samples + _index_vector_bytes(new_vectors, work, out_dir)
    return DiskEstimate(checkpoints=todo, scratch=scratch, outputs=outputs, samples=samples)


def _shard_rows(shard: Shard, cfg: RunConfig, read_header: Any) -> tuple[int, int]:
    """``(rows, vector bytes a row)`` of a shard, estimated."""
    if shard.kind is ShardKind.EMBEDDINGS:
        try:
            h = read_header(shard)
        except Exception:  # noqa: BLE001 - a damaged file is a failed row later, not a refusal now
            return 1, 0
        return int(h.rows), int(h.dim) * (2 if h.dtype == np.float16 else 4)  # checkpoints keep float16
    width = 0 if cfg.embed.model is EmbedModel.NONE else _IMAGE_DIM * 4
    if shard.members:
        return len(shard.members), width
    try:
        size = os.path.getsize(shard.path)
    except OSError:  # remote, or gone: nothing to go on
        return 0, width
    if shard.kind is ShardKind.LAION_METADATA:
        return max(1, size // 100), 0
    return max(1, size // _IMAGE_BYTES), width


def _index_vector_bytes(vectors: int, work: Path, out_dir: Path) -> int:
    """The index's copy of the vectors: none where it can hard-link the checkpoints (the same
    file system), else one copy."""
    try:
        same = os.stat(_existing(work)).st_dev == os.stat(_existing(out_dir)).st_dev
    except OSError:
        same = False
    return 0 if same and _INDEX_LINKS else vectors


_INDEX_LINKS = True  # the index hard-links the checkpoints' vectors (see dedup.store)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(need: DiskEstimate, out_dir: Path, work_root: Path, *, what: str = "this run") -> None:
    """Refuse a run (or ``what``) the free space cannot hold, with the numbers and what to do.

    Raises:
        OutputError: the estimate exceeds the free space of OUT (or of ``--work`` when it is
        on another file system).
    """
    out_free = shutil.disk_usage(_existing(out_dir)).free
    work_free = shutil.disk_usage(_existing(work_root)).free
    try:
        same = os.stat(_existing(out_dir)).st_dev == os.stat(_existing(work_root)).st_dev
    except OSError:
        same = True
    gb = 1e9
    parts = f"checkpoints {need.checkpoints / gb:.2f} GB, search scratch {need.scratch / gb:.2f} GB, outputs {need.outputs / gb:.2f} GB"
    hint = (
        "hint: free space, or put the checkpoints and the search scratch on another disk with "
        "--work DIR (--no-disk-check runs anyway)"
    )
    if same:
        total = need.checkpoints + need.scratch + need.outputs
        if total > out_free:
            raise OutputError(
                f"not enough free disk: {what} of {need.samples:,} samples needs about {total / gb:.2f} GB "
                f"in {out_dir} ({parts}) and {out_free / gb:.2f} GB are free; {hint}"
            )
        return
    scratch = need.checkpoints + need.scratch
    if scratch > work_free:
        raise OutputError(
            f"not enough free disk: {what} of {need.samples:,} samples needs about {scratch / gb:.2f} GB "
            f"in --work {work_root} ({parts}) and {work_free / gb:.2f} GB are free; {hint}"
        )
    if need.outputs > out_free:
        raise OutputError(
            f"not enough free disk: {what} of {need.samples:,} samples needs about {need.outputs / gb:.2f} GB "
            f"in {out_dir} for its outputs and {out_free / gb:.2f} GB are free; hint: free space or pick another --out"
        )
