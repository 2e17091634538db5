"""Precomputed embeddings in clip-retrieval's layout: discovery, reading, the vectorised per-shard
step, and ``dedup run EMB_DIR`` giving the connected components of exact search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dedup import run
from dedup._types import ShardKind
from dedup.cli import app
from dedup.cluster import components
from _configs import PLAIN
from dedup.errors import ConfigError
from dedup.featurize import SCHEMA, FeatureStep
from dedup.partition import unit32
from dedup.search import Edges, Signal
from dedup.sources import discover, read_shard

T = 0.95


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors_with_groups(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Random unit vectors with near-duplicate groups (pair cosines ~0.96, some under 0.95)."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((n, dim)))
    for g in range(n // 20):
        rows = rng.choice(n, 3, replace=False)
        x[rows] = _unit(x[rows[0]] + 0.2 / np.sqrt(dim) * rng.standard_normal((3, dim)))
    return x


def write_clip_retrieval(root: Path, parts: list[np.ndarray], *, dtype: type = np.float16, keys: bool = False) -> Path:
    """``root/img_emb/img_emb_K.npy`` + ``root/metadata/metadata_K.parquet`` (+ a text_emb/)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    (root / "text_emb").mkdir()
    start = 0
    for k, part in enumerate(parts):
        np.save(root / "img_emb" / f"img_emb_{k}.npy", part.astype(dtype))
        np.save(root / "text_emb" / f"text_emb_{k}.npy", part.astype(dtype))  # never read
        rows = range(start, start + len(part))
        meta = {
            "image_path": [f"{r:09d}.jpg" for r in rows],
            "caption": ["the same caption everywhere" for _ in rows],  # never a link between vectors
            "url": [f"https://example.com/{r}.jpg" for r in rows],
            "similarity": [0.3 + r / 1e6 for r in rows],
        }
        if keys:
            meta["key"] = [f"k{r:06d}" for r in rows]
        pq.write_table(pa.table(meta), root / "metadata" / f"metadata_{k}.parquet")
        start += len(part)
    return root


def test_discover_pairs_vectors_with_their_metadata(tmp_path: Path) -> None:
    x = vectors_with_groups(100)
    root = write_clip_retrieval(tmp_path / "emb", [x[:60], x[60:]])
    shards = discover([str(root)])
    assert [(s.kind, s.shard_id) for s in shards] == [(ShardKind.EMBEDDINGS, "img_emb_0"), (ShardKind.EMBEDDINGS, "img_emb_1")]
    assert shards[0].members and shards[0].members[0].endswith("metadata/metadata_0.parquet")
    assert "+" in shards[0].stamp  # the metadata's stamp too: replacing it recomputes the shard
    # the img_emb folder itself, or one file, finds the metadata beside it
    assert [s.members for s in discover([str(root / "img_emb")])] == [s.members for s in shards]
    (single,) = discover([str(root / "img_emb" / "img_emb_1.npy")])
    assert single.shard_id == "img_emb_1" and single.members == shards[1].members


def test_read_shard_rows_keys_and_bad_vectors(tmp_path: Path) -> None:
    x = vectors_with_groups(50)
    x[3] = 0.0
    x[7, 2] = np.nan
    root = write_clip_retrieval(tmp_path / "emb", [x], dtype=np.float32)
    (shard,) = discover([str(root)])
    samples = list(read_shard(shard))
    assert [s.sample_id for s in samples[:2]] == ["img_emb_0/000000000", "img_emb_0/000000001"]
    assert samples[5].url == "https://example.com/5.jpg" and samples[5].caption == "the same caption everywhere"
    assert samples[5].extra["image_path"] == "000000005.jpg" and samples[5].data is None
    assert [s.status for s in samples].count("failed") == 2
    assert samples[3].error == samples[7].error == "embedding: zero or not finite"
    keyed = write_clip_retrieval(tmp_path / "keyed", [x], keys=True)
    (shard,) = discover([str(keyed)])
    assert next(iter(read_shard(shard))).sample_id == "img_emb_0/k000000"


def test_feature_step_is_vectorised_and_normalises(tmp_path: Path) -> None:
    x = vectors_with_groups(300) * 5.0
    x[10] = np.inf
    root = write_clip_retrieval(tmp_path / "emb", [x])
    (shard,) = discover([str(root)])
    step = FeatureStep(config=PLAIN, out_dir=tmp_path / "f")
    (tmp_path / "f").mkdir()
    stats = step(shard)
    assert stats == {"samples": 300, "ok": 299, "failed": 1, "embedded": 299, "errors": {"embedding": 1}, "precomputed": 300}
    parquet_path, npy_path = step.paths(shard)
    table = pq.read_table(parquet_path)
    assert table.schema == SCHEMA
    emb = np.load(npy_path)
    assert emb.dtype == np.float16 and emb.shape == (299, 32)  # float16 in, float16 kept
    keep = np.ones(300, bool)
    keep[10] = False
    assert np.allclose(unit32(emb), _unit(x[keep].astype(np.float16).astype(np.float32)), atol=1e-3)
    assert table.column("embedded").to_pylist() == keep.tolist()
    assert table.column("has_image").to_pylist() == [False] * 300
    meta = json.loads(table.column("meta")[0].as_py())
    assert meta == {"image_path": "000000000.jpg", "similarity": 0.3}


def test_damaged_or_mismatched_files_are_failed_rows(tmp_path: Path) -> None:
    x = vectors_with_groups(40)
    root = write_clip_retrieval(tmp_path / "emb", [x[:20], x[20:]])
    raw = (root / "img_emb" / "img_emb_0.npy").read_bytes()
    (root / "img_emb" / "img_emb_0.npy").write_bytes(raw[: len(raw) // 2])  # truncated download
    pq.write_table(pa.table({"url": ["u"] * 5}), root / "metadata" / "metadata_1.parquet")  # 5 rows for 20
    result = run([str(root)], tmp_path / "out", config=PLAIN)
    m = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    damaged = m.filter(pl.col("shard") == "img_emb_0")
    assert damaged.height == 1 and damaged["error"][0].startswith("embeddings truncated")
    mismatched = m.filter(pl.col("shard") == "img_emb_1")
    assert mismatched.height == 20 and (mismatched["status"] == "failed").all()
    assert "not row for row" in mismatched["error"][0]
    assert result.failed == 21


@pytest.mark.parametrize("partition_above", [50_000, 200])
def test_run_gives_connected_components_of_exact_pairs(tmp_path: Path, partition_above: int) -> None:
    x = vectors_with_groups(1200)
    root = write_clip_retrieval(tmp_path / "emb", [x[:500], x[500:]])
    out = tmp_path / f"out{partition_above}"
    args = ["run", str(root), "--out", str(out), "--threshold", str(T), "--quiet"]
    config = tmp_path / "search.toml"
    config.write_text(f"[search]\npartition_above = {partition_above}\n")
    res = CliRunner().invoke(app, [*args, "--config", str(config)])
    assert res.exit_code == 0, res.output
    m = pl.read_parquet(out / "manifest.parquet")
    assert m.height == 1200 and m["sample_id"].n_unique() == 1200
    assert m["url"][700] == "https://example.com/700.jpg"
    # exact search over the stored (float16) vectors, then connected components
    v = unit32(x.astype(np.float16))
    sim = v @ v.T
    i, j = np.nonzero(np.triu(sim >= T, 1))
    want = components(1200, Edges.of(i, j, sim[i, j], Signal.EMBEDDING))
    assert m["cluster_id"].to_list() == want.tolist()
    assert (m["cluster_size"] > 1).sum() > 100
    assert set(m["signal"].drop_nulls()) == {"precomputed"}  # no caption links, not "sscd"
    report = json.loads((out / "report.json").read_text())
    assert report["thresholds"]["embedding_model"] == "precomputed"
    assert report["embedding_pairs_at"]["0.95"]["pairs"] == len(i)


def test_images_and_precomputed_embeddings_are_not_mixed(tmp_path: Path, sample_images_dir: object) -> None:
    root = write_clip_retrieval(tmp_path / "emb", [vectors_with_groups(20)])
    images, _ = sample_images_dir  # type: ignore[misc]
    with pytest.raises(ConfigError, match="precomputed embeddings"):
        run([str(root), str(images)], tmp_path / "out", config=PLAIN)
    res = CliRunner().invoke(app, ["run", str(root), str(images), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "cannot be compared" in res.output


def test_embeddings_of_two_sizes_are_refused(tmp_path: Path) -> None:
    write_clip_retrieval(tmp_path / "a", [vectors_with_groups(20, dim=16)])
    write_clip_retrieval(tmp_path / "b", [vectors_with_groups(20, dim=32)])
    res = CliRunner().invoke(app, ["run", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "dimension" in res.output
