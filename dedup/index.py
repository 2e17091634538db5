"""The index a run leaves for later commands (``query``, ``check``, ``index add``).

Layout, versioned by ``meta.json``'s ``format``::

    index/meta.json          format, model, input size, dim, thresholds, row counts
    index/samples.parquet    one row per sample: ids, status, hashes, cluster_id, emb_row
    index/embeddings.npy     float32 (n_embedded, dim), row ``emb_row`` of samples.parquet
    index/embeddings.faiss   a faiss inner-product index over the same rows
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup import __version__
from dedup._io import atomic_path, atomic_write_text
from dedup.config import RunConfig, to_dict

FORMAT = 1


def write_index(
    directory: Path, table: pa.Table, vectors: np.ndarray, labels: np.ndarray, cfg: RunConfig
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    embedded = np.asarray(table.column("embedded").to_numpy(zero_copy_only=False), bool)
    emb_row = np.full(table.num_rows, -1, np.int64)
    emb_row[embedded] = np.arange(int(embedded.sum()), dtype=np.int64)
    keep_cols = ["sample_id", "shard", "key", "url", "caption", "width", "height", "status",
                 "sha256", "pixel_sha256", "phash", "pdq"]
    samples = table.select(keep_cols).append_column("cluster_id", pa.array(labels, pa.int64()))
    samples = samples.append_column("emb_row", pa.array(emb_row, pa.int64()))
    with atomic_path(directory / "samples.parquet") as tmp:
        pq.write_table(samples, tmp, compression="zstd")
    with atomic_path(directory / "embeddings.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(vectors, np.float32))
    if vectors.shape[0]:
        index = faiss.IndexFlatIP(int(vectors.shape[1]))
        index.add(np.ascontiguousarray(vectors, np.float32))
        with atomic_path(directory / "embeddings.faiss") as tmp:
            faiss.write_index(index, str(tmp))
    meta = {
        "format": FORMAT,
        "dedup_version": __version__,
        "model": cfg.embed.model.value,
        "input_size": cfg.embed.size,
        "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
        "samples": table.num_rows,
        "embedded": int(vectors.shape[0]),
        "config": to_dict(cfg),
    }
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
