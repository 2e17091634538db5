"""The index a run leaves for later commands (``check``, ``index add``, ``query``), and adding to it.

Layout of ``OUT/index/``, versioned by ``meta.json``'s ``format`` (:data:`FORMAT`)::

    meta.json          format, generation (+1 per write), model, input size, dim, row counts,
                       the resolved config, and the sources in index order (as given, resolved)
    samples.parquet    one row per sample, in index order: every column of featurize.SCHEMA
                       (ids, metadata, status, hashes, has_image, embedded, meta) + cluster_id
                       and emb_row (the sample's row in embeddings.npy, -1 if not embedded)
    shards.parquet     one row per shard included, in index order: shard_id, source_index,
                       source, path, kind, stamp, members, rows, embedded, stats (JSON)
    embeddings.npy     float32 (n_embedded, dim), in the order of the embedded samples
    embeddings.faiss   a faiss inner-product index over the same vectors (faiss id = emb_row)
    pdq.faiss          a faiss binary index of the ok images' PDQ hashes (faiss id = sample row)
    phash.faiss        the same for pHash, when pHash is computed
    .lock              flock(2): shared while a reader loads, exclusive while a writer writes

Index order is ``dedup run``'s order over the index's sources: sources in the order they joined
the index, shards by id within a source, samples in read order. Sample ids follow ``run``'s rule
for several sources: once an index holds more than one source, every shard and sample id starts
with ``s<i>/``, ``i`` being the source's position in ``meta.json``'s ``sources``. So
``run A`` + ``index add B`` is ``run A B`` byte for byte, and the first add of a second source
renames the existing ids from ``x`` to ``s0/x``.

:func:`add` decodes and embeds only the shards the index does not hold yet (a shard is known by
its id and stamp), then reruns the global stages (search, cluster, select, outputs) over the
stored features plus the new ones: the same code over the same rows as a run from scratch.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup import __version__
from dedup._progress import silent
from dedup._io import atomic_path, atomic_write_text, output_errors
from dedup._types import Shard, ShardKind
from dedup.config import RunConfig, from_dict, to_dict
from dedup.errors import DedupError
from dedup.rows import FeatureRows, as_rows
from dedup.search import pack_uint64

if TYPE_CHECKING:
    from dedup.executors.base import Executor
    from dedup.pipeline import ProgressFactory, RunResult

FORMAT = 2
INDEX_DIR = "index"
LOCK_NAME = ".lock"
META = "meta.json"
SAMPLES = "samples.parquet"
SHARDS = "shards.parquet"
EMBEDDINGS = "embeddings.npy"
EMBEDDINGS_FAISS = "embeddings.faiss"
PDQ_FAISS = "pdq.faiss"
PHASH_FAISS = "phash.faiss"
EXTRA_COLUMNS = ("cluster_id", "emb_row")  # samples.parquet's columns beyond featurize.SCHEMA

SHARDS_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("source_index", pa.int32()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("kind", pa.string()),
        ("stamp", pa.string()),
        ("members", pa.list_(pa.string())),
        ("rows", pa.int64()),
        ("embedded", pa.int64()),
        ("stats", pa.string()),  # the shard's summable stats (FeatureStep), JSON
    ]
)


class IndexUnreadableError(DedupError):
    """The folder holds no index, an index of another format, or a damaged one."""


class IndexConflictError(DedupError):
    """An add cannot go ahead: a shard changed since it was indexed, or the index moved on."""


class IndexBusyError(DedupError):
    """Another process holds the index lock (only raised by non-blocking attempts)."""


@dataclass(frozen=True, slots=True)
class IndexedSource:
    source: str  # as the user gave it (the manifest's ``source`` column)
    resolved: str  # absolute real path (local) or the URL without a trailing slash: identity


@dataclass(frozen=True, slots=True)
class IndexedShard:
    shard: Shard  # as discover() gives it for the index's sources (id with the index's prefix)
    source_index: int
    rows: int
    embedded: int
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Catalog:
    """What an index holds: its sources and shards, in index order."""

    sources: tuple[IndexedSource, ...]
    shards: tuple[IndexedShard, ...]

    @classmethod
    def of_run(
        cls,
        sources: Sequence[str] | str,
        shards: Sequence[Shard],
        per_shard: dict[str, dict[str, Any]],
        table: pa.Table | FeatureRows,
    ) -> Catalog:
        """The catalog of ``run(sources)``: ``shards`` from discover(sources), ``table`` its rows."""
        given = [sources] if isinstance(sources, str) else list(sources)
        rows, embedded = _counts_by_shard(table)
        entries = tuple(
            IndexedShard(
                shard=s,
                source_index=_source_index(s.shard_id, len(given)),
                rows=rows.get(s.shard_id, 0),
                embedded=embedded.get(s.shard_id, 0),
                stats=per_shard.get(s.shard_id, {}),
            )
            for s in shards
        )
        return cls(tuple(IndexedSource(s, resolve_source(s)) for s in given), entries)


def index_dir(out: str | Path) -> Path:
    """The index folder of a run's output folder."""
    return Path(out) / INDEX_DIR


@contextmanager
def index_lock(directory: Path, *, exclusive: bool, blocking: bool = True) -> Iterator[None]:
    """Hold ``directory/.lock``: shared (readers, never writes a byte) or exclusive (writers).

    A shared lock on an index without a lock file (written before locks existed, or on a
    read-only copy without one) is a no-op: a reader must never create files in a baseline.

    Raises:
        IndexBusyError: ``blocking=False`` and another process holds a conflicting lock.
    """
    path = directory / LOCK_NAME
    if exclusive:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            fd = -1
    try:
        if fd >= 0:
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, mode if blocking else mode | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexBusyError(
                    f"the index {directory} is locked by another dedup process; hint: wait for "
                    "the running `dedup index add` (or `dedup run`) to finish"
                ) from None
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # closing the descriptor releases the lock


def resolve_source(source: str) -> str:
    """What makes two spellings of a source the same one: the real path, or the URL."""
    from dedup.sources._common import filesystem, is_local

    fs, root = filesystem(source)
    if is_local(fs):
        return os.path.realpath(root)
    return str(fs.unstrip_protocol(root)).rstrip("/")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_index(
    directory: Path,
    table: pa.Table | FeatureRows,
    vectors: np.ndarray,
    labels: np.ndarray,
    cfg: RunConfig,
    *,
    catalog: Catalog | None = None,
    embedding_model: str | None = None,
) -> None:
    """Write the index of ``table`` (featurize.SCHEMA rows in index order) into ``directory``.

    ``embedding_model``: what made the vectors, when it is not ``cfg.embed.model`` (a run over
    precomputed embeddings: ``precomputed``); ``query`` and ``check`` refuse to compare vectors
    of another kind or dimension. Every file is replaced atomically and ``meta.json`` goes
    last; callers hold the exclusive :func:`index_lock` so readers never see a mix of two
    generations. samples.parquet is written a row group at a time, from the rows as they lie.
    """
    from dedup.manifest import _GroupWriter

    rows = as_rows(table)
    directory.mkdir(parents=True, exist_ok=True)
    catalog = catalog or Catalog((), ())
    previous = _read_json(directory / META) or {}
    embedded = rows.flags("embedded")
    emb_row = np.full(rows.num_rows, -1, np.int64)
    emb_row[embedded] = np.arange(int(embedded.sum()), dtype=np.int64)
    schema = rows.schema.append(pa.field("cluster_id", pa.int64())).append(pa.field("emb_row", pa.int64()))

    def samples() -> Iterator[pa.Table]:
        start = 0
        for group in rows.batches():
            stop = start + group.num_rows
            group = group.append_column("cluster_id", pa.array(labels[start:stop], pa.int64()))
            yield group.append_column("emb_row", pa.array(emb_row[start:stop], pa.int64()))
            start = stop

    _GroupWriter(directory / SAMPLES, schema, compression="zstd").write(samples())
    del emb_row
    with atomic_path(directory / SHARDS) as tmp:
        pq.write_table(_shards_table(catalog), tmp, compression="zstd")
    # Too many embeddings to hold (dedup.partition.VectorFiles, issue 8): streamed to the same
    # float32 .npy a block at a time, and no flat faiss copy (it would need them all in memory).
    streamed = not isinstance(vectors, np.ndarray) and hasattr(vectors, "write_npy")
    if not streamed:
        vectors = np.ascontiguousarray(vectors, np.float32)
    with atomic_path(directory / EMBEDDINGS) as tmp:
        with open(tmp, "wb") as fh:
            if streamed:
                vectors.write_npy(fh)
            else:
                np.save(fh, vectors)
    if not streamed and vectors.ndim == 2 and vectors.shape[0]:
        index = faiss.IndexFlatIP(int(vectors.shape[1]))
        index.add(vectors)
        write_faiss(directory / EMBEDDINGS_FAISS, index)
    else:
        (directory / EMBEDDINGS_FAISS).unlink(missing_ok=True)  # never leave an older run's
    ok_image = rows.equals("status", "ok") & rows.flags("has_image")
    pdq_rows, pdq_codes = hash_codes(rows, "pdq", ok_image)
    _write_binary(directory / PDQ_FAISS, pdq_rows, pdq_codes)
    ph_rows, ph_codes = hash_codes(rows, "phash", ok_image)
    _write_binary(directory / PHASH_FAISS, ph_rows, ph_codes)
    meta = {
        "format": FORMAT,
        "dedup_version": __version__,
        "generation": int(previous.get("generation", 0)) + 1,
        "model": embedding_model or cfg.embed.model.value,
        "input_size": cfg.embed.size,
        "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
        "samples": rows.num_rows,
        "embedded": int(vectors.shape[0]),
        "shards": len(catalog.shards),
        "stage_key": cfg.stage_key(),
        "sources": [{"source": s.source, "resolved": s.resolved} for s in catalog.sources],
        "config": to_dict(cfg),
    }
    atomic_write_text(directory / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_faiss(path: Path, index: Any) -> None:
    """A faiss index, serialised in memory and written through :func:`atomic_path`:
    ``faiss.write_index`` to a full disk leaves a truncated file without raising."""
    data = faiss.serialize_index_binary(index) if isinstance(index, faiss.IndexBinary) else faiss.serialize_index(index)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(memoryview(np.ascontiguousarray(data)))
            fh.flush()
            os.fsync(fh.fileno())


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


def _write_binary(path: Path, rows: np.ndarray, codes: np.ndarray) -> None:
    if not rows.size:
        path.unlink(missing_ok=True)
        return
    index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(int(codes.shape[1]) * 8))
    index.add_with_ids(np.ascontiguousarray(codes), rows)
    write_faiss(path, index)


def _shards_table(catalog: Catalog) -> pa.Table:
    entries = catalog.shards
    return pa.table(
        {
            "shard_id": [e.shard.shard_id for e in entries],
            "source_index": [e.source_index for e in entries],
            "source": [e.shard.source for e in entries],
            "path": [e.shard.path for e in entries],
            "kind": [e.shard.kind.value for e in entries],
            "stamp": [e.shard.stamp for e in entries],
            "members": [list(e.shard.members) for e in entries],
            "rows": [e.rows for e in entries],
            "embedded": [e.embedded for e in entries],
            "stats": [json.dumps(e.stats, sort_keys=True) for e in entries],
        },
        schema=SHARDS_SCHEMA,
    )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Index:
    """An index read into memory: what it holds, and the parts a command asked for."""

    directory: Path
    meta: dict[str, Any]
    config: RunConfig
    catalog: Catalog
    samples: pa.Table  # the columns asked for (none: zero columns, but num_rows rows)
    vectors: np.ndarray | None  # embeddings.npy, when asked for
    embeddings: Any = None  # faiss.Index, when asked for and present
    pdq: Any = None  # faiss.IndexBinary (ids: sample rows), when asked for and present
    phash: Any = None

    @property
    def generation(self) -> int:
        return int(self.meta.get("generation", 0))

    @property
    def num_samples(self) -> int:
        return int(self.meta.get("samples", 0))


def open_index(
    out: str | Path,
    *,
    columns: Sequence[str] | None = (),
    vectors: bool = False,
    search: bool = False,
) -> Index:
    """Read the index of the output folder ``out`` under a shared lock (never writing a byte).

    ``columns``: the samples.parquet columns to load (None: all); ``vectors``: embeddings.npy;
    ``search``: the faiss indexes (embeddings, PDQ, pHash).

    Raises:
        IndexUnreadableError: no index there, another format, or damaged files.
    """
    directory = index_dir(out)
    if not directory.is_dir():
        if (Path(out) / META).is_file():
            raise IndexUnreadableError(
                f"{out} is an index folder; hint: pass the output folder of `dedup run` that holds it: {Path(out).parent}"
            )
        what = "does not exist" if not Path(out).exists() else "holds no index/ folder"
        raise IndexUnreadableError(
            f"{out} {what}; hint: build a baseline index with `dedup run SOURCE --out {out}`"
        )
    with index_lock(directory, exclusive=False):
        return read_index(directory, columns=columns, vectors=vectors, search=search)


def read_index(
    directory: Path, *, columns: Sequence[str] | None = (), vectors: bool = False, search: bool = False
) -> Index:
    """:func:`open_index` without taking the lock (for callers that hold it)."""
    meta = _read_json(directory / META)
    if meta is None:
        raise IndexUnreadableError(
            f"{directory} has no readable {META}; hint: build the index with `dedup run SOURCE --out "
            f"{directory.parent}` (an interrupted run leaves none: rerun it)"
        )
    if meta.get("format") != FORMAT:
        raise IndexUnreadableError(
            f"the index in {directory} has format {meta.get('format')!r}; this dedup "
            f"({__version__}) reads format {FORMAT}; hint: rebuild it with `dedup run` (per-shard "
            "checkpoints in .work/ are reused)"
        )
    try:
        config = from_dict(RunConfig, meta["config"])
        catalog = _read_catalog(directory, meta)
        samples = pq.read_table(directory / SAMPLES, columns=None if columns is None else list(columns))
        emb = np.load(directory / EMBEDDINGS) if vectors else None
        embeddings = pdq = phash = None
        if search:
            if (directory / EMBEDDINGS_FAISS).is_file():
                embeddings = faiss.read_index(str(directory / EMBEDDINGS_FAISS))
            if (directory / PDQ_FAISS).is_file():
                pdq = faiss.read_index_binary(str(directory / PDQ_FAISS))
            if (directory / PHASH_FAISS).is_file():
                phash = faiss.read_index_binary(str(directory / PHASH_FAISS))
    except DedupError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, pa.ArrowException) as err:
        raise IndexUnreadableError(
            f"cannot read the index in {directory}: {err}; hint: it may be damaged: rebuild it "
            "with `dedup run`"
        ) from err
    if samples.num_rows != meta.get("samples") or (emb is not None and emb.shape[0] != meta.get("embedded")):
        raise IndexUnreadableError(
            f"the index in {directory} is inconsistent (samples.parquet or embeddings.npy does not "
            f"match {META}); hint: rebuild it with `dedup run`"
        )
    return Index(directory, meta, config, catalog, samples, emb, embeddings, pdq, phash)


def _read_catalog(directory: Path, meta: dict[str, Any]) -> Catalog:
    sources = tuple(IndexedSource(s["source"], s["resolved"]) for s in meta.get("sources", []))
    rows = pq.read_table(directory / SHARDS, schema=SHARDS_SCHEMA).to_pylist()
    shards = tuple(
        IndexedShard(
            shard=Shard(
                source=r["source"],
                path=r["path"],
                kind=ShardKind(r["kind"]),
                shard_id=r["shard_id"],
                stamp=r["stamp"],
                members=tuple(r["members"] or ()),
            ),
            source_index=int(r["source_index"]),
            rows=int(r["rows"]),
            embedded=int(r["embedded"]),
            stats=json.loads(r["stats"]),
        )
        for r in rows
    )
    return Catalog(sources, shards)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# Adding
# --------------------------------------------------------------------------------------------


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
        return f"s{source_index}/" if len(self.sources) > 1 else ""


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
    from dedup.sources import discover

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
    held = {("s0/" if rename else "") + e.shard.shard_id: e.shard for e in index.catalog.shards}
    new: list[tuple[int, Shard]] = []
    known: list[Shard] = []
    for source_index, source in targets:
        prefix = f"s{source_index}/" if several else ""
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
) -> AddResult:
    """Add the new shards of ``sources`` to the index of ``out`` and rewrite its outputs.

    Only the new shards are decoded and embedded (into ``work``, default ``OUT/.work/<stage>/``:
    checkpointed, so an interrupted add resumes). The index's own config is used and recorded
    (``workers`` and ``batch_size`` only change the speed). The rows are merged in index order and the
    global stages rerun, all behind the exclusive lock; the expensive decoding runs before it,
    so concurrent checks are held up only while the outputs are rewritten. ``expect_generation``
    makes the add fail if the index changed since it was read (``check --update``).

    Raises:
        IndexUnreadableError, IndexConflictError, SourceError, OutputError.
    """
    from dedup import pipeline

    out_dir = Path(out)
    directory = index_dir(out_dir)
    prog = progress or silent
    snapshot = open_index(out_dir)
    cfg = snapshot.config  # the index's settings: what the outputs and the index record
    speed = cfg.with_overrides({"workers": workers, "embed.batch_size": batch_size})  # same results
    work_dir = Path(work) if work is not None else out_dir / pipeline.WORK_DIR / cfg.stage_key()
    plan = plan_add(snapshot, sources, folder_batch=cfg.folder_batch)
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
        from dedup.config import save_config
        from dedup.executors.base import merge_stats
        from dedup.featurize import FeatureStep

        # The index's embeddings are read through a hard link (write_index replaces the file
        # they are read from); the new shards' from their checkpoints: nothing is concatenated.
        pinned = work_dir / f"index-{EMBEDDINGS}"
        pinned.unlink(missing_ok=True)
        try:
            os.link(directory / EMBEDDINGS, pinned)
        except OSError:  # no hard links there: read them into memory, as small indexes are anyway
            pinned = None  # type: ignore[assignment]
            index = read_index(directory, columns=None, vectors=True)
        step = FeatureStep(config=speed, out_dir=work_dir / pipeline.FEATURES)
        try:
            table, vectors, catalog = merge(
                index, plan, new_table, new_vectors, per_shard,
                stored=pinned, new_paths={s.shard_id: step.paths(s)[1] for s in plan.new},
                in_memory_below=cfg.search.partition_above,
            )  # fmt: skip
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
            )
        finally:
            if pinned is not None:
                pinned.unlink(missing_ok=True)
    return AddResult(out_dir, len(plan.new), new_table.num_rows, len(plan.known), result)


def merge(
    index: Index,
    plan: AddPlan,
    new_table: pa.Table,
    new_vectors: np.ndarray,
    per_shard: dict[str, dict[str, Any]],
    *,
    stored: Path | None = None,
    new_paths: dict[str, Path] | None = None,
    in_memory_below: int | None = None,
) -> tuple[pa.Table, np.ndarray, Catalog]:
    """The index's rows plus the new shards' rows, in index order (what a run would read).

    Vectors: with ``stored`` (the index's embeddings.npy, or a link to it) and ``new_paths``
    (each new shard's checkpoint ``.npy``), a :class:`~dedup.partition.VectorFiles` over pieces
    of those files in index order, read a block at a time (materialised when there are at most
    ``in_memory_below`` of them, as a run does); otherwise ``index.vectors`` and ``new_vectors``
    concatenated in memory.
    """
    from dedup.featurize import SCHEMA
    from dedup.partition import VectorFiles

    old = index.samples.select(SCHEMA.names).cast(SCHEMA)
    entries = list(index.catalog.shards)
    if plan.rename:
        old = _prefixed(old, "s0/")
        entries = [
            dataclasses.replace(e, shard=dataclasses.replace(e.shard, shard_id="s0/" + e.shard.shard_id))
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
        part = (stored, emb, emb + e.embedded) if streamed else vectors[emb : emb + e.embedded]
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
        part = (new_paths[shard.shard_id], 0, k) if streamed else new_vectors[emb : emb + k]  # type: ignore[index]
        pieces.append(((entry.source_index, shard.shard_id), entry, new_table.slice(row, n), part))
        row += n
        emb += k
    pieces.sort(key=lambda p: p[0])
    table = pa.concat_tables([p[2] for p in pieces]) if pieces else SCHEMA.empty_table()
    catalog = Catalog(plan.sources, tuple(p[1] for p in pieces))
    if streamed:
        files = VectorFiles([p[3] for p in pieces if p[3][2] > p[3][1]])
        if in_memory_below is not None and len(files) > in_memory_below:
            return table, files, catalog  # type: ignore[return-value]  # array-like; see VectorFiles
        return table, (np.asarray(files) if len(files) else np.zeros((0, 0), np.float32)), catalog
    parts = [p[3] for p in pieces if p[3].ndim == 2 and p[3].shape[0]]
    all_vectors = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return table, all_vectors, catalog


def _prefixed(table: pa.Table, prefix: str) -> pa.Table:
    for name in ("sample_id", "shard"):
        i = table.schema.get_field_index(name)
        column = pc.binary_join_element_wise(pa.scalar(prefix), table.column(name), "")
        table = table.set_column(i, table.schema.field(i), column)
    return table


def _counts_by_shard(table: pa.Table | FeatureRows) -> tuple[dict[str, int], dict[str, int]]:
    """Rows and embedded rows per value of the ``shard`` column (a part at a time)."""
    rows: dict[str, int] = {}
    embedded: dict[str, int] = {}
    for part in as_rows(table).tables(["shard", "embedded"]):
        grouped = part.group_by("shard").aggregate([("shard", "count"), ("embedded", "sum")])
        for s, c, e in zip(
            grouped.column("shard").to_pylist(),
            grouped.column("shard_count").to_pylist(),
            grouped.column("embedded_sum").to_pylist(),
            strict=True,
        ):
            rows[s] = rows.get(s, 0) + int(c)
            embedded[s] = embedded.get(s, 0) + int(e or 0)
    return rows, embedded


def _source_index(shard_id: str, n_sources: int) -> int:
    """The source a run's shard came from: ``s<i>/`` prefixes it when a run has several."""
    if n_sources <= 1:
        return 0
    head, _, _ = shard_id.partition("/")
    return int(head[1:])
