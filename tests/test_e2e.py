"""End to end, as a curator runs it: LAION-style parquet → img2dataset over loopback HTTP →
``dedup run`` through the CLI → manifest, keep list and report."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from _data import PlantedDataset
from typer.testing import CliRunner

from dedup.cli import app

pytestmark = pytest.mark.slow

# Edits that the default preset (SSCD >= 0.95, PDQ <= 31, exact) must always catch on these
# images; heavier edits (crop, pad, flip) are the detection-quality issue's to measure.
MUST_CATCH = {"exact", "resize", "jpeg", "grayscale"}


@pytest.fixture(scope="module")
def dedup_out(i2d_webdataset: PlantedDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "out"
    shards, _ = i2d_webdataset
    result = CliRunner().invoke(app, ["run", str(shards), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "samples" in result.output and "manifest:" in result.output
    return out


def test_every_input_sample_has_exactly_one_row(i2d_webdataset: PlantedDataset, dedup_out: Path) -> None:
    shards, truth = i2d_webdataset
    sidecar_urls = pl.concat([pl.read_parquet(p) for p in sorted(Path(shards).glob("*.parquet"))])["url"]
    m = pl.read_parquet(dedup_out / "manifest.parquet")
    assert m.height == sidecar_urls.len() == len(truth)
    assert sorted(m["url"].to_list()) == sorted(sidecar_urls.to_list())
    assert m["sample_id"].n_unique() == m.height


def test_failed_downloads_and_corrupt_images_are_rows(i2d_webdataset: PlantedDataset, dedup_out: Path) -> None:
    _, truth = i2d_webdataset
    m = pl.read_parquet(dedup_out / "manifest.parquet")
    failed = m.filter(pl.col("status") == "failed")
    assert set(failed["url"]) == truth.failed  # the 404s and the corrupt image
    missing = list(truth.failed - truth.corrupt)
    assert failed.filter(pl.col("url").is_in(missing))["error"].str.starts_with("download failed").all()
    assert not failed.filter(pl.col("url").is_in(list(truth.corrupt)))["error"].str.starts_with("download").any()
    assert not failed["keep"].any()


def test_planted_copies_share_a_cluster(i2d_webdataset: PlantedDataset, dedup_out: Path) -> None:
    _, truth = i2d_webdataset
    m = pl.read_parquet(dedup_out / "manifest.parquet")
    cluster = dict(zip(m["url"], m["cluster_id"], strict=True))
    original = {truth[u]: u for u in truth if truth.kind[u] == "original"}
    checked = 0
    for url in truth:
        if truth.kind[url] in MUST_CATCH:
            assert cluster[url] == cluster[original[truth[url]]], (url, truth.kind[url])
            checked += 1
    assert checked >= 5
    # never merges distinct originals
    assert len({cluster[u] for u in original.values()}) == len(original)


def test_keep_list_holds_one_sample_per_cluster(dedup_out: Path) -> None:
    m = pl.read_parquet(dedup_out / "manifest.parquet").filter(pl.col("status") == "ok")
    keep = pl.read_parquet(dedup_out / "keep.parquet")
    assert keep.height == m["cluster_id"].n_unique()
    kept_clusters = m.join(keep.select("sample_id"), on="sample_id")["cluster_id"]
    assert kept_clusters.n_unique() == keep.height
    # usable as img2dataset's url_list: url and caption columns, every url present
    assert pq.read_schema(dedup_out / "keep.parquet").names[:2] == ["url", "caption"]
    assert keep["url"].null_count() == 0


def test_report_json(dedup_out: Path) -> None:
    report = json.loads((dedup_out / "report.json").read_text())
    m = pl.read_parquet(dedup_out / "manifest.parquet")
    assert report["summary"]["samples"] == m.height
    assert report["summary"]["duplicate_clusters"] >= 5
    assert report["links_per_signal"].get("sscd_distilled", 0) > 0  # the default preset's model
    assert report["links_per_signal"].get("exact_bytes", 0) > 0
    dist = report["duplicate_count"]["all_samples"]
    assert 0 < dist["mean"] <= dist["max"]


def test_download_then_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dedup download` runs img2dataset for real on LAION-style metadata; its shards feed `run`."""
    from _data import LoopbackImageServer, encode_jpeg, make_laion_parquet, natural_image

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with LoopbackImageServer() as server:
        jpeg = [encode_jpeg(natural_image(100 + k, (160, 120))) for k in range(4)]
        urls = [server.url(server.add(f"img/{k}.jpg", data)) for k, data in enumerate(jpeg)]
        urls.append(server.url(server.add("img/copy.jpg", jpeg[0])))  # the same bytes under another URL
        urls.append(server.url("img/missing.jpg"))  # 404
        rows = [{"URL": u, "TEXT": f"caption {k}", "WIDTH": 160, "HEIGHT": 120, "AESTHETIC_SCORE": float(k)}
                for k, u in enumerate(urls)]
        make_laion_parquet(tmp_path / "meta.parquet", rows)
        result = CliRunner().invoke(app, [
            "download", str(tmp_path / "meta.parquet"), "--out", str(tmp_path / "shards"),
            "--processes", "1", "--threads", "4", "--resize-mode", "no",
        ])
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["00000.tar"]
    result = CliRunner().invoke(app, ["run", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "-q",
                                      "--model", "sscd_distilled"])
    assert result.exit_code == 0, result.output
    m = pl.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert m.height == len(urls)
    by_url = {r["url"]: r for r in m.iter_rows(named=True)}
    assert by_url[urls[-1]]["status"] == "failed"
    assert all(by_url[u]["status"] == "ok" for u in urls[:-1])
    assert by_url[urls[0]]["cluster_id"] == by_url[urls[4]]["cluster_id"]
    assert by_url[urls[4]]["signal"] == "exact_bytes" or by_url[urls[0]]["signal"] == "exact_bytes"
    assert by_url[urls[1]]["caption"] == "caption 1"
