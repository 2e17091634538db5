"""The per-shard step: read → fingerprint → embed, written as one checkpoint per shard.

Output of a shard: ``<dir>/<shard>.parquet`` (one row per input sample, :data:`SCHEMA`) and
``<dir>/<shard>.npy`` (float32 embeddings of the rows whose ``embedded`` is true, in row order).
Both are written atomically before the executor writes the shard's completion marker.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup._io import atomic_path
from dedup._types import Sample, Shard, ShardKind
from dedup.config import FingerprintConfig, RunConfig
from dedup.embed import Embedder, build_embedder
from dedup.errors import error_kind
from dedup.executors.base import shard_file_name
from dedup.fingerprint import Features, fingerprint
from dedup.sources import read_shard
from dedup.sources._embeddings import BAD_VECTOR, DAMAGED_KEY, DamagedFileError, metadata_table, read_header, unit_rows, vector_blocks

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("shard", pa.string()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("sha256", pa.binary(32)),
        ("pixel_sha256", pa.binary(32)),
        ("phash", pa.uint64()),
        ("pdq", pa.binary(32)),
        ("pdq_quality", pa.int16()),
        ("pdq_variants", pa.binary(224)),  # 7 x 32 bytes: rotations/flips (fingerprint.pdq_dihedral)
        ("has_image", pa.bool_()),
        ("embedded", pa.bool_()),
        ("meta", pa.string()),  # JSON of the other metadata columns (aesthetic, similarity, ...)
    ]
)

# One embedder per process, built on first use: a worker loads its model once, then serves
# every shard it is given (clip-retrieval's "pass builders, not models" pattern).
# Threads of one process (LocalExecutor(threads=True)) share it: ONNX Runtime sessions take
# concurrent runs, each on its calling thread's intra-op threads; the lock builds it once.
_EMBEDDERS: dict[tuple[str, int], Embedder | None] = {}
_EMBEDDERS_LOCK = threading.Lock()


def _embedder(cfg: RunConfig, threads: int) -> Embedder | None:
    key = (repr(cfg.embed), threads)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = build_embedder(cfg.embed, threads=threads)
        return _EMBEDDERS[key]


@dataclass(frozen=True, slots=True)
class FeatureStep:
    """Picklable step: compute one shard's features into ``out_dir``; returns summable stats."""

    config: RunConfig
    out_dir: Path
    threads: int = 0

    def paths(self, shard: Shard) -> tuple[Path, Path]:
        base = self.out_dir / shard_file_name(shard)
        return base.with_name(base.name + ".parquet"), base.with_name(base.name + ".npy")

    def regions_path(self, shard: Shard) -> Path:
        """Region descriptors of the embedded rows, float16 ``(n, windows, dim)``, when the
        embedder makes them (``embed.regions``); absent otherwise."""
        base = self.out_dir / shard_file_name(shard)
        return base.with_name(base.name + ".regions.npy")

    def trims_path(self, shard: Shard) -> Path:
        """The trimmed box of each embedded row's model input, float32 ``(n, 4)`` shares of the
        decoded size (``fingerprint.trim``, see :attr:`Features.trim`), in row order: the
        second look crops its re-read images to them. Absent for precomputed embeddings."""
        base = self.out_dir / shard_file_name(shard)
        return base.with_name(base.name + ".trim.npy")

    def __call__(self, shard: Shard, progress: Callable[[int], object] | None = None) -> dict[str, Any]:
        if shard.kind is ShardKind.EMBEDDINGS:  # vectors given: nothing to decode, no model
            return precomputed_features(shard, *self.paths(shard), progress)
        workers = self.config.workers or os.cpu_count() or 1  # 0: one worker per core
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
        embedder = _embedder(self.config, threads)
        batch_size = self.config.embed.batch()
        rows: list[dict[str, Any]] = []
        vectors: list[np.ndarray] = []
        regions: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        trims: list[tuple[float, float, float, float]] = []
        errors: dict[str, int] = {}
        with_regions = bool(getattr(embedder, "regions", False))

        def flush() -> None:
            if pending:
                assert embedder is not None
                if with_regions:
                    glob, reg = embedder.embed_regions(np.stack(pending))  # type: ignore[attr-defined]
                    vectors.append(glob)
                    regions.append(reg.astype(np.float16))
                else:
                    vectors.append(embedder.embed(np.stack(pending)))
                pending.clear()

        fcfg = self.config.features()
        for sample in read_shard(shard):
            feats, model_input = _features(sample, shard, fcfg, embedder)
            embedded = model_input is not None
            if embedded:
                pending.append(model_input)
                trims.append(feats.trim or (0.0, 0.0, 1.0, 1.0))
                if len(pending) >= batch_size:
                    flush()
            if feats.status != "ok":
                kind = error_kind(feats.error)
                errors[kind] = errors.get(kind, 0) + 1
            rows.append(_row(sample, shard, feats, embedded))
            if progress is not None and len(rows) % 64 == 0:
                progress(64)
        flush()
        if progress is not None and len(rows) % 64:
            progress(len(rows) % 64)

        dim = embedder.dim if embedder is not None else 0
        emb = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        parquet_path, npy_path = self.paths(shard)
        if with_regions:
            reg = np.concatenate(regions) if regions else np.zeros((0, 0, dim), np.float16)
            with atomic_path(self.regions_path(shard)) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, reg)
        with atomic_path(self.trims_path(shard)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.array(trims, np.float32).reshape(-1, 4))
        with atomic_path(npy_path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, emb.astype(np.float32, copy=False))
        with atomic_path(parquet_path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        failed = sum(1 for r in rows if r["status"] != "ok")
        return {
            "samples": len(rows),
            "ok": len(rows) - failed,
            "failed": failed,
            "embedded": int(emb.shape[0]),
            "errors": errors,
        }


def _features(
    sample: Sample, shard: Shard, cfg: FingerprintConfig, embedder: Embedder | None
) -> tuple[Features, np.ndarray | None]:
    if sample.status != "ok":
        return Features(status="failed", error=sample.error or "failed upstream"), None
    if sample.data is None and shard.kind is ShardKind.LAION_METADATA:
        # Metadata-only: nothing to decode; URL and caption signals serve these rows.
        return Features(status="ok", error=None, width=sample.width, height=sample.height), None
    prepare = embedder.preprocess if embedder is not None else None
    # With PDQ on, the pixel hash waits for the global stage (dedup.pixels): two images with
    # the same pixels have the same size and PDQ, so only the rows whose (width, height, PDQ)
    # another row of other bytes shares are re-read and hashed there (~4 % on the bench).
    return fingerprint(sample.data, cfg, prepare=prepare, pixel_hash=not cfg.pdq)


def _row(sample: Sample, shard: Shard, feats: Features, embedded: bool) -> dict[str, Any]:
    return {
        "sample_id": sample.sample_id,
        "source": shard.source,
        "shard": shard.shard_id,
        "key": sample.key,
        "url": sample.url,
        "caption": sample.caption,
        "width": feats.width if feats.width is not None else sample.width,
        "height": feats.height if feats.height is not None else sample.height,
        "status": feats.status,
        "error": feats.error,
        "sha256": feats.sha256,
        "pixel_sha256": feats.pixel_sha256,
        "phash": feats.phash,
        "pdq": feats.pdq,
        "pdq_quality": feats.pdq_quality,
        "pdq_variants": feats.pdq_variants,
        "has_image": feats.sha256 is not None,
        "embedded": embedded,
        "meta": json.dumps(sample.extra, sort_keys=True, default=str) if sample.extra else None,
    }


def precomputed_features(
    shard: Shard, parquet_path: Path, npy_path: Path, progress: Callable[[int], object] | None = None
) -> dict[str, Any]:
    """The checkpoint of a clip-retrieval embeddings shard, vectorised (no Python per row).

    Rows come from the metadata (:func:`dedup.sources._embeddings.metadata_table`); the vectors
    are streamed a block at a time, L2-normalised and written in the input's precision: float16
    stays float16 (half the disk of float32, and all the precision the input had; readers
    widen and renormalise, see :func:`dedup.partition.unit32`), anything else becomes float32.
    A zero or non-finite vector is a failed row; a damaged ``.npy`` is one failed row.
    """
    try:
        header = read_header(shard)
    except DamagedFileError as err:
        table = _rows_table(
            shard,
            pa.table({"key": [DAMAGED_KEY], "sample_id": [f"{shard.shard_id}/{DAMAGED_KEY}"]}),
            np.zeros(1, bool),
            f"embeddings {err}",
        )
        return _write_checkpoint(table, np.zeros((0, 0), np.float32), parquet_path, npy_path)
    meta, problem = metadata_table(shard, header.rows)
    store = np.dtype(np.float16) if header.dtype == np.float16 else np.dtype(np.float32)
    valid = np.zeros(header.rows, bool)
    written = 0
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(_npy_header((header.rows if problem is None else 0, header.dim), store))
            start = 0
            for block in vector_blocks(shard, header) if problem is None else ():
                ok, x = unit_rows(block)
                valid[start : start + block.shape[0]] = ok
                fh.write(x.astype(store, copy=False).tobytes())
                written += int(ok.sum())
                start += block.shape[0]
                if progress is not None:
                    progress(block.shape[0])
            if problem is not None and progress is not None:
                progress(header.rows)
        if problem is None and written != header.rows:
            _rewrite_header(tmp, (header.rows, header.dim), (written, header.dim), store)
    table = _rows_table(shard, meta, valid, problem or BAD_VECTOR)
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return _stats(table, written)


def _rows_table(shard: Shard, meta: pa.Table, valid: np.ndarray, error: str) -> pa.Table:
    """SCHEMA rows for an embeddings shard: ``meta`` holds at least ``key`` and ``sample_id``."""
    n = meta.num_rows
    ok = pa.array(valid)

    def column(name: str) -> pa.Array | pa.ChunkedArray:
        if name in meta.column_names:
            return meta.column(name)
        return pa.nulls(n, SCHEMA.field(name).type)

    cols = {name: column(name) for name in SCHEMA.names}
    cols["source"] = pa.repeat(shard.source, n)
    cols["shard"] = pa.repeat(shard.shard_id, n)
    cols["status"] = pc.if_else(ok, "ok", "failed")
    cols["error"] = pc.if_else(ok, pa.scalar(None, pa.string()), error)
    cols["has_image"] = pa.repeat(False, n)
    cols["embedded"] = ok
    return pa.table(cols).cast(SCHEMA)


def _write_checkpoint(table: pa.Table, emb: np.ndarray, parquet_path: Path, npy_path: Path) -> dict[str, Any]:
    with atomic_path(npy_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, emb)
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return _stats(table, int(emb.shape[0]))


def _stats(table: pa.Table, embedded: int) -> dict[str, Any]:
    failed = table.num_rows - embedded
    errors: dict[str, int] = {}
    if failed:
        for item in pc.value_counts(table.column("error").drop_null()).to_pylist():
            kind = error_kind(item["values"])
            errors[kind] = errors.get(kind, 0) + int(item["counts"])
    # "precomputed" counts the rows whose vectors came with the input: the run labels its
    # embedding signal "precomputed" (they are usually CLIP, not SSCD).
    return {"samples": table.num_rows, "ok": embedded, "failed": failed, "embedded": embedded,
            "errors": errors, "precomputed": table.num_rows}


def _npy_header(shape: tuple[int, int], dtype: np.dtype[Any]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _rewrite_header(path: Path, old: tuple[int, int], shape: tuple[int, int], dtype: np.dtype[Any]) -> None:
    """Fix the row count of a streamed ``.npy`` once rows were left out (rare: bad vectors)."""
    offset = len(_npy_header(old, dtype))
    new = _npy_header(shape, dtype)
    if len(new) == offset:  # the same padded length: overwrite in place
        with open(path, "r+b") as fh:
            fh.write(new)
        return
    data = np.fromfile(path, dtype=dtype, offset=offset)
    with open(path, "wb") as fh:
        fh.write(new)
        data.tofile(fh)
