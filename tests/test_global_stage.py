"""The global stage at scale: columnar manifest, outputs written a row group at a time from rows
that stay on disk, bounded caption phrases; and the run's safety fixes (index model of
precomputed runs, faiss files written atomically, markers without checkpoints, one run per OUT)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from _configs import PLAIN
from dedup import run
from dedup.cli import app
from dedup.cluster import components
from dedup.config import KeepPolicy
from dedup.errors import OutputError
from dedup.featurize import SCHEMA
from dedup.manifest import MANIFEST_SCHEMA, Manifest, _GroupWriter, build_manifest
from dedup.report.phrases import key_phrases, phrase_section
from dedup.rows import FeatureRows, rechunk
from dedup.search import Edges, Signal
from dedup.select import keepers

runner = CliRunner()


def _features(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ok = rng.random(n) > 0.05
    columns: dict[str, Any] = {
        "sample_id": [f"s/{r:06d}" for r in range(n)],
            "source": ["src"] * n,
            "shard": [f"shard{r // 997}" for r in range(n)],
            "key": [f"{r:06d}" for r in range(n)],
            "url": [f"https://example.com/{r}.jpg" for r in range(n)],
            "caption": [f"canvas wall art print {r % 13}" if r % 3 else None for r in range(n)],
            "width": rng.integers(10, 500, n).astype(np.int32),
            "height": rng.integers(10, 500, n).astype(np.int32),
            "status": ["ok" if o else "failed" for o in ok],
            "error": [None if o else "decode: broken" for o in ok],
            "sha256": [None] * n,
            "pixel_sha256": [None] * n,
            "phash": [None] * n,
            "pdq": [None] * n,
            "pdq_quality": [None] * n,
            "has_image": [False] * n,
            "embedded": ok.tolist(),
            "meta": [None] * n,
        }
    # columns the feature schema may have gained since (all null here)
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in SCHEMA}, schema=SCHEMA)


def _edges(n: int, m: int, seed: int = 1) -> Edges:
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, m)
    j = (i + rng.integers(1, 40, m)) % n
    keep = i != j
    parts = [
        Edges.of(i[keep][: m // 2], j[keep][: m // 2], rng.uniform(0.95, 1, m // 2).astype(np.float32)[: keep[: m // 2].sum()], Signal.EMBEDDING),
        Edges.of(i[keep][m // 2 :], j[keep][m // 2 :], np.ones(int(keep[m // 2 :].sum()), np.float32), Signal.EXACT_BYTES),
    ]
    return Edges.concat(parts)


def test_manifest_a_row_group_at_a_time_from_files_is_the_whole_table_written_at_once(tmp_path: Path) -> None:
    n, group = 5_000, 700
    table = _features(n)
    # the rows as a run leaves them: one parquet checkpoint per shard, read back lazily
    paths = []
    for k, start in enumerate(range(0, n, 997)):
        p = tmp_path / f"part{k}.parquet"
        pq.write_table(table.slice(start, 997), p)
        paths.append(p)
    rows = FeatureRows(paths, SCHEMA)
    # all-null columns (hashes of embeddings) are not read, yet come back as the same nulls
    assert pa.concat_tables(list(rows.batches(size=600))).equals(table)
    assert rows.take(["sha256", "sample_id"], np.array([3, 2_500])).to_pylist() == [
        {"sha256": None, "sample_id": "s/000003"}, {"sha256": None, "sample_id": "s/002500"}
    ]
    assert rows.num_rows == n and rows.null_count("sha256") == n and rows.null_count("caption") == table.column("caption").null_count
    edges = _edges(n, 3_000)
    labels = components(n, edges)
    ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
    keep_row = keepers(labels, policy=KeepPolicy.FIRST, eligible=ok)

    whole = build_manifest(table, labels, keep_row, edges, embedding_label="precomputed")
    assert whole.schema == MANIFEST_SCHEMA and whole.num_rows == n
    dropped = np.asarray(whole.column("reason").to_numpy(zero_copy_only=False) == "duplicate")
    dup_of = whole.column("duplicate_of").to_pylist()
    ids = table.column("sample_id").to_pylist()
    assert all(dup_of[r] == ids[keep_row[r]] for r in np.flatnonzero(dropped))
    assert set(whole.column("signal").drop_null().to_pylist()) <= {"precomputed", "exact_bytes"}

    pq.write_table(whole, tmp_path / "once.parquet", compression="zstd", row_group_size=group, write_statistics=True)
    lazy = Manifest.build(rows, labels, keep_row, edges, embedding_label="precomputed")
    _GroupWriter(tmp_path / "groups.parquet", MANIFEST_SCHEMA, compression="zstd", write_statistics=True).write(
        lazy.batches(size=333), row_group_size=group
    )
    assert (tmp_path / "once.parquet").read_bytes() == (tmp_path / "groups.parquet").read_bytes()
    assert pq.ParquetFile(tmp_path / "groups.parquet").metadata.num_row_groups == -(-n // group)
    # a few rows read back by row number are the same rows
    some = np.array([0, 5, 998, 4_999])
    assert lazy.take(some).to_pylist() == whole.take(pa.array(some)).to_pylist()


def test_rechunk_gives_exact_slices_of_one_chunk() -> None:
    t = pa.table({"a": list(range(10))})
    parts = [t.slice(0, 3), t.slice(3, 4), t.slice(7, 3)]
    out = list(rechunk(parts, 4))
    assert [o.num_rows for o in out] == [4, 4, 2]
    assert all(o.column(0).num_chunks == 1 for o in out)
    assert sum((o.column(0).to_pylist() for o in out), []) == list(range(10))


def test_caption_phrases_on_a_sample_estimate_the_exact_counts() -> None:
    rng = np.random.default_rng(3)
    n = 6_000
    dup = rng.random(n) < 0.3
    cluster = np.where(dup, rng.integers(0, 200, n), np.arange(n) + 1_000)
    captions = [
        ("canvas wall art print " if d and rng.random() < 0.6 else "") + f"photo of a thing {rng.integers(0, 50)}"
        for d in dup
    ]
    exact = key_phrases(captions, cluster.tolist(), dup.tolist(), min_support=3, min_clusters=2, limit=50)
    assert "sample" not in exact  # nothing drawn: exact counts
    dup_rows = np.flatnonzero(dup)
    other_rows = np.flatnonzero(~dup)
    # same numbers when every caption is given through the sampled form
    full = phrase_section(
        [captions[r] for r in dup_rows], cluster[dup_rows].tolist(), [captions[r] for r in other_rows],
        duplicate_samples=dup_rows.size, other_samples=other_rows.size, min_support=3, min_clusters=2, limit=50,
    )  # fmt: skip
    assert full == exact
    pick_d = np.sort(rng.choice(dup_rows, 900, replace=False))
    pick_o = np.sort(rng.choice(other_rows, 900, replace=False))
    est = phrase_section(
        [captions[r] for r in pick_d], cluster[pick_d].tolist(), [captions[r] for r in pick_o],
        duplicate_samples=dup_rows.size, other_samples=other_rows.size, min_support=3, min_clusters=2, limit=50,
    )  # fmt: skip
    assert est["sample"] == {"duplicate_captions": 900, "other_captions": 900, "seed": est["sample"]["seed"]}
    assert est["samples"] == n and est["duplicate_samples"] == dup_rows.size
    by_exact = {p["phrase"]: p for p in exact["phrases"]}
    by_est = {p["phrase"]: p for p in est["phrases"]}
    assert "wall art print" in by_est and "wall art print" in by_exact
    for phrase in ("wall art print", "canvas wall art"):
        e, x = by_est[phrase], by_exact[phrase]
        assert abs(e["lift"] - x["lift"]) / x["lift"] < 0.15
        assert abs(e["support"] - x["support"]) / x["support"] < 0.15
    assert all(p["count"] >= p["support"] for p in est["phrases"])


# ------------------------------------------------------------------------------- runs


def _clip_dir(root: Path, n: int = 300, dim: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[1::10] = x[0::10] + 0.01 * rng.standard_normal((n // 10, dim)).astype(np.float32)  # near copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for k, part in enumerate(np.array_split(np.arange(n), 2)):
        np.save(root / "img_emb" / f"img_emb_{k}.npy", x[part].astype(np.float16))
        pq.write_table(
            pa.table({"image_path": [f"{r:09d}.jpg" for r in part], "caption": [f"c {r % 7}" for r in part], "url": [f"https://e.com/{r}" for r in part]}),
            root / "metadata" / f"metadata_{k}.parquet",
        )
    return root


def _image_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "gen.png")
    return root


def test_precomputed_index_records_its_kind_and_query_and_check_refuse_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run([str(_clip_dir(tmp_path / "emb"))], out, config=PLAIN.with_overrides({"search.threshold": 0.95}))
    meta = json.loads((out / "index" / "meta.json").read_text())
    assert meta["model"] == "precomputed" and meta["dim"] == 16
    images = _image_folder(tmp_path / "gen")

    res = runner.invoke(app, ["query", str(images), "--index", str(out), "--out", str(tmp_path / "q"), "-q"])
    assert res.exit_code == 2, res.output
    assert "precomputed embeddings" in res.output and "cannot be compared" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output

    res = runner.invoke(app, ["check", str(images), "--against", str(out), "-q"])
    assert res.exit_code == 2, res.output
    assert "cannot be compared" in res.output and len(res.output.strip().splitlines()) == 1


def test_faiss_files_on_a_full_disk_are_an_output_error_and_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    import dedup.store

    index = faiss.IndexFlatIP(8)
    index.add(np.eye(8, dtype=np.float32))
    path = tmp_path / "embeddings.faiss"
    dedup.store.write_faiss(path, index)
    assert faiss.read_index(str(path)).ntotal == 8
    before = path.read_bytes()

    real_open = open

    class FullDisk:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

        def write(self, data: Any) -> int:
            self.fh.write(bytes(memoryview(data)[:100]))  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.fh, name)

    monkeypatch.setattr(dedup.store, "open", lambda p, mode="r", *a, **k: FullDisk(real_open(p, mode, *a, **k)), raising=False)
    index.add(np.eye(8, dtype=np.float32))
    with pytest.raises(OutputError, match="the disk is full"):
        dedup.store.write_faiss(path, index)
    assert path.read_bytes() == before  # the old file stands, whole
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings.faiss"]  # no truncated temp file


def test_a_marker_whose_checkpoint_is_gone_recomputes_the_shard(tmp_path: Path) -> None:
    src = _clip_dir(tmp_path / "emb")
    cfg = PLAIN.with_overrides({"search.threshold": 0.95})
    run([str(src)], tmp_path / "clean", config=cfg)
    out = tmp_path / "out"
    run([str(src)], out, config=cfg)
    (checkpoint,) = out.glob(".work/*/shards/img_emb_0.parquet")
    checkpoint.unlink()
    next(out.glob(".work/*/shards/img_emb_1.npy")).unlink()
    assert len(list(out.glob(".work/*/done/*.done.json"))) == 2  # the markers stayed
    run([str(src)], out, config=cfg)  # no traceback: both shards run again
    for name in ("manifest.parquet", "keep.parquet", "report.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_two_runs_into_one_folder_are_locked_against_each_other(tmp_path: Path) -> None:
    src = _clip_dir(tmp_path / "emb")
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
        with pytest.raises(OutputError, match="another dedup run is writing to"):
            run([str(src)], out)
        res = runner.invoke(app, ["run", str(src), "--out", str(out), "-q"])
        assert res.exit_code == 2 and "another dedup run is writing to" in res.output
        assert not (out / "manifest.parquet").exists() and not (out / ".work").exists()
    finally:
        os.close(fd)
    run([str(src)], out, config=PLAIN.with_overrides({"search.threshold": 0.95}))  # free again
    assert (out / "manifest.parquet").is_file()
    shutil.rmtree(out / ".work")


def test_index_add_reads_the_stored_vectors_in_pieces_and_equals_the_full_run(tmp_path: Path) -> None:
    from dedup.add import add

    cfg = PLAIN.with_overrides({"search.threshold": 0.95, "search.partition_above": 100})
    a = _clip_dir(tmp_path / "a", n=300, seed=1)
    b = _clip_dir(tmp_path / "b", n=200, seed=2)
    run([str(a), str(b)], tmp_path / "full", config=cfg)
    inc = tmp_path / "inc"
    run([str(a)], inc, config=cfg)
    result = add([str(b)], inc)
    assert result.added_shards == 2 and result.result is not None
    for name in ("manifest.parquet", "keep.parquet", "report.json"):
        assert (inc / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    from dedup.store import open_index

    assert np.array_equal(open_index(inc, vectors=True).vectors, open_index(tmp_path / "full", vectors=True).vectors)  # type: ignore[arg-type]
    assert len(list((inc / "index").glob("data-*"))) == 1  # the earlier generation's folder is gone
    assert open_index(inc, columns=None).samples == open_index(tmp_path / "full", columns=None).samples
