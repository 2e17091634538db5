"""The persistent index: its layout, `index add` (only new shards decoded; equal to a full run), locks."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _configs import PLAIN
from _data import PlantedDataset, make_image_folder
from typer.testing import CliRunner

from dedup import run
from dedup.cli import app

from dedup.featurize import SCHEMA, FeatureStep
from dedup.add import add
from dedup.store import (
    FORMAT,
    IndexBusyError,
    IndexConflictError,
    IndexUnreadableError,
    index_lock,
    open_index,
)

FAST = PLAIN.with_overrides({"embed.model": "sscd_distilled", "embed.size": 224, "folder_batch": 4})
OUTPUTS = ("manifest.parquet", "keep.parquet", "remove.parquet", "report.json")
runner = CliRunner()


def _same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    from dedup.store import open_index as open_store

    def samples(out: Path) -> bytes:
        meta = json.loads((out / "index" / "meta.json").read_text())
        return (out / "index" / meta["data"] / "samples.parquet").read_bytes()

    assert samples(a) == samples(b)
    va, vb = open_store(a, vectors=True).vectors, open_store(b, vectors=True).vectors
    assert va is not None and vb is not None and va.dtype == vb.dtype and np.array_equal(va, vb)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def two_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Folders A, B and C of generated JPEGs; B holds a byte copy of one of A's images."""
    a, b, c = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    make_image_folder(a, 6, seed=0)
    make_image_folder(b, 3, copies=(2,), corrupt=0, seed=1)
    shutil.copy(a / "originals" / "orig_004.jpg", b / "originals" / "zz_from_a.jpg")
    make_image_folder(c, 2, copies=(1,), corrupt=1, seed=2)
    return a, b, c


def test_run_then_add_is_the_full_run(two_folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, c = (str(p) for p in two_folders)
    run([a, b], tmp_path / "ab", config=FAST)
    run([a, b, c], tmp_path / "abc", config=FAST)
    inc = tmp_path / "inc"
    run([a], inc, config=FAST)
    first = add([b], inc)
    assert first.added_shards == 2 and first.result is not None
    _same_outputs(tmp_path / "ab", inc)  # ids renamed to s0/..., as `run A B` names them
    add([c], inc)
    _same_outputs(tmp_path / "abc", inc)
    meta = json.loads((inc / "index" / "meta.json").read_text())
    assert [s["source"] for s in meta["sources"]] == [a, b, c]
    assert meta["generation"] == 3
    # the cross-source copy is a duplicate of A's image, under the multi-source ids
    import polars as pl

    m = pl.read_parquet(inc / "manifest.parquet")
    row = m.filter(pl.col("sample_id") == "s1/originals/zz_from_a.jpg").row(0, named=True)
    assert row["duplicate_of"] == "s0/originals/orig_004.jpg" and row["signal"] == "exact_bytes"


def test_add_decodes_and_embeds_only_the_new_samples(
    two_folders: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, _ = two_folders
    out = tmp_path / "out"
    run([str(a)], out, config=FAST)

    import dedup.featurize

    shards: list[str] = []
    decoded: list[int] = []
    real_call = FeatureStep.__call__
    real_fingerprint = dedup.featurize.fingerprint

    def counting_call(self: FeatureStep, shard, progress=None):  # type: ignore[no-untyped-def]
        shards.append(shard.shard_id)
        return real_call(self, shard, progress)

    def counting_fingerprint(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(len(data))
        return real_fingerprint(data, *args, **kwargs)

    monkeypatch.setattr(FeatureStep, "__call__", counting_call)
    monkeypatch.setattr(dedup.featurize, "fingerprint", counting_fingerprint)
    result = add([str(b)], out)
    new_files = sorted(str(p.relative_to(b)) for p in b.rglob("*.jpg"))
    assert shards == ["s1/part-00000", "s1/part-00001"]  # B's shards only, never A's
    assert len(decoded) == len(new_files) == result.added_samples
    # adding the same source again decodes nothing and leaves every file as it was
    before = _digest(out)
    shards.clear()
    again = add([str(b)], out)
    assert again.result is None and again.known_shards == 2 and shards == []
    assert _digest(out) == before


def test_a_source_that_gains_shards(i2d_webdataset: PlantedDataset, tmp_path: Path) -> None:
    """img2dataset output growing in place: the new shard may sort after or before the old one."""
    full_src = i2d_webdataset.out_dir
    run([str(full_src)], tmp_path / "full", config=FAST)
    for first, later in (("00000", "00001"), ("00001", "00000")):
        src = tmp_path / f"src-{first}"
        src.mkdir()
        for p in full_src.glob(f"{first}*"):
            shutil.copy2(p, src / p.name)
        out = tmp_path / f"out-{first}"
        run([str(src)], out, config=FAST)
        for p in full_src.glob(f"{later}*"):
            shutil.copy2(p, src / p.name)
        # the same folder spelled differently is the same source
        added = add([str(src) + "/"], out)
        assert (added.added_shards, added.known_shards) == (1, 1)
        # a run over the grown folder, in a fresh output folder, is byte for byte the same
        run([str(src)], tmp_path / f"rerun-{first}", config=FAST)
        _same_outputs(tmp_path / f"rerun-{first}", out)
        m = pq.read_table(out / "manifest.parquet")
        full = pq.read_table(tmp_path / "full" / "manifest.parquet")
        for column in ("sample_id", "cluster_id", "keep", "reason", "duplicate_of", "signal"):
            assert m.column(column).equals(full.column(column)), column


def test_a_changed_shard_is_a_conflict(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_image_folder(src, 3, copies=(1,), corrupt=0)
    out = tmp_path / "out"
    run([str(src)], out, config=FAST)
    before = _digest(out / "index")
    # a loose image that sorts first shifts every folder batch: part-00000 is not what was indexed
    (src / "copies" / "aaa_new.jpg").write_bytes((src / "originals" / "orig_000.jpg").read_bytes())
    with pytest.raises(IndexConflictError, match=r"shard 'part-00000' of .* changed since it was indexed; hint: "):
        add([str(src)], out)
    assert _digest(out / "index") == before


def test_index_layout(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, truth = sample_images_dir
    out = tmp_path / "out"
    run([str(root)], out, config=FAST)
    d = out / "index"
    meta = json.loads((d / "meta.json").read_text())
    for name in ("meta.json", f"{meta['data']}/samples.parquet", f"{meta['data']}/shards.parquet", f"{meta['data']}/pdq.faiss", ".lock"):
        assert (d / name).is_file(), name
    assert meta["format"] == FORMAT == 5
    parts = [d / meta["data"] / name for name, _ in meta["vector_parts"]]
    assert parts and all(p.is_file() for p in parts) and not (d / "embeddings.npy").exists()
    # stored once: each part is the shard's checkpoint, hard-linked
    assert all(p.stat().st_nlink == 2 for p in parts)
    assert meta["samples"] == len(truth) and meta["shards"] == 4
    assert meta["sources"] == [{"source": str(root), "resolved": str(root.resolve())}]
    assert meta["config"]["embed"]["model"] == "sscd_distilled" and meta["stage_key"] == FAST.stage_key()
    samples = pq.read_table(d / meta["data"] / "samples.parquet")
    assert samples.column_names == [*SCHEMA.names, "cluster_id", "emb_row"]
    shards = pq.read_table(d / meta["data"] / "shards.parquet").to_pylist()
    assert [s["shard_id"] for s in shards] == ["part-00000", "part-00001", "part-00002", "part-00003"]
    assert sum(s["rows"] for s in shards) == len(truth)
    assert sum(len(s["members"]) for s in shards) == len(truth)
    assert all(s["stamp"] and s["kind"] == "folder" for s in shards)
    index = open_index(out, columns=None, vectors=True, search=True)
    assert index.vectors is not None and index.embeddings.ntotal == index.vectors.shape[0] == meta["embedded"]
    # the PDQ index's ids are sample rows: searching a sample's own code finds its row
    pdq = samples.column("pdq").to_pylist()
    ok_rows = [r for r, s in enumerate(samples.column("status").to_pylist()) if s == "ok"]
    assert index.pdq.ntotal == len(ok_rows)
    codes = np.frombuffer(b"".join(pdq[r] for r in ok_rows), np.uint8).reshape(-1, 32)
    _, found = index.pdq.search(codes, 1)
    assert all(samples.column("pdq")[int(f)].as_py() == pdq[r] for f, r in zip(found[:, 0], ok_rows, strict=True))


def test_unreadable_indexes(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    with pytest.raises(IndexUnreadableError, match="does not exist; hint: build a baseline index with `dedup run"):
        open_index(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexUnreadableError, match="holds no index/ folder"):
        open_index(tmp_path / "empty")
    root, _ = sample_images_dir
    out = tmp_path / "out"
    run([str(root)], out, config=FAST)
    with pytest.raises(IndexUnreadableError, match="is an index folder; hint: pass the output folder of `dedup run`"):
        open_index(out / "index")
    meta_path = out / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(IndexUnreadableError, match=r"has format 1; this dedup .* reads formats 4, 5; hint: rebuild"):
        open_index(out)


def test_writers_exclude_readers(tmp_path: Path) -> None:
    d = tmp_path / "index"
    with index_lock(d, exclusive=False):  # no lock file yet: readers never create one
        assert not (d / ".lock").exists()
    with index_lock(d, exclusive=True):
        assert (d / ".lock").is_file()
        with pytest.raises(IndexBusyError, match="locked by another dedup process"):
            with index_lock(d, exclusive=False, blocking=False):
                pass
    with index_lock(d, exclusive=False), index_lock(d, exclusive=False, blocking=False):
        pass  # readers share
    with index_lock(d, exclusive=False):
        with pytest.raises(IndexBusyError):
            with index_lock(d, exclusive=True, blocking=False):
                pass


def test_cli_index_add(two_folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, b, _ = two_folders
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(a), "--out", str(out), "--model", "sscd_distilled", "-q"]).exit_code == 0
    result = runner.invoke(app, ["index", "add", str(b), "--index", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("added 1 shard (6 samples)\n")
    again = runner.invoke(app, ["index", "add", str(b), "--index", str(out), "-q"])
    assert again.exit_code == 0 and again.output.startswith(f"nothing new: the index already holds every shard of {b} (1)")
    missing = runner.invoke(app, ["index", "add", str(b), "--index", str(tmp_path / "nope"), "-q"])
    assert missing.exit_code == 2
    assert missing.output.startswith("Error: ") and "does not exist; hint: " in missing.output
