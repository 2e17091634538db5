"""``dedup apply`` and ``remove.parquet``: the kept samples written back in the input's own
format, read back with ``tarfile`` + the sidecar (and ``webdataset``), resumable after a kill,
the same bytes on every run, the input never touched."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data import PlantedDataset, encode_jpeg, make_i2d_dataset, make_image_folder, make_laion_parquet, natural_image
from typer.testing import CliRunner

from dedup import run
from dedup.apply import STATE_DIR, ApplyError, apply
from dedup.cli import app
from dedup.config import RunConfig
from dedup.errors import ConfigError, OutputError

FAST = RunConfig().with_overrides({"embed.model": "sscd_distilled", "embed.size": 224, "folder_batch": 4})
runner = CliRunner()


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) → sha256, plus its mode and mtime."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {st.st_mode:o} {st.st_mtime_ns}"
    return out


def _bytes(folder: Path) -> dict[str, bytes]:
    """The files apply writes (its state folder aside) → their bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and STATE_DIR not in p.parts
    }


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _kept(out: Path, *, failed: bool = False) -> dict[str, list[str]]:
    """shard → the keys apply must write, in manifest order."""
    kept: dict[str, list[str]] = {}
    for r in _manifest(out):
        if r["keep"] or (failed and r["status"] == "failed"):
            kept.setdefault(r["shard"], []).append(r["key"])
    return kept


def _tar_groups(path: Path) -> list[tuple[str, list[tuple[str, bytes, float]]]]:
    """The tar's members grouped by key, in order: (key, [(name, bytes, mtime)])."""
    groups: list[tuple[str, list[tuple[str, bytes, float]]]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key = m.name.split(".", 1)[0]
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if not groups or groups[-1][0] != key:
                groups.append((key, []))
            groups[-1][1].append((m.name, data, m.mtime))
    return groups


# --------------------------------------------------------------------------------------------
# A hand-built webdataset (fast): three samples with .jpg/.txt/.json, one a byte copy
# --------------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname = len(data), mtime, 0o640, "someone"
    tar.addfile(info, io.BytesIO(data))


def _webdataset(root: Path) -> Path:
    """``root/shards/00000.tar`` + sidecar + stats, 00001 likewise: 8 samples, two byte copies
    across the shards, one failed download (sidecar only) and one corrupt image."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    images = [encode_jpeg(natural_image(i, (96, 72))) for i in range(6)]
    layout = {
        "00000": [("000000000", images[0]), ("000000001", images[1]), ("000000002", images[0]), ("000000003", b"not a jpeg")],
        "00001": [("000010000", images[2]), ("000010001", images[1]), ("000010002", images[3])],
    }
    for n, (shard, samples) in enumerate(layout.items()):
        rows = []
        with tarfile.open(shards / f"{shard}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for i, (key, data) in enumerate(samples):
                mtime = 1_700_000_000 + 10 * n + i
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success", "caption": f"caption {key}"}
                _add(tar, f"{key}.jpg", data, mtime)
                _add(tar, f"{key}.txt", f"caption {key}".encode(), mtime)
                _add(tar, f"{key}.json", json.dumps(meta).encode(), mtime)
                rows.append({**meta, "error_message": None, "width": 96, "height": 72})
        if shard == "00001":
            rows.insert(1, {"url": "http://example.com/gone.jpg", "key": "000010009", "status": "failed_to_download",
                            "caption": "gone", "error_message": "404", "width": None, "height": None})  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), shards / f"{shard}.parquet")
        stats = {"count": len(rows), "successes": len(samples), "failed_to_download": len(rows) - len(samples),
                 "failed_to_resize": 0, "duration": 1.5, "status_dict": {}}  # fmt: skip
        (shards / f"{shard}_stats.json").write_text(json.dumps(stats))
    return shards


@pytest.fixture(scope="module")
def wds_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wds")
    shards = _webdataset(root)
    run([str(shards)], root / "out", config=FAST)
    return shards, root / "out"


def test_remove_list_lists_the_dropped_duplicates(wds_run: tuple[Path, Path]) -> None:
    shards, out = wds_run
    manifest = _manifest(out)
    removed = pq.read_table(out / "remove.parquet")
    assert removed.column_names == [
        "sample_id", "source", "shard", "key", "url", "sha256", "cluster_id", "reason", "duplicate_of", "signal", "similarity"
    ]  # fmt: skip
    dropped = [r for r in manifest if r["status"] == "ok" and not r["keep"]]
    assert [r["sample_id"] for r in removed.to_pylist()] == [r["sample_id"] for r in dropped]
    assert {r["key"] for r in removed.to_pylist()} == {"000000002", "000010001"}  # the two byte copies
    for row in removed.to_pylist():
        with tarfile.open(shards / f"{row['shard'][:-4]}.tar") as tar:
            data = tar.extractfile(f"{row['key']}.jpg").read()  # type: ignore[union-attr]
        assert row["sha256"] == hashlib.sha256(data).digest()
        kept = next(r for r in manifest if r["sample_id"] == row["duplicate_of"])
        assert kept["keep"] and kept["cluster_id"] == row["cluster_id"]
        assert row["signal"] == "exact_bytes" and row["similarity"] == pytest.approx(1.0) and row["reason"] == "duplicate"


def test_apply_webdataset_reads_back_exactly_the_kept_samples(wds_run: tuple[Path, Path], tmp_path: Path) -> None:
    shards, out = wds_run
    before = _digest(shards)
    dest = tmp_path / "dest"
    result = apply(out, dest)
    assert _digest(shards) == before  # the input is only read
    kept = _kept(out)
    assert result.kept == sum(len(v) for v in kept.values()) == 4
    assert (result.dropped_duplicates, result.dropped_failed, result.written_shards) == (2, 2, 2)
    for shard in ("00000", "00001"):
        want = kept[f"{shard}.tar"]
        groups = _tar_groups(dest / f"{shard}.tar")
        assert [k for k, _ in groups] == want  # the kept samples, in their original order
        original = dict(_tar_groups(shards / f"{shard}.tar"))
        for key, members in groups:
            assert members == original[key]  # every extension, same bytes, same mtimes
        with tarfile.open(dest / f"{shard}.tar") as tar:
            assert {(m.mode, m.uname) for m in tar.getmembers()} == {(0o640, "someone")}
        sidecar = pq.read_table(dest / f"{shard}.parquet")
        assert sidecar.schema == pq.read_schema(shards / f"{shard}.parquet")
        assert sidecar.column("key").to_pylist() == want
        stats = json.loads((dest / f"{shard}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(want) and stats["duration"] == 1.5
        assert stats["dedup_apply"]["written"] == len(want)
    # what `dedup run` reads it as: the kept samples, no duplicate left
    again = run([str(dest)], tmp_path / "again", config=FAST)
    assert (again.samples, again.dropped, again.failed) == (4, 0, 0)


# webdataset leaves its tar files to the garbage collector.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_apply_with_webdataset_package(wds_run: tuple[Path, Path], tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    _, out = wds_run
    dest = tmp_path / "dest"
    apply(out, dest)
    urls = [str(dest / "00000.tar"), str(dest / "00001.tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    kept = _kept(out)
    assert [s["__key__"] for s in samples] == kept["00000.tar"] + kept["00001.tar"]
    for s in samples:
        assert {"jpg", "txt", "json"} <= set(s) and s["txt"].decode() == f"caption {s['__key__']}"
    del samples
    gc.collect()  # its unclosed files warn here, under this test's filter


def test_keep_failed_writes_what_the_input_holds(wds_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = wds_run
    dest = tmp_path / "dest"
    result = apply(out, dest, keep_failed=True)
    assert result.dropped_failed == 0
    assert [k for k, _ in _tar_groups(dest / "00000.tar")] == ["000000000", "000000001", "000000003"]  # the corrupt one
    sidecar = pq.read_table(dest / "00001.parquet").column("key").to_pylist()
    assert sidecar == ["000010000", "000010009", "000010002"]  # the failed download's row, in place
    stats = json.loads((dest / "00001_stats.json").read_text())
    assert stats["count"] == 3 and stats["successes"] == 2 and stats["failed_to_download"] == 1


def test_rerun_skips_and_gives_the_same_bytes(wds_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = wds_run
    apply(out, tmp_path / "a")
    first = _bytes(tmp_path / "a")
    again = apply(out, tmp_path / "a")
    assert (again.written_shards, again.skipped_shards) == (0, 2)
    assert _bytes(tmp_path / "a") == first
    (tmp_path / "a" / "00001.tar").unlink()  # deleted by hand: its marker no longer counts
    assert apply(out, tmp_path / "a").written_shards == 1
    assert _bytes(tmp_path / "a") == first
    apply(out, tmp_path / "b")
    assert _bytes(tmp_path / "b") == first
    # other options: the markers no longer match, every shard is written again
    changed = apply(out, tmp_path / "a", keep_failed=True)
    assert changed.written_shards == 2 and _bytes(tmp_path / "a") != first


_KILLER = """
import os, signal, sys
import dedup.apply as apply_module
from dedup.apply import apply

where = sys.argv[3]
if where == "marker":  # killed right after the first shard's marker
    original = apply_module.atomic_write_text
    def write(path, text):
        original(path, text)
        if path.parent.name == "done":
            os.kill(os.getpid(), signal.SIGKILL)
    apply_module.atomic_write_text = write
else:  # killed half-way through the second shard's tar, its temp file left behind
    seen = []
    original = apply_module.tarfile.TarFile.addfile
    def addfile(self, info, fileobj=None):
        original(self, info, fileobj)
        seen.append(info.name)
        if len(seen) == 8:
            self.fileobj.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    apply_module.tarfile.TarFile.addfile = addfile
apply(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("where", ["marker", "mid-shard"])
def test_killed_apply_resumes_to_the_same_bytes(wds_run: tuple[Path, Path], tmp_path: Path, where: str) -> None:
    _, out = wds_run
    apply(out, tmp_path / "clean")
    dest = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(out), str(dest), where], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    done = list((dest / STATE_DIR / "done").iterdir())
    assert len(done) == 1  # the first shard finished, the second did not
    if where == "mid-shard":
        assert any(p.name.endswith(".tmp") for p in dest.iterdir())  # its half-written tar
    result = apply(out, dest)
    assert (result.skipped_shards, result.written_shards) == (1, 1)
    assert _bytes(dest) == _bytes(tmp_path / "clean")
    assert not [p for p in dest.rglob("*.tmp")]


def test_cli_apply(wds_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = wds_run
    result = runner.invoke(app, ["apply", str(out), "--to", str(tmp_path / "dest"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "4 of 8 samples written · 2 duplicates left out · failed samples left out (2) · 2 shards" in result.output
    result = runner.invoke(app, ["apply", str(out), "--to", str(tmp_path / "dest"), "--quiet"])
    assert result.exit_code == 0 and "(2 already done)" in result.output


def test_apply_refuses_to_write_into_the_input(wds_run: tuple[Path, Path], tmp_path: Path) -> None:
    shards, out = wds_run
    for dest in (shards, shards / "sub", shards.parent):
        with pytest.raises(ConfigError, match="overlaps the input"):
            apply(out, dest)
    with pytest.raises(ConfigError, match="output folder"):
        apply(out, out)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    result = runner.invoke(app, ["apply", str(out), "--to", str(tmp_path / "busy")])
    assert result.exit_code == 2
    assert "Error: --to" in result.output and "not written by dedup apply" in result.output
    result = runner.invoke(app, ["apply", str(tmp_path / "nothing"), "--to", str(tmp_path / "d")])
    assert result.exit_code == 2 and "holds no finished run" in result.output


def test_apply_refuses_a_changed_input(tmp_path: Path) -> None:
    shards = _webdataset(tmp_path)
    run([str(shards)], tmp_path / "out", config=FAST)
    with tarfile.open(shards / "00001.tar", "a") as tar:
        _add(tar, "000010099.jpg", b"new", 0)
    with pytest.raises(ApplyError, match="'00001.tar' .* changed since the run"):
        apply(tmp_path / "out", tmp_path / "dest")
    assert not (tmp_path / "dest" / "00000.tar").exists()  # checked before anything is written


# --------------------------------------------------------------------------------------------
# Plain image folders: copy or hard link, tree kept
# --------------------------------------------------------------------------------------------


def test_apply_folder_copy_and_link(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    src, _ = sample_images_dir
    root = tmp_path / "tree"
    shutil.copytree(src, root)
    out = tmp_path / "out"
    run([str(root)], out, config=FAST)
    kept = sorted(r["key"] for r in _manifest(out) if r["keep"])
    dropped = sorted(r["key"] for r in _manifest(out) if not r["keep"])
    assert dropped and "broken_00.jpg" in dropped
    # a fine-tuning folder's captions and tags beside the images: they follow their image
    sidecars = {}
    for rel in (kept[0], kept[-1], dropped[0], dropped[-1]):
        stem = rel.rpartition(".")[0]
        for ext in (".txt", ".caption"):
            (root / f"{stem}{ext}").write_text(f"caption of {rel}{ext}")
            sidecars[f"{stem}{ext}"] = rel
    (root / "notes.txt").write_text("not a sidecar: no image of that name")
    before = _digest(root)
    expected = sorted(kept + [side for side, image in sidecars.items() if image in kept])
    for mode in ("copy", "link"):
        dest = tmp_path / mode
        apply(out, dest, link=mode == "link")
        written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and STATE_DIR not in p.parts)
        assert written == expected  # the tree kept: originals/..., copies/...; removed images' captions left out
        for rel in expected:
            src, dst = root / rel, dest / rel
            assert dst.read_bytes() == src.read_bytes()
            assert os.path.samefile(src, dst) == (mode == "link")
            assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
    assert _digest(root) == before  # links share the inode: its mode and mtime are untouched too


def test_apply_folder_filters_hugging_face_metadata(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    """An ``imagefolder``'s metadata.jsonl (at the top, naming images in subfolders) and
    metadata.csv (in a subfolder, naming its own images) lose the removed images' rows and
    keep every other row as it was; ``datasets`` would otherwise fail on the missing files."""
    src, _ = sample_images_dir
    root = tmp_path / "tree"
    shutil.copytree(src, root)
    images = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    lines = [json.dumps({"file_name": rel, "text": f"a caption of {rel}"}) + "\n" for rel in images]
    lines.append(json.dumps({"file_name": "sounds/clip.wav", "text": "not an image of the run"}) + "\n")
    lines.append(json.dumps({"text": "a row naming no file"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(lines))
    copies = sorted(p.name for p in (root / "copies").glob("*.jpg"))
    (root / "copies" / "metadata.csv").write_text("file_name,text\n" + "".join(f'{n},"caption, of {n}"\n' for n in copies))
    out = tmp_path / "out"
    run([str(root)], out, config=FAST)
    kept = {r["key"] for r in _manifest(out) if r["keep"]}
    removed = set(images) - kept
    assert any(r.startswith("copies/") for r in removed) and any(r.startswith("copies/") for r in kept)

    apply(out, tmp_path / "dest")
    dest = tmp_path / "dest"
    want = [line for rel, line in zip(images, lines, strict=False) if rel in kept] + lines[len(images) :]
    assert (dest / "metadata.jsonl").read_text() == "".join(want)  # byte for byte, in order
    rows = (dest / "copies" / "metadata.csv").read_text().splitlines()
    assert rows == ["file_name,text"] + [f'{n},"caption, of {n}"' for n in copies if f"copies/{n}" in kept]
    assert not list(dest.glob("originals/metadata.*"))  # none in, none out

    # a rerun (everything skipped) writes the same files again
    apply(out, dest)
    assert (dest / "metadata.jsonl").read_text() == "".join(want)


def test_apply_two_sources_keeps_each_tree_under_its_prefix(tmp_path: Path) -> None:
    """A run over a folder and a webdataset: DEST/s0/... and DEST/s1/..., and the byte copy
    of a folder image in the tar (the later source) is left out."""
    folder = tmp_path / "photos"
    make_image_folder(folder, 3, copies=(1,), corrupt=0, seed=4)
    shards = _webdataset(tmp_path / "wds")
    (folder / "from_tar.jpg").write_bytes(encode_jpeg(natural_image(2, (96, 72))))  # = 00001.tar's 000010000
    out, dest = tmp_path / "out", tmp_path / "dest"
    run([str(folder), str(shards)], out, config=FAST)
    apply(out, dest)
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and STATE_DIR not in p.parts)
    kept = _kept(out)
    assert [k for k, _ in _tar_groups(dest / "s1" / "00001.tar")] == kept["s1/00001.tar"] == ["000010002"]
    folder_kept = sorted(f"s0/{k}" for shard, keys in kept.items() if shard.startswith("s0/") for k in keys)
    assert "s0/from_tar.jpg" in folder_kept
    assert [w for w in written if not w.startswith("s1/")] == folder_kept


def test_apply_laion_metadata_writes_the_kept_rows(tmp_path: Path) -> None:
    rows = [
        {"URL": "http://a.example/1.jpg", "TEXT": "sunset", "AESTHETIC_SCORE": 5.0},
        {"URL": "http://a.example/1.jpg/", "TEXT": "something else", "AESTHETIC_SCORE": 6.0},
        {"URL": "http://c.example/3.jpg", "TEXT": "a dog", "AESTHETIC_SCORE": 1.0},
    ]
    make_laion_parquet(tmp_path / "meta" / "part-0.parquet", rows)
    run([str(tmp_path / "meta")], tmp_path / "out", config=FAST)
    apply(tmp_path / "out", tmp_path / "dest")
    kept = pq.read_table(tmp_path / "dest" / "part-0.parquet")
    assert kept.schema == pq.read_schema(tmp_path / "meta" / "part-0.parquet")
    assert kept.column("URL").to_pylist() == ["http://a.example/1.jpg", "http://c.example/3.jpg"]
    assert not (tmp_path / "dest" / "part-0_stats.json").exists()  # no stats in, none out


def test_link_across_file_systems_is_a_clear_error(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at hand")
    run([str(root)], tmp_path / "out", config=FAST)
    dest = Path(shm / f"dedup-apply-{os.getpid()}")
    try:
        with pytest.raises(OutputError, match="--link needs --to on the input's file system"):
            apply(tmp_path / "out", dest, link=True)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Real img2dataset output, all three formats (slow: img2dataset over loopback HTTP)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_dedup_run_then_apply_on_img2dataset_webdataset(i2d_webdataset: PlantedDataset, tmp_path: Path) -> None:
    """The issue's "done when": `dedup run` + `dedup apply` over img2dataset webdataset shards,
    read back with tarfile + the sidecar and with webdataset: exactly the kept samples."""
    shards, truth = i2d_webdataset
    before = _digest(Path(shards))
    out, dest = tmp_path / "out", tmp_path / "dest"
    assert runner.invoke(app, ["run", str(shards), "--out", str(out), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["apply", str(out), "--to", str(dest), "--quiet"])
    assert result.exit_code == 0, result.output
    assert _digest(Path(shards)) == before
    kept = _kept(out)
    manifest = _manifest(out)
    assert sum(map(len, kept.values())) == sum(r["keep"] for r in manifest) > 0
    for shard in ("00000", "00001"):
        groups = _tar_groups(dest / f"{shard}.tar")
        assert [k for k, _ in groups] == kept[f"{shard}.tar"]
        original = dict(_tar_groups(Path(shards) / f"{shard}.tar"))
        for key, members in groups:
            assert members == original[key]
            assert {n.split(".", 1)[1] for n, _, _ in members} == {"jpg", "txt", "json"}
        sidecar = pq.read_table(dest / f"{shard}.parquet")
        assert sidecar.column("key").to_pylist() == kept[f"{shard}.tar"]
        assert set(sidecar.column("status").to_pylist()) == {"success"}
    wds = pytest.importorskip("webdataset")
    keys = [s["__key__"] for s in wds.WebDataset([str(dest / "00000.tar"), str(dest / "00001.tar")], shardshuffle=False)]
    gc.collect()  # webdataset's unclosed files warn here, under this test's filter
    assert keys == kept["00000.tar"] + kept["00001.tar"]
    # no planted copy survives: one sample per duplicate group among the kept
    by_key = {r["key"]: r["url"] for r in manifest}
    groups_kept = [truth[by_key[k]] for k in keys]
    assert len(groups_kept) == len(set(groups_kept))


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["parquet", "files"])
def test_apply_img2dataset_parquet_and_files(output_format: str, tmp_path: Path) -> None:
    shards, _ = make_i2d_dataset(tmp_path / "data", 12, copies=[2, 1] + [0] * 10, output_format=output_format,  # type: ignore[arg-type]
                                 number_sample_per_shard=8, seed=3)  # fmt: skip
    before = _digest(Path(shards))
    out = tmp_path / "out"
    run([str(shards)], out, config=FAST)
    for keep_failed in (False, True):
        dest = tmp_path / f"dest-{keep_failed}"
        apply(out, dest, keep_failed=keep_failed, link=output_format == "files")
        kept = _kept(out, failed=keep_failed)
        assert kept
        for shard, keys in kept.items():
            name = shard.removesuffix(".parquet")
            rows = pq.read_table(dest / f"{name}.parquet")
            original = pq.read_table(Path(shards) / f"{name}.parquet")
            assert rows.schema == original.schema
            if output_format == "parquet":
                assert rows.column("key").to_pylist() == keys
                index = original.column("key").to_pylist()
                for row in rows.to_pylist():  # the images, in their column, as they were
                    assert row == original.slice(index.index(row["key"]), 1).to_pylist()[0]
            else:
                present = sorted({p.name.split(".", 1)[0] for p in (dest / name).iterdir()})
                ok_keys = [r["key"] for r in _manifest(out) if r["shard"] == shard and r["keep"]]
                assert present == sorted(ok_keys)
                for p in (dest / name).iterdir():
                    assert p.read_bytes() == (Path(shards) / name / p.name).read_bytes()
                assert {p.name.split(".", 1)[1] for p in (dest / name).iterdir()} == {"jpg", "txt", "json"}
                assert rows.column("key").to_pylist() == [k for k in original.column("key").to_pylist() if k in keys]
            stats = json.loads((dest / f"{name}_stats.json").read_text())
            assert stats["count"] == rows.num_rows
    assert _digest(Path(shards)) == before
    assert run([str(tmp_path / "dest-False")], tmp_path / "again", config=FAST).dropped == 0


# --------------------------------------------------------------------------------------------
# Hugging Face datasets: save_to_disk folders and to_parquet exports, with the real package
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    """A DatasetDict saved with save_to_disk: train (7 rows in 2 Arrow files; row 5 a byte
    copy of row 1) and test (2 rows; row 1 a byte copy of train row 3)."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    images = [encode_jpeg(natural_image(100 + i, (96, 72))) for i in range(8)]
    train_images = [images[0], images[1], images[2], images[3], images[4], images[1], images[5]]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "score": datasets.Value("float32")})

    def split(imgs: list[bytes], tag: str) -> object:
        rows = {
            "image": [{"bytes": b, "path": f"{tag}{i}.jpg"} for i, b in enumerate(imgs)],
            "text": [f"{tag} caption {i}" for i in range(len(imgs))],
            "score": [float(i) for i in range(len(imgs))],
        }
        return datasets.Dataset.from_dict(rows, features=features)

    train, test = split(train_images, "train"), split([images[6], images[3]], "test")
    train.save_to_disk(str(root / "dict" / "train"), num_shards=2)
    test.save_to_disk(str(root / "dict" / "test"))
    (root / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    train.to_parquet(str(root / "export" / "train.parquet"))
    return root, train_images


def test_hf_save_to_disk_is_read_with_pyarrow(hf_saved: tuple[Path, list[bytes]]) -> None:
    from dedup.sources import discover, read_shard

    root, train_images = hf_saved
    shards = discover([str(root / "dict")])
    assert [(s.shard_id, s.kind.value, s.members) for s in shards] == [
        ("test", "hf-dataset", ("data-00000-of-00001.arrow",)),
        ("train", "hf-dataset", ("data-00000-of-00002.arrow", "data-00001-of-00002.arrow")),
    ]
    samples = list(read_shard(shards[1]))
    assert [s.sample_id for s in samples] == [f"train/{i:09d}" for i in range(7)]  # row numbers over both files
    assert [s.data for s in samples] == train_images
    assert samples[2].caption == "train caption 2" and samples[2].extra == {"score": 2.0}
    exported = discover([str(root / "export")])
    assert [s.kind.value for s in exported] == ["img2dataset-parquet"]
    assert [s.data for s in read_shard(exported[0])] == train_images


def test_hf_run_apply_and_filter_with_the_removal_list(hf_saved: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    root, _ = hf_saved
    before = _digest(root)
    out = tmp_path / "out"
    run([str(root / "dict")], out, config=FAST)
    removed_rows = pq.read_table(out / "remove.parquet").to_pylist()
    assert {(r["shard"], r["key"]) for r in removed_rows} == {("train", "000000005"), ("train", "000000003")}
    dest = tmp_path / "dest"
    apply(out, dest)
    assert _digest(root) == before
    loaded = datasets.load_from_disk(str(dest))
    assert loaded["train"]["text"] == [f"train caption {i}" for i in (0, 1, 2, 4, 6)]
    assert loaded["test"]["text"] == ["test caption 0", "test caption 1"]
    assert loaded["train"].features == datasets.load_from_disk(str(root / "dict"))["train"].features
    # The README's recipe: the same rows, from the original dataset and remove.parquet alone.
    original = datasets.load_from_disk(str(root / "dict"))
    removed = pq.read_table(out / "remove.parquet", columns=["shard", "key"]).to_pylist()
    drop = {split: {int(r["key"]) for r in removed if r["shard"] == split} for split in original}
    filtered = {
        split: ds.filter(lambda _, i, s=split: i not in drop[s], with_indices=True) for split, ds in original.items()
    }
    for split in original:
        assert filtered[split]["text"] == loaded[split]["text"]
        assert [im.tobytes() for im in filtered[split]["image"]] == [im.tobytes() for im in loaded[split]["image"]]


def test_hf_parquet_export_applied_stays_a_datasets_parquet(hf_saved: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    root, train_images = hf_saved
    out, dest = tmp_path / "out", tmp_path / "dest"
    run([str(root / "export")], out, config=FAST)
    apply(out, dest)
    assert pq.read_schema(dest / "train.parquet") == pq.read_schema(root / "export" / "train.parquet")  # features too
    ds = datasets.Dataset.from_parquet(str(dest / "train.parquet"), cache_dir=str(tmp_path / "cache"))
    assert ds["text"] == [f"train caption {i}" for i in (0, 1, 2, 3, 4, 6)]  # row 5 copies row 1
    assert ds.features["image"] == datasets.Image()
