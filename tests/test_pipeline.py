"""The whole pipeline through the library: one row per sample, clusters, resume, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from _configs import PLAIN
from _data import PlantedDataset, make_laion_parquet

from dedup import run
from dedup.config import KeepPolicy
from dedup.errors import OutputError, SourceError
from dedup.featurize import FeatureStep

FAST = PLAIN.with_overrides({"embed.model": "sscd_distilled", "embed.size": 224, "folder_batch": 4})


def _manifest(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "manifest.parquet")


def test_folder_every_file_once_and_planted_exact_copies_cluster(
    sample_images_dir: PlantedDataset, tmp_path: Path
) -> None:
    root, truth = sample_images_dir
    result = run([str(root)], tmp_path / "out", config=FAST)
    m = _manifest(tmp_path / "out")
    assert sorted(m["sample_id"].to_list()) == sorted(truth)  # one row per file, no more
    assert m["sample_id"].n_unique() == m.height
    assert result.samples == m.height
    # the undecodable file is a failed row with a one-line reason, never kept
    for broken in truth.corrupt:
        row = m.filter(pl.col("sample_id") == broken).row(0, named=True)
        assert row["status"] == "failed" and row["reason"] == "failed" and not row["keep"]
        assert row["error"] and "\n" not in row["error"]
    cluster = dict(zip(m["sample_id"], m["cluster_id"], strict=True))
    for members in truth.groups().values():
        exact = [p for p in members if truth.kind[p] in ("original", "exact")]
        assert len({cluster[p] for p in exact}) == 1, exact
    # unrelated originals never share a cluster
    originals = [p for p in truth if truth.kind[p] == "original"]
    assert len({cluster[p] for p in originals}) == len(originals)
    # one kept sample per cluster of ok samples
    ok = m.filter(pl.col("status") == "ok")
    kept = ok.filter(pl.col("keep"))
    assert kept["cluster_id"].n_unique() == kept.height == ok["cluster_id"].n_unique()
    dropped = ok.filter(~pl.col("keep"))
    assert (dropped["reason"] == "duplicate").all()
    assert dropped["duplicate_of"].is_in(kept["sample_id"]).all()
    assert dropped["signal"].null_count() == 0 and dropped["similarity"].null_count() == 0


def test_outputs_and_report(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, truth = sample_images_dir
    out = tmp_path / "out"
    run([str(root)], out, config=FAST)
    for name in ("manifest.parquet", "keep.parquet", "report.json", "report.html", "config.json",
                 "index/meta.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    m = _manifest(out)
    s = report["summary"]
    assert s["samples"] == m.height and s["failed"] == len(truth.corrupt)
    assert s["dropped"] == m.filter(pl.col("status").eq("ok") & ~pl.col("keep")).height
    hist = {size: count for size, count in report["cluster_size_histogram"]}
    assert sum(size * count for size, count in hist.items()) == s["ok"]
    assert set(report["embedding_pairs_at"]) == {"0.95", "0.5"}
    assert report["duplicate_count"]["all_samples"]["max"] == s["largest_cluster"] - 1
    keep = pq.read_table(out / "keep.parquet")
    assert {"url", "caption"} <= set(keep.column_names)
    assert keep.num_rows == s["kept"]
    from dedup.store import open_index

    emb = open_index(out, vectors=True).vectors
    assert emb is not None
    assert emb.shape == (s["ok"], 512)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_same_input_same_bytes(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    run([str(root)], tmp_path / "a", config=FAST)
    run([str(root)], tmp_path / "b", config=FAST)
    for name in ("manifest.parquet", "keep.parquet", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_crash_then_rerun_resumes_and_matches(
    sample_images_dir: PlantedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = sample_images_dir
    run([str(root)], tmp_path / "clean", config=FAST)

    calls: list[str] = []
    real = FeatureStep.__call__

    def crash_on_third(self: FeatureStep, shard, progress=None):  # type: ignore[no-untyped-def]
        calls.append(shard.shard_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # like Ctrl-C or a kill: not retried, not caught
        return real(self, shard, progress)

    monkeypatch.setattr(FeatureStep, "__call__", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run([str(root)], tmp_path / "crashed", config=FAST)
    assert not (tmp_path / "crashed" / "manifest.parquet").exists()
    first_two = calls[:2]

    calls.clear()
    def counting(self: FeatureStep, shard, progress=None):  # type: ignore[no-untyped-def]
        calls.append(shard.shard_id)
        return real(self, shard, progress)

    monkeypatch.setattr(FeatureStep, "__call__", counting)
    run([str(root)], tmp_path / "crashed", config=FAST)
    assert not set(first_two) & set(calls)  # finished shards were not redone
    assert (tmp_path / "crashed" / "manifest.parquet").read_bytes() == (tmp_path / "clean" / "manifest.parquet").read_bytes()


def test_changed_settings_do_not_reuse_checkpoints(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    out = tmp_path / "out"
    run([str(root)], out, config=FAST)
    run([str(root)], out, config=FAST.with_overrides({"embed.size": 256}))
    assert len(list((out / ".work").iterdir())) == 2
    # search-only changes reuse the per-shard work
    run([str(root)], out, config=FAST.with_overrides({"search.threshold": 0.8}))
    assert len(list((out / ".work").iterdir())) == 2


def test_keep_policy_largest(tmp_path: Path) -> None:
    from _data import natural_image

    img = natural_image(3, (200, 150))
    (tmp_path / "src").mkdir()
    img.resize((100, 75)).save(tmp_path / "src" / "a_small.png")
    img.save(tmp_path / "src" / "b_big.png")
    natural_image(4, (200, 150)).save(tmp_path / "src" / "c_other.png")
    cfg = FAST.with_overrides({"keep.policy": KeepPolicy.LARGEST.value})
    run([str(tmp_path / "src")], tmp_path / "out", config=cfg)
    m = _manifest(tmp_path / "out")
    kept = set(m.filter(pl.col("keep"))["sample_id"])
    assert kept == {"b_big.png", "c_other.png"}


def test_laion_metadata_url_and_caption_duplicates(tmp_path: Path) -> None:
    rows = [
        {"URL": "http://a.example/1.jpg", "TEXT": "Canvas Wall Art Print: Sunset", "WIDTH": 100, "HEIGHT": 80, "AESTHETIC_SCORE": 5.0},
        {"URL": "http://a.example/1.jpg/", "TEXT": "something else", "WIDTH": 100, "HEIGHT": 80, "AESTHETIC_SCORE": 6.0},
        {"URL": "http://b.example/2.jpg", "TEXT": "canvas wall art print — sunset!", "WIDTH": 50, "HEIGHT": 40, "AESTHETIC_SCORE": 7.0},
        {"URL": "http://c.example/3.jpg", "TEXT": "a dog", "WIDTH": 10, "HEIGHT": 10, "AESTHETIC_SCORE": 1.0},
    ]
    make_laion_parquet(tmp_path / "meta" / "part-0.parquet", rows)
    cfg = FAST.with_overrides({"keep.policy": "column", "keep.column": "AESTHETIC_SCORE"})
    run([str(tmp_path / "meta")], tmp_path / "out", config=cfg)
    m = _manifest(tmp_path / "out")
    assert m.height == 4 and (m["status"] == "ok").all()
    assert m["cluster_id"].to_list()[:3] == [0, 0, 0] and m["cluster_id"][3] == 3
    kept = m.filter(pl.col("keep"))["url"].to_list()
    assert kept == ["http://b.example/2.jpg", "http://c.example/3.jpg"]  # highest aesthetic score wins
    assert set(m.filter(~pl.col("keep"))["signal"]) <= {"url", "caption"}


def test_refuses_foreign_output_folder(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not written by dedup"):
        run([str(root)], tmp_path / "busy", config=FAST)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        run([str(tmp_path / "nope")], tmp_path / "out", config=FAST)


@pytest.mark.slow
def test_two_workers_give_the_same_manifest(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    run([str(root)], tmp_path / "one", config=FAST)
    run([str(root)], tmp_path / "two", config=FAST.with_overrides({"workers": 2, "pool": "processes"}))
    run([str(root)], tmp_path / "threads", config=FAST.with_overrides({"workers": 2, "pool": "threads"}))
    assert (tmp_path / "one" / "manifest.parquet").read_bytes() == (tmp_path / "two" / "manifest.parquet").read_bytes()
    assert (tmp_path / "one" / "manifest.parquet").read_bytes() == (tmp_path / "threads" / "manifest.parquet").read_bytes()


def test_hash_path_threads_by_default_same_manifest(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    """--model none runs its shards on threads by default (pool = "auto"): the same manifest
    and keep list, byte for byte, as worker processes and as one worker."""
    root, _ = sample_images_dir
    hashes = PLAIN.with_overrides({"embed.model": "none", "folder_batch": 4, "workers": 2})
    assert hashes.local_threads()
    run([str(root)], tmp_path / "auto", config=hashes)
    run([str(root)], tmp_path / "processes", config=hashes.with_overrides({"pool": "processes"}))
    run([str(root)], tmp_path / "one", config=hashes.with_overrides({"workers": 1}))
    for other in ("processes", "one"):
        for name in ("manifest.parquet", "keep.parquet"):
            assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / other / name).read_bytes()


def test_copy_of_output_folder_is_still_resumable(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    run([str(root)], tmp_path / "a", config=FAST)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "manifest.parquet").unlink()
    run([str(root)], tmp_path / "b", config=FAST)
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (tmp_path / "b" / "manifest.parquet").read_bytes()
