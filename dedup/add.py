"""``dedup index add``: grow an index with new shards, as ``dedup run`` over all of them would.

:func:`add` decodes and embeds only the shards the index does not hold yet (a shard is known by
its id and stamp), then reruns the global stages (search, cluster, select, outputs) over the
stored features plus the new ones: the same code over the same rows as a run from scratch, so
``run A`` + ``index add B`` is ``run A B`` byte for byte; the first add of a second source
renames the existing ids from ``x`` to ``s0/x``. A command, beside ``check`` (whose
``--update`` calls it): it sits above the pipeline and the index store (:mod:`dedup.store`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup import pipeline
from dedup._io import output_errors
from dedup._progress import ProgressFactory, silent
from dedup._types import Shard, source_prefix
from dedup.config import save_config
from dedup.executors.base import merge_stats
from dedup.featurize import SCHEMA, FeatureStep
from dedup.partition import VectorFiles
from dedup.pipeline import RunResult
from dedup.sources import discover
from dedup.store import (
    Catalog,
    Index,
    IndexConflictError,
    IndexedShard,
    IndexedSource,
    IndexUnreadableError,
    _counts_by_shard,
    index_dir,
    index_lock,
    open_index,
    read_index,
    vector_files,
    resolve_source,
)

if TYPE_CHECKING:
    from dedup.executors.base import Executor


@dataclass(frozen=True, slots=True)
class AddPlan:
    """What adding ``sources`` to an index means, before anything is decoded."""

    sources: tuple[IndexedSource, ...]  # the index's sources after the add
    rename: bool  # the index goes from one source to several: existing ids gain "s0/"
    new: tuple[Shard, ...]  # shards to decode and add, with their ids in the index, in index order
    known: tuple[Shard, ...]  # shards of ``sources`` the index already holds (skipped)
    source_of: dict[str, int]  # new shard id -> its source's position in ``sources``

    def prefix(self, source_index: int) -> str:
        """The prefix of the ids of a source's shards and samples in the index after the add."""
        return source_prefix(source_index, len(self.sources))


@dataclass(frozen=True, slots=True)
class AddResult:
    out: Path
    added_shards: int
    added_samples: int
    known_shards: int  # shards of the sources that the index already held
    result: RunResult | None  # the rewritten outputs; None when there was nothing new


def plan_add(index: Index, sources: Sequence[str] | str, *, folder_batch: int | None = None) -> AddPlan:
    """Which shards of ``sources`` are new to ``index``, and the ids they get there.

    A source the index already holds (same real path or URL, however spelled) keeps its
    position and its spelling; others join at the end. A shard is known by its id; a known id
    with another stamp (the file was replaced) is a conflict, since adding cannot take rows out.

    Raises:
        SourceError: a source cannot be read (as for ``dedup run``).
        IndexConflictError: a shard the index holds has changed since.
    """
    given = [sources] if isinstance(sources, str) else list(sources)
    batch = folder_batch if folder_batch is not None else index.config.folder_batch
    known_sources = list(index.catalog.sources)
    position = {s.resolved: i for i, s in enumerate(known_sources)}
    targets: list[tuple[int, str]] = []  # (source index, the string to discover)
    for source in given:
        resolved = resolve_source(source)
        if resolved not in position:
            position[resolved] = len(known_sources)
            known_sources.append(IndexedSource(source, resolved))
        target = (position[resolved], source)
        if all(t[0] != target[0] for t in targets):
            targets.append(target)
    several = len(known_sources) > 1
    rename = several and len(index.catalog.sources) == 1  # run's ids for one source have no prefix
    renamed = source_prefix(0, 2) if rename else ""  # the one source becomes the first of several
    held = {renamed + e.shard.shard_id: e.shard for e in index.catalog.shards}
    new: list[tuple[int, Shard]] = []
    known: list[Shard] = []
    for source_index, source in targets:
        prefix = source_prefix(source_index, len(known_sources))
        for local in discover([source], folder_batch=batch):
            shard = dataclasses.replace(
                local, shard_id=prefix + local.shard_id, source=known_sources[source_index].source
            )
            old = held.get(shard.shard_id)
            if old is None:
                new.append((source_index, shard))
            elif old.stamp == shard.stamp:
                known.append(shard)
            else:
                raise IndexConflictError(
                    f"shard {shard.shard_id!r} of {source!r} changed since it was indexed; hint: "
                    "`index add` only adds: put new data in new files or a new folder (a folder of "
                    "loose images cannot grow in place), or rebuild with `dedup run`"
                )
    new.sort(key=lambda pair: (pair[0], pair[1].shard_id))
    return AddPlan(
        tuple(known_sources), rename, tuple(s for _, s in new), tuple(known), {s.shard_id: i for i, s in new}
    )


@output_errors("out")  # a full disk or read-only OUT: OutputError, not a traceback
def add(
    sources: Sequence[str] | str,
    out: str | Path,
    *,
    workers: int | None = None,
    batch_size: int | None = None,
    work: str | Path | None = None,
    expect_generation: int | None = None,
    executor: Executor | None = None,
    progress: ProgressFactory | None = None,
    disk_check: bool = True,
    decisions: Sequence[str | Path] = (),
) -> AddResult:
    """Add the new shards of ``sources`` to the index of ``out`` and rewrite its outputs.

    Only the new shards are decoded and embedded (into ``work``, default ``OUT/.work/<stage>/``:
    checkpointed, so an interrupted add resumes). The index's own config is used and recorded
    (``workers`` and ``batch_size`` only change the speed). The rows are merged in index order and the
    global stages rerun, all behind the exclusive lock; the expensive decoding runs before it,
    so concurrent checks are held up only while the outputs are rewritten. ``expect_generation``
    makes the add fail if the index changed since it was read (``check --update``).
    ``decisions``: decisions files of ``dedup review`` (e.g. of another run over the same data)
    to honour besides ``OUT/decisions.parquet``, as ``run(decisions=...)``. ``disk_check``:
    estimate the disk the add needs (the new shards' checkpoints, the search's
    scratch over the whole index, the rewritten outputs) and stop before starting when the free
    space is short, as a run does.

    Raises:
        IndexUnreadableError, IndexConflictError, SourceError, OutputError.
    """
    out_dir = Path(out)
    directory = index_dir(out_dir)
    prog = progress or silent
    snapshot = open_index(out_dir)
    cfg = snapshot.config  # the index's settings: what the outputs and the index record
    speed = cfg.with_overrides({"workers": workers, "embed.batch_size": batch_size})  # same results
    work_root = Path(work) if work is not None else out_dir / pipeline.WORK_DIR  # scratch: checkpoints, search
    work_dir = Path(work) if work is not None else work_root / cfg.stage_key()
    plan = plan_add(snapshot, sources, folder_batch=cfg.folder_batch)
    if plan.new and disk_check:
        need = pipeline.estimate_disk(plan.new, cfg, work_dir, out_dir, indexed=indexed_size(snapshot))
        pipeline.check_free_space(need, out_dir, work_root, what="this add")
    if plan.new:  # the expensive part, outside the lock: checkpoints only, no index file touched
        pipeline.featurize(plan.new, work_dir, speed, executor=executor, progress=prog)
    with index_lock(directory, exclusive=True):
        index = read_index(directory, columns=None)  # vectors: memory-mapped by merge, a block at a time
        if index.config != cfg:
            raise IndexConflictError(
                f"the index in {directory} was rebuilt with other settings while this add ran; "
                "hint: run the add again"
            )
        if expect_generation is not None and index.generation != expect_generation:
            raise IndexConflictError(
                f"the index in {directory} changed while this command ran (generation "
                f"{expect_generation} → {index.generation}); hint: run the check again"
            )
        plan = plan_add(index, sources, folder_batch=cfg.folder_batch)  # another add may have landed
        if not plan.new:
            return AddResult(out_dir, 0, 0, len(plan.known), None)
        new_table, new_vectors, per_shard = pipeline.featurize(plan.new, work_dir, speed, executor=executor, progress=prog)
        # The index's vectors are read from their parts (write_index makes a new generation's
        # folder and removes this one only once meta.json names the new); the new shards' from
        # their checkpoints: nothing is concatenated, nothing copied.
        stored = vector_files(directory, index.meta)
        step = FeatureStep(config=speed, out_dir=work_dir / pipeline.FEATURES)
        new_paths = {s.shard_id: step.paths(s)[1] for s in plan.new}
        # in_memory_below=-1: always the files (the index links them); in memory for the search
        # when there are few, as a run does
        table, files, catalog = merge(index, plan, new_table, new_vectors, per_shard, stored=stored, new_paths=new_paths, in_memory_below=-1)
        vectors = files if len(files) > cfg.search.partition_above else (np.asarray(files) if len(files) else np.zeros((0, 0), np.float32))
        save_config(cfg, out_dir / "config.json")
        result = pipeline.finish(
            table,
            vectors,
            out_dir,
            cfg,
            shard_stats=merge_stats([e.stats for e in catalog.shards]),
            progress=prog,
            shards=[e.shard for e in catalog.shards],
            catalog=catalog,
            features_dir=work_dir / pipeline.FEATURES,
            search_dir=work_root / "search",
            stored_vectors=files,
            executor=executor,
            decisions=[Path(d) for d in decisions],
        )
    return AddResult(out_dir, len(plan.new), new_table.num_rows, len(plan.known), result)


def indexed_size(index: Index) -> tuple[int, int]:
    """``(samples, bytes of stored vectors)`` of an index: what an add searches and rewrites again."""
    stored = vector_files(index.directory, index.meta)
    size = len(stored) * stored.dim * stored.storage_dtype.itemsize if stored is not None else 0
    return index.samples.num_rows, size


def merge(
    index: Index,
    plan: AddPlan,
    new_table: pa.Table,
    new_vectors: np.ndarray,
    per_shard: dict[str, dict[str, Any]],
    *,
    stored: VectorFiles | None = None,
    new_paths: dict[str, Path] | None = None,
    in_memory_below: int | None = None,
) -> tuple[pa.Table, np.ndarray, Catalog]:
    """The index's rows plus the new shards' rows, in index order (what a run would read).

    Vectors: with ``stored`` (the index's vector parts) and ``new_paths``
    (each new shard's checkpoint ``.npy``), a :class:`~dedup.partition.VectorFiles` over pieces
    of those files in index order, read a block at a time (materialised when there are at most
    ``in_memory_below`` of them, as a run does); otherwise ``index.vectors`` and ``new_vectors``
    concatenated in memory.
    """
    old = index.samples.select(SCHEMA.names).cast(SCHEMA)
    entries = list(index.catalog.shards)
    if plan.rename:
        first = source_prefix(0, 2)
        old = _prefixed(old, first)
        entries = [
            dataclasses.replace(e, shard=dataclasses.replace(e.shard, shard_id=first + e.shard.shard_id))
            for e in entries
        ]
    streamed = stored is not None and new_paths is not None
    if streamed:
        vectors: Any = None
        total = int(index.meta.get("embedded") or 0)
    else:
        vectors = index.vectors if index.vectors is not None else np.zeros((0, 0), np.float32)
        total = int(vectors.shape[0])
    pieces: list[tuple[tuple[int, str], IndexedShard, pa.Table, Any]] = []
    row = emb = 0
    for e in entries:
        part = _pieces(stored, emb, emb + e.embedded) if streamed else vectors[emb : emb + e.embedded]  # type: ignore[arg-type]
        pieces.append(((e.source_index, e.shard.shard_id), e, old.slice(row, e.rows), part))
        row += e.rows
        emb += e.embedded
    if row != old.num_rows or emb != total:
        raise IndexUnreadableError(
            f"the index in {index.directory} is inconsistent (shards.parquet does not account for "
            "every sample); hint: rebuild it with `dedup run`"
        )
    rows, embedded = _counts_by_shard(new_table)
    row = emb = 0
    for shard in plan.new:
        n, k = rows.get(shard.shard_id, 0), embedded.get(shard.shard_id, 0)
        entry = IndexedShard(shard, plan.source_of[shard.shard_id], n, k, per_shard.get(shard.shard_id, {}))
        part = [(new_paths[shard.shard_id], 0, k)] if streamed else new_vectors[emb : emb + k]  # type: ignore[index]
        pieces.append(((entry.source_index, shard.shard_id), entry, new_table.slice(row, n), part))
        row += n
        emb += k
    pieces.sort(key=lambda p: p[0])
    table = pa.concat_tables([p[2] for p in pieces]) if pieces else SCHEMA.empty_table()
    catalog = Catalog(plan.sources, tuple(p[1] for p in pieces))
    if streamed:
        files = VectorFiles([t for p in pieces for t in p[3] if t[2] > t[1]])
        if in_memory_below is not None and len(files) > in_memory_below:
            return table, files, catalog  # type: ignore[return-value]  # array-like; see VectorFiles
        return table, (np.asarray(files) if len(files) else np.zeros((0, 0), np.float32)), catalog
    parts = [p[3] for p in pieces if p[3].ndim == 2 and p[3].shape[0]]
    all_vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return table, all_vectors, catalog


def _pieces(files: VectorFiles, start: int, stop: int) -> list[tuple[Path, int, int]]:
    """Rows ``start..stop-1`` of ``files`` as ``(path, first, end)`` pieces of its files."""
    out: list[tuple[Path, int, int]] = []
    for f, path in enumerate(files.paths):
        lo, hi = int(files.offsets[f]), int(files.offsets[f + 1])
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            out.append((path, files.starts[f] + a - lo, files.starts[f] + b - lo))
    return out


def _prefixed(table: pa.Table, prefix: str) -> pa.Table:
    for name in ("sample_id", "shard"):
        i = table.schema.get_field_index(name)
        column = pc.binary_join_element_wise(pa.scalar(prefix), table.column(name), "")
        table = table.set_column(i, table.schema.field(i), column)
    return table
