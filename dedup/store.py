"""The index store: what a run leaves for later commands (``check``, ``index add``, ``query``).

Its format, its lock and its catalog, written by :func:`write_index` (under the exclusive
:func:`index_lock`) and read by :func:`open_index`. Growing an index is :mod:`dedup.add`, a
command above the pipeline; this module sits below it and knows nothing of how rows are made.

Layout of ``OUT/index/``, versioned by ``meta.json``'s ``format`` (:data:`FORMAT`)::

    meta.json          format, generation (+1 per write), model, input size, dim, row counts,
                       the resolved config, and the sources in index order (as given, resolved)
    data-<gen>/        this generation's files (below); meta.json, written last, names it, so
                       an interrupted write leaves the previous generation whole
      samples.parquet  one row per sample, in index order: every column of featurize.SCHEMA
                       (ids, metadata, status, hashes, has_image, embedded, meta) + cluster_id
                       and emb_row (the sample's row in the vectors, -1 if not embedded);
                       pixel_sha256 is null (not computed) unless a link needed it: the
                       pixel key (width, height, pdq) beside it says which rows may (format 5)
      shards.parquet   one row per shard included, in index order: shard_id, source_index,
                       source, path, kind, stamp, members, rows, embedded, stats (JSON)
      NNNNNN.npy       the embeddings, stored once: parts (meta.json's
                       ``vector_parts``: name and rows, in the order of the embedded samples),
                       each as the checkpoint stored it (float16 input stays float16, read as
                       float32 unit rows by dedup.partition.unit32) and, where the file system
                       allows, a hard link to that checkpoint: no second copy on disk. The flat
                       faiss index ``check`` and ``query`` search is built from them when the
                       index is opened (at most search.partition_above vectors).
      pdq.faiss        a faiss binary index of the ok images' PDQ hashes (faiss id = sample row)
      phash.faiss      the same for pHash, when pHash is computed
    .lock              flock(2): shared while a reader loads, exclusive while a writer writes

Index order is ``dedup run``'s order over the index's sources: sources in the order they joined
the index, shards by id within a source, samples in read order. Sample ids follow ``run``'s rule
for several sources (:func:`dedup._types.source_prefix`): once an index holds more than one
source, every shard and sample id starts with ``s<i>/``, ``i`` being the source's position in
``meta.json``'s ``sources``.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup._version import __version__
from dedup._io import atomic_path, atomic_write_text
from dedup._types import Shard, ShardKind, source_index
from dedup.config import RunConfig, from_dict, to_dict
from dedup.errors import DedupError, IndexBusyError, IndexConflictError, IndexUnreadableError  # noqa: F401  # the store's errors, importable from here

from dedup.rows import FeatureRows, as_rows
from dedup.signals import hash_codes

# 3: vectors stored once, as parts (hard links to the checkpoints); 4: and a folder per
# generation; 5: pixel_sha256 null where it was never computed (dedup.pixels: only rows whose
# (width, height, pdq) key another row of other bytes shares are hashed). Format 4, where every
# image row holds its pixel hash, reads as it is: the rules of dedup.pixels take both.
FORMAT = 5
READS = (4, 5)
INDEX_DIR = "index"
LOCK_NAME = ".lock"
META = "meta.json"
SAMPLES = "samples.parquet"
SHARDS = "shards.parquet"
EMBEDDINGS = "embeddings.npy"  # format 2's float32 copy (removed when a newer index is written)
EMBEDDINGS_FAISS = "embeddings.faiss"  # format 2's flat index (likewise)
DATA_PREFIX = "data-"
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
                source_index=source_index(s.shard_id, len(given)),
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

    # Every file of this generation goes into its own folder; meta.json, written last, makes it
    # the index: an interrupted write (a full disk, a kill) leaves the previous one whole.
    generation = int(previous.get("generation", 0)) + 1
    data = directory / f"{DATA_PREFIX}{generation:06d}"
    _rmtree(data)  # an interrupted write's
    data.mkdir(parents=True)
    _GroupWriter(data / SAMPLES, schema, compression="zstd").write(samples())
    emb_row = np.empty(0, np.int64)  # written: free it while the rest is
    with atomic_path(data / SHARDS) as tmp:
        pq.write_table(_shards_table(catalog), tmp, compression="zstd")
    parts, dim, n_vectors = write_vectors(data, vectors, catalog)
    ok_image = rows.equals("status", "ok") & rows.flags("has_image")
    pdq_rows, pdq_codes = hash_codes(rows, "pdq", ok_image)
    _write_binary(data / PDQ_FAISS, pdq_rows, pdq_codes)
    ph_rows, ph_codes = hash_codes(rows, "phash", ok_image)
    _write_binary(data / PHASH_FAISS, ph_rows, ph_codes)
    meta = {
        "format": FORMAT,
        "dedup_version": __version__,
        "generation": generation,
        "model": embedding_model or cfg.embed.model.value,
        "input_size": cfg.embed.size,
        "dim": dim,
        "samples": rows.num_rows,
        "embedded": n_vectors,
        "data": data.name,
        "vector_parts": parts,
        "shards": len(catalog.shards),
        "stage_key": cfg.stage_key(),
        "sources": [{"source": s.source, "resolved": s.resolved} for s in catalog.sources],
        "config": to_dict(cfg),
    }
    atomic_write_text(directory / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _remove_stale_data(directory, keep=data.name)


def write_vectors(folder: Path, vectors: Any, catalog: Catalog) -> tuple[list[list[Any]], int, int]:
    """The embeddings as parts in ``folder``: ``([name, rows] per part, dim, rows)``.

    From a :class:`~dedup.partition.VectorFiles` (a run's checkpoints, or an index's parts and
    new checkpoints for an add), each whole file becomes a part: hard-linked where the file
    system allows (no byte copied), else copied as stored; a piece of a file is copied. An
    array (small inputs, read into memory) is written a part per catalog shard, as float32.
    """
    from dedup.partition import VectorFiles

    parts: list[list[Any]] = []
    if isinstance(vectors, VectorFiles):
        for f, path in enumerate(vectors.paths):
            start = vectors.starts[f]
            count = int(vectors.offsets[f + 1] - vectors.offsets[f])
            name = f"{f:06d}.npy"
            whole = start == 0 and _npy_rows(path) == count
            if not (whole and _link(path, folder / name)):
                with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
                    VectorFiles([(path, start, start + count)]).write_npy(fh, dtype=vectors.storage_dtype)
            parts.append([name, count])
        return parts, vectors.dim, len(vectors)
    array = np.asarray(vectors)
    if array.ndim != 2 or not array.shape[0]:
        return parts, int(array.shape[1]) if array.ndim == 2 else 0, 0
    sizes = [e.embedded for e in catalog.shards if e.embedded]
    if sum(sizes) != array.shape[0]:
        sizes = [int(array.shape[0])]
    start = 0
    for f, size in enumerate(sizes):
        name = f"{f:06d}.npy"
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array[start : start + size], np.float32))
        parts.append([name, size])
        start += size
    return parts, int(array.shape[1]), int(array.shape[0])


def vector_files(directory: Path, meta: dict[str, Any]) -> Any:
    """The index's vectors as a :class:`~dedup.partition.VectorFiles` (nothing read yet)."""
    from dedup.partition import VectorFiles

    folder = data_dir(directory, meta)
    return VectorFiles([folder / name for name, _ in meta.get("vector_parts", [])])


def data_dir(directory: Path, meta: dict[str, Any]) -> Path:
    """The folder of the index's current generation (samples, shards, hashes, vectors)."""
    return directory / str(meta.get("data", ""))


def _npy_rows(path: Path) -> int:
    from dedup.partition import _npy_shape

    shape, _ = _npy_shape(path)
    return int(shape[0]) if shape else 0


def _link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        return False
    return True


def _rmtree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _remove_stale_data(directory: Path, *, keep: str) -> None:
    """Earlier generations' folders (and format 2's files), once meta.json names the new one;
    an interrupted write's folder too."""
    for path in directory.iterdir():
        if path.name.startswith(DATA_PREFIX) and path.name != keep and path.is_dir():
            _rmtree(path)
    for name in (EMBEDDINGS, EMBEDDINGS_FAISS, SAMPLES, SHARDS, PDQ_FAISS, PHASH_FAISS):
        (directory / name).unlink(missing_ok=True)


def write_faiss(path: Path, index: Any) -> None:
    """A faiss index, serialised in memory and written through :func:`atomic_path`:
    ``faiss.write_index`` to a full disk leaves a truncated file without raising."""
    data = faiss.serialize_index_binary(index) if isinstance(index, faiss.IndexBinary) else faiss.serialize_index(index)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(memoryview(np.ascontiguousarray(data)))
            fh.flush()
            os.fsync(fh.fileno())


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
    vectors: np.ndarray | None  # the vectors (float32 unit rows), when asked for
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

    ``columns``: the samples.parquet columns to load (None: all); ``vectors``: the vectors;
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
    if meta.get("format") not in READS:
        raise IndexUnreadableError(
            f"the index in {directory} has format {meta.get('format')!r}; this dedup "
            f"({__version__}) reads formats {', '.join(map(str, READS))}; hint: rebuild it with `dedup run` (per-shard "
            "checkpoints in .work/ are reused)"
        )
    try:
        config = from_dict(RunConfig, meta["config"])
        catalog = _read_catalog(directory, meta)
        data = data_dir(directory, meta)
        samples = pq.read_table(data / SAMPLES, columns=None if columns is None else list(columns))
        files = vector_files(directory, meta) if (vectors or search) else None
        emb = np.asarray(files) if vectors and files is not None and len(files) else None
        if vectors and emb is None:
            emb = np.zeros((0, int(meta.get("dim") or 0)), np.float32)
        embeddings = pdq = phash = None
        if search:
            if files is not None and 0 < len(files) <= config.search.partition_above:
                # Built here, not stored: a flat index is a second float32 copy of the vectors.
                embeddings = faiss.IndexFlatIP(files.dim)
                embeddings.add(emb if emb is not None else np.asarray(files))
            if (data / PDQ_FAISS).is_file():
                pdq = faiss.read_index_binary(str(data / PDQ_FAISS))
            if (data / PHASH_FAISS).is_file():
                phash = faiss.read_index_binary(str(data / PHASH_FAISS))
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
    rows = pq.read_table(data_dir(directory, meta) / SHARDS, schema=SHARDS_SCHEMA).to_pylist()
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

