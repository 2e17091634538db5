"""Tests for dedup.sources: discovery of every input kind and readers that never drop a sample.

Fixtures are built by hand in ``tmp_path`` (tarfile, pyarrow, PIL) in the exact layout
img2dataset 1.47 writes; one test drives img2dataset's own writer classes to make sure.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup._types import Sample, Shard, ShardKind
from dedup.errors import ConfigError, MissingDependencyError, SourceError
from dedup.sources import discover, read_samples, read_shard

# --------------------------------------------------------------------------------------------
# fixture builders


def _image(color: tuple[int, int, int], fmt: str = "JPEG", size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _meta(key: str, **extra: Any) -> dict[str, Any]:
    """A successful sample's metadata, as img2dataset writes it into ``key.json`` and the sidecar."""
    meta: dict[str, Any] = {
        "url": f"http://example.com/{key}.jpg",
        "caption": f"caption {key}",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 16,
        "height": 12,
        "original_width": 160,
        "original_height": 120,
        "sha256": "ab" * 32,
    }
    meta.update(extra)
    return meta


def _failed(key: str, error: str, status: str = "failed_to_download") -> dict[str, Any]:
    return _meta(
        key,
        status=status,
        error_message=error,
        width=None,
        height=None,
        original_width=None,
        original_height=None,
        sha256=None,
    )


_SIDECAR_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("similarity", pa.float64()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
    ]
)


def _write_sidecar(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    rows = [{"similarity": 0.3, **row} for row in rows]
    pq.write_table(pa.Table.from_pylist(list(rows), schema=_SIDECAR_SCHEMA), path)


def _tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample_members(key: str, color: tuple[int, int, int], **extra: Any) -> list[tuple[str, bytes]]:
    meta = _meta(key, **extra)
    return [
        (f"{key}.jpg", _image(color)),
        (f"{key}.txt", meta["caption"].encode()),
        (f"{key}.json", json.dumps(meta, indent=4).encode()),
    ]


def _webdataset(folder: Path, *, sidecar: bool = True) -> Path:
    """``00000.tar`` with samples 0 and 2 (written out of key order, as img2dataset does), and a
    sidecar listing 0..3 where 1 failed to download and 3 failed to resize."""
    folder.mkdir(parents=True, exist_ok=True)
    members = _sample_members("000000002", (0, 0, 255)) + _sample_members("000000000", (255, 0, 0))
    (folder / "00000.tar").write_bytes(_tar_bytes(members))
    if sidecar:
        _write_sidecar(
            folder / "00000.parquet",
            [
                _meta("000000000"),
                _failed("000000001", "Connection timed out\nafter 10s"),
                _meta("000000002"),
                _failed("000000003", "image too small", status="failed_to_resize"),
            ],
        )
    (folder / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 2}))
    return folder


def _read_all(sources: Sequence[str] | str, **kwargs: Any) -> list[Sample]:
    return [sample for shard in discover(sources, **kwargs) for sample in read_shard(shard)]


def _by_id(samples: Sequence[Sample]) -> dict[str, Sample]:
    by_id = {s.sample_id: s for s in samples}
    assert len(by_id) == len(samples), "sample ids must be unique"
    return by_id


# --------------------------------------------------------------------------------------------
# webdataset


def test_webdataset_with_sidecar_yields_every_sample(tmp_path: Path) -> None:
    folder = _webdataset(tmp_path / "out")
    shards = discover([str(folder)])
    assert [(s.shard_id, s.kind) for s in shards] == [("00000.tar", ShardKind.WEBDATASET)]
    assert shards[0].path == str(folder / "00000.tar")

    samples = list(read_shard(shards[0]))
    # Tar order first (a property of the file), then sidecar-only samples by key.
    assert [s.sample_id for s in samples] == [
        "00000.tar/000000002",
        "00000.tar/000000000",
        "00000.tar/000000001",
        "00000.tar/000000003",
    ]
    ok = samples[1]
    assert ok.key == "000000000"
    assert ok.status == "ok" and ok.error is None
    assert ok.data is not None
    pixel = Image.open(io.BytesIO(ok.data)).convert("RGB").getpixel((0, 0))
    assert isinstance(pixel, tuple) and pixel[0] > 200
    assert ok.url == "http://example.com/000000000.jpg"
    assert ok.caption == "caption 000000000"
    assert (ok.width, ok.height) == (16, 12)
    assert ok.extra == {"original_width": 160, "original_height": 120, "sha256": "ab" * 32, "similarity": 0.3}
    json.dumps(ok.extra)

    download, resize = samples[2], samples[3]
    assert download.status == "failed" and download.data is None
    assert download.error == "download failed: Connection timed out after 10s"
    assert download.url == "http://example.com/000000001.jpg"
    assert download.caption == "caption 000000001"
    assert resize.error == "resize failed: image too small"


def test_webdataset_output_is_deterministic(tmp_path: Path) -> None:
    folder = _webdataset(tmp_path / "out")
    assert _read_all(str(folder)) == _read_all(str(folder))
    assert discover([str(folder)]) == discover([str(folder)])


def test_webdataset_member_without_json_and_bad_caption(tmp_path: Path) -> None:
    members = [
        ("000000000.jpg", _image((1, 2, 3))),
        ("000000000.txt", b"caf\xe9 \xff au lait"),  # latin-1, not UTF-8
        ("000000001.png", _image((9, 9, 9), "PNG")),
    ]
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(members))
    samples = _by_id(_read_all(str(tmp_path)))
    first = samples["00000.tar/000000000"]
    assert first.status == "ok" and first.url is None and first.extra == {}
    assert first.caption is not None and first.caption.startswith("caf\ufffd")
    second = samples["00000.tar/000000001"]
    assert second.status == "ok" and second.caption is None
    assert second.data is not None and second.data.startswith(b"\x89PNG")


def test_webdataset_malformed_json_keeps_the_sample(tmp_path: Path) -> None:
    members = [
        ("000000000.jpg", _image((1, 2, 3))),
        ("000000000.json", b'{"url": "http://x", "width": 1'),
        ("000000001.jpg", _image((1, 2, 3))),
        ("000000001.json", b"[1, 2]"),
        ("000000002.jpg", _image((1, 2, 3))),
        ("000000002.json", b"\xff\xfe\x00garbage"),
    ]
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(members))
    samples = _read_all(str(tmp_path))
    assert len(samples) == 3
    for sample in samples:
        assert sample.status == "ok" and sample.data is not None
        assert sample.url is None and sample.extra == {}


def test_webdataset_malformed_json_falls_back_to_sidecar(tmp_path: Path) -> None:
    members = [("000000000.jpg", _image((1, 2, 3))), ("000000000.json", b"not json")]
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(members))
    _write_sidecar(tmp_path / "00000.parquet", [_meta("000000000")])
    (sample,) = _read_all(str(tmp_path))
    assert sample.status == "ok"
    assert sample.url == "http://example.com/000000000.jpg"
    assert sample.extra["original_width"] == 160


def test_webdataset_member_without_image_is_a_failed_sample(tmp_path: Path) -> None:
    members = [("000000000.txt", b"only text"), ("000000000.json", b"{}")]
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(members))
    (sample,) = _read_all(str(tmp_path))
    assert sample.status == "failed" and sample.error == "no image member in tar"
    assert sample.caption == "only text"


def test_webdataset_names_are_only_names(tmp_path: Path) -> None:
    members = [
        ("./000000000.jpg", _image((1, 1, 1))),
        ("../../evil.jpg", _image((2, 2, 2))),
        ("/abs/000000001.jpg", _image((3, 3, 3))),
    ]
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(members))
    ids = sorted(s.sample_id for s in _read_all(str(tmp_path)))
    assert ids == ["00000.tar/../../evil", "00000.tar//abs/000000001", "00000.tar/000000000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]  # nothing extracted


def _truncated_tar(folder: Path, cut: str) -> list[str]:
    """Write a 3-sample tar cut short; return the keys whose image survives."""
    folder.mkdir(parents=True, exist_ok=True)
    members: list[tuple[str, bytes]] = []
    for i in range(3):
        members += _sample_members(f"00000000{i}", (i * 80, 0, 0))
    raw = _tar_bytes(members)
    # Offsets of each member's header, to cut at a chosen place.
    offsets = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar.getmembers():
            offsets.append((member.name, member.offset, member.offset_data))
    header = {name: off for name, off, _ in offsets}
    data = {name: off for name, _, off in offsets}
    if cut == "mid-data":  # inside the second image
        raw = raw[: data["000000001.jpg"] + 100]
    elif cut == "mid-header":  # inside the second sample's json header
        raw = raw[: header["000000001.json"] + 100]
    elif cut == "boundary":  # right before the third sample: no end-of-archive marker
        raw = raw[: header["000000002.jpg"]]
    elif cut == "garbage":  # a corrupt header block in the middle
        at = header["000000002.jpg"]
        raw = raw[:at] + b"\x17" * 512 + raw[at + 512 :]
    elif cut == "zeroed":  # a zeroed header block: tarfile takes it for the end of the archive
        at = header["000000002.jpg"]
        raw = raw[:at] + bytes(512) + raw[at + 512 :]
    (folder / "00000.tar").write_bytes(raw)
    return ["000000000"] if cut == "mid-data" else ["000000000", "000000001"]


@pytest.mark.parametrize("cut", ["mid-data", "mid-header", "boundary", "garbage", "zeroed"])
def test_truncated_tar_with_sidecar_marks_missing_samples(tmp_path: Path, cut: str) -> None:
    survivors = _truncated_tar(tmp_path, cut)
    _write_sidecar(
        tmp_path / "00000.parquet",
        [_meta("000000000"), _meta("000000001"), _meta("000000002"), _failed("000000003", "404")],
    )
    samples = _by_id(_read_all(str(tmp_path)))
    assert len(samples) == 4  # one per sample the sidecar lists, nothing made up
    for i in range(3):
        sample = samples[f"00000.tar/00000000{i}"]
        if f"00000000{i}" in survivors:
            assert sample.status == "ok" and sample.data is not None
        else:
            assert sample.status == "failed" and sample.data is None
            assert sample.error == "missing from tar (shard truncated?)"
            assert sample.url == f"http://example.com/00000000{i}.jpg"
    assert samples["00000.tar/000000003"].error == "download failed: 404"


@pytest.mark.parametrize("cut", ["mid-data", "mid-header", "boundary", "garbage", "zeroed"])
def test_truncated_tar_without_sidecar_reports_the_damage(tmp_path: Path, cut: str) -> None:
    survivors = _truncated_tar(tmp_path, cut)
    samples = _read_all(str(tmp_path))
    ok = [s.key for s in samples if s.status == "ok"]
    assert ok == survivors
    damaged = samples[-1]
    assert damaged.sample_id == "00000.tar/<damaged>"
    assert damaged.status == "failed"
    assert damaged.error is not None and damaged.error.startswith("tar damaged: ")


def test_intact_tar_has_no_damage_row(tmp_path: Path) -> None:
    _truncated_tar(tmp_path, "none")
    samples = _read_all(str(tmp_path))
    assert [s.status for s in samples] == ["ok", "ok", "ok"]


def test_sidecar_lists_a_sample_the_intact_tar_lacks(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(_sample_members("000000000", (1, 1, 1))))
    _write_sidecar(tmp_path / "00000.parquet", [_meta("000000000"), _meta("000000001")])
    samples = _by_id(_read_all(str(tmp_path)))
    assert samples["00000.tar/000000001"].error == "missing from tar"


def test_not_a_tar_at_all(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar file" * 40)
    (sample,) = _read_all(str(tmp_path))
    assert sample.sample_id == "00000.tar/<damaged>" and sample.status == "failed"


def test_unreadable_sidecar_is_reported_and_the_tar_still_read(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(_sample_members("000000000", (1, 1, 1))))
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 garbage")
    samples = _by_id(_read_all(str(tmp_path)))
    assert samples["00000.tar/<sidecar>"].status == "failed"
    assert samples["00000.tar/000000000"].status == "ok"


def test_gzipped_single_tar_file_source(tmp_path: Path) -> None:
    raw = _tar_bytes(_sample_members("000000000", (1, 1, 1)))
    (tmp_path / "00007.tar").write_bytes(gzip.compress(raw))  # "r|*" sniffs the compression
    (shard,) = discover([str(tmp_path / "00007.tar")])
    assert shard.shard_id == "00007.tar" and shard.kind == ShardKind.WEBDATASET
    (sample,) = read_shard(shard)
    assert sample.sample_id == "00007.tar/000000000" and sample.status == "ok"


# --------------------------------------------------------------------------------------------
# img2dataset parquet and files output


def test_img2dataset_parquet_output(tmp_path: Path) -> None:
    schema = _SIDECAR_SCHEMA.append(pa.field("jpg", pa.binary()))
    rows = [
        {**_meta("000000000"), "similarity": 0.5, "jpg": _image((1, 1, 1))},
        {**_failed("000000001", "404 Not Found"), "similarity": 0.5, "jpg": None},
        {**_meta("000000002"), "similarity": 0.5, "jpg": None},  # claims success, has no bytes
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "00000.parquet", row_group_size=2)
    (tmp_path / "00000_stats.json").write_text("{}")
    (shard,) = discover([str(tmp_path)])
    assert (shard.kind, shard.shard_id) == (ShardKind.I2D_PARQUET, "00000.parquet")
    samples = list(read_shard(shard))
    assert [s.sample_id for s in samples] == [
        "00000.parquet/000000000",
        "00000.parquet/000000001",
        "00000.parquet/000000002",
    ]
    assert samples[0].status == "ok" and samples[0].data is not None
    assert samples[0].extra == {"similarity": 0.5, "original_width": 160, "original_height": 120, "sha256": "ab" * 32}
    assert (samples[1].status, samples[1].error) == ("failed", "download failed: 404 Not Found")
    assert (samples[2].status, samples[2].error) == ("failed", "no image bytes in parquet")


def test_img2dataset_parquet_without_stats_is_detected_by_schema(tmp_path: Path) -> None:
    table = pa.table({"key": ["a", "b"], "png": [_image((1, 1, 1), "PNG"), None], "url": ["u1", "u2"]})
    pq.write_table(table, tmp_path / "images.parquet")
    (shard,) = discover([str(tmp_path)])
    assert shard.kind == ShardKind.I2D_PARQUET
    samples = list(read_shard(shard))
    assert [(s.key, s.status) for s in samples] == [("a", "ok"), ("b", "failed")]


def test_img2dataset_files_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard_dir = out / "00000"
    shard_dir.mkdir(parents=True)
    for key, color in (("000000000", (255, 0, 0)), ("000000002", (0, 255, 0))):
        for name, data in _sample_members(key, color):
            (shard_dir / name).write_bytes(data)
    (shard_dir / "000000004.jpg").write_bytes(_image((0, 0, 9)))  # no .txt, no .json, not listed
    _write_sidecar(
        out / "00000.parquet",
        [
            _meta("000000000"),
            _failed("000000001", "timeout"),
            _meta("000000002"),
            _meta("000000003"),  # listed as downloaded, file gone
        ],
    )
    (out / "00000_stats.json").write_text("{}")
    (shard,) = discover([str(out)])
    assert (shard.kind, shard.shard_id, shard.path) == (ShardKind.I2D_FILES, "00000", str(shard_dir))
    samples = list(read_shard(shard))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000000003", "000000004"]
    first = samples[0]
    assert first.sample_id == "00000/000000000" and first.status == "ok"
    assert first.url == "http://example.com/000000000.jpg" and first.caption == "caption 000000000"
    assert first.extra["sha256"] == "ab" * 32
    assert samples[1].error == "download failed: timeout"
    assert samples[2].status == "ok"
    assert samples[3].error == "missing from folder"
    assert samples[4].status == "ok" and samples[4].url is None


def test_files_output_without_sidecar_is_still_files(tmp_path: Path) -> None:
    shard_dir = tmp_path / "00003"
    shard_dir.mkdir()
    for name, data in _sample_members("000030000", (1, 1, 1)):
        (shard_dir / name).write_bytes(data)
    (shard,) = discover([str(tmp_path)])
    assert (shard.kind, shard.shard_id) == (ShardKind.I2D_FILES, "00003")


def test_real_img2dataset_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """img2dataset's own writer classes (no download): names, keys and sidecars as it makes them."""
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
    from img2dataset.writer import FilesSampleWriter, ParquetSampleWriter, WebDatasetSampleWriter

    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("similarity", pa.float64())]).append(
        pa.field("key", pa.string())
    )
    for name in ("status", "error_message"):
        schema = schema.append(pa.field(name, pa.string()))
    for name in ("width", "height", "original_width", "original_height"):
        schema = schema.append(pa.field(name, pa.int32()))
    schema = schema.append(pa.field("sha256", pa.string()))

    writers = {"webdataset": WebDatasetSampleWriter, "parquet": ParquetSampleWriter, "files": FilesSampleWriter}
    for fmt, writer_class in writers.items():
        folder = tmp_path / fmt
        folder.mkdir()
        writer = writer_class(0, str(folder), True, 5, schema, "jpg")
        for i in range(3):
            key = f"{i:09d}"
            meta = _meta(key, similarity=0.25)
            if i == 1:
                meta = {**_failed(key, "boom"), "similarity": 0.25}
                writer.write(None, key, meta["caption"], meta)
            else:
                writer.write(_image((i, i, i)), key, meta["caption"], meta)
        writer.close()
        (folder / "00000_stats.json").write_text("{}")

    for fmt, kind, shard_id in (
        ("webdataset", ShardKind.WEBDATASET, "00000.tar"),
        ("parquet", ShardKind.I2D_PARQUET, "00000.parquet"),
        ("files", ShardKind.I2D_FILES, "00000"),
    ):
        (shard,) = discover([str(tmp_path / fmt)])
        assert (shard.kind, shard.shard_id) == (kind, shard_id), fmt
        samples = sorted(read_shard(shard), key=lambda s: s.key)
        got = [(s.sample_id, s.status, s.error) for s in samples]
        assert got == [
            (f"{shard_id}/000000000", "ok", None),
            (f"{shard_id}/000000001", "failed", "download failed: boom"),
            (f"{shard_id}/000000002", "ok", None),
        ], fmt
        for sample in samples:
            assert sample.url == f"http://example.com/{sample.key}.jpg", fmt
            assert sample.caption == f"caption {sample.key}", fmt
            assert sample.extra.get("similarity") == 0.25, fmt
            json.dumps(sample.extra)
        assert samples[0].data is not None and samples[0].data.startswith(b"\xff\xd8")
        assert (samples[0].width, samples[0].height) == (16, 12)


# --------------------------------------------------------------------------------------------
# plain folders


def _photo_folder(root: Path) -> Path:
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.jpg").write_bytes(_image((1, 0, 0)))
    (root / "b" / "c.PNG").write_bytes(_image((0, 1, 0), "PNG"))
    (root / "b" / "deep" / "d.webp").write_bytes(_image((0, 0, 1), "WEBP"))
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "meta.json").write_text("{}")
    (root / ".hidden.jpg").write_bytes(_image((9, 9, 9)))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(_image((9, 9, 9)))
    return root


def test_plain_folder_batches_sorted_relative_paths(tmp_path: Path) -> None:
    root = _photo_folder(tmp_path / "photos")
    shards = discover([str(root)], folder_batch=3)
    assert [(s.kind, s.shard_id, s.members) for s in shards] == [
        (ShardKind.FOLDER, "part-00000", ("a.jpg", "b/c.PNG", "b/corrupt.jpg")),
        (ShardKind.FOLDER, "part-00001", ("b/deep/d.webp",)),
    ]
    assert all(s.path == str(root) for s in shards)
    samples = [sample for shard in shards for sample in read_shard(shard)]
    assert [s.sample_id for s in samples] == ["a.jpg", "b/c.PNG", "b/corrupt.jpg", "b/deep/d.webp"]
    assert all(s.status == "ok" and s.url is None and s.caption is None for s in samples)
    corrupt = samples[2]
    assert corrupt.key == "b/corrupt.jpg"
    assert corrupt.data == b"\xff\xd8 this is not really a jpeg"


def test_folder_stamp_changes_when_a_member_changes(tmp_path: Path) -> None:
    root = _photo_folder(tmp_path / "photos")
    before = discover([str(root)], folder_batch=3)
    target = root / "b" / "corrupt.jpg"
    target.write_bytes(_image((5, 5, 5)))
    os.utime(target, (1_600_000_000, 1_600_000_000))
    after = discover([str(root)], folder_batch=3)
    assert before[0].stamp != after[0].stamp
    assert before[1].stamp == after[1].stamp


def test_folder_member_deleted_after_discovery_is_a_failed_sample(tmp_path: Path) -> None:
    root = _photo_folder(tmp_path / "photos")
    (shard,) = discover([str(root)])
    (root / "a.jpg").unlink()
    samples = list(read_shard(shard))
    assert len(samples) == 4
    assert (samples[0].sample_id, samples[0].status) == ("a.jpg", "failed")
    assert samples[0].error == "unreadable file: No such file or directory"


def test_folder_captions_beside_images_are_read(tmp_path: Path) -> None:
    # Fine-tuning folders keep each image's caption beside it (cat.jpg + cat.txt, or .caption):
    # the caption is the sample's. The stamp stays the images': adding or editing a caption
    # does not recompute the batch's pixels and embeddings (nor make apply refuse the run).
    root = _photo_folder(tmp_path / "photos")
    plain = discover([str(root)], folder_batch=3)
    assert all(s.captions == () for s in plain)
    (root / "a.txt").write_text("a red cat on a sofa\n")
    (root / "b" / "c.caption").write_bytes(b"caf\xc3\xa9 \xff")  # a bad byte never costs the sample
    (root / "b" / "deep" / "d.txt").write_text("d")
    (root / "b" / "deep" / "d.caption").write_text("not this one: .txt comes first")
    (root / "lonely.txt").write_text("no image: not a sample")
    shards = discover([str(root)], folder_batch=3)
    assert [s.members for s in shards] == [s.members for s in plain]
    assert [s.captions for s in shards] == [("a.txt", "b/c.caption", ""), ("b/deep/d.txt",)]
    assert [s.stamp for s in shards] == [p.stamp for p in plain]
    captions = {s.sample_id: s.caption for shard in shards for s in read_shard(shard)}
    assert captions == {"a.jpg": "a red cat on a sofa", "b/c.PNG": "café \ufffd", "b/corrupt.jpg": None, "b/deep/d.webp": "d"}
    (root / "a.txt").write_text("a different caption")
    edited = discover([str(root)], folder_batch=3)
    # Reading a few images back keeps each one's caption; a caption gone since discovery
    # leaves the caption empty and says so in the sample's metadata.
    (root / "b" / "c.caption").unlink()
    back = {s.sample_id: s for s in read_samples(edited[0], {"b/c.PNG", "a.jpg"})}
    assert back["a.jpg"].caption == "a different caption"
    assert (back["b/c.PNG"].status, back["b/c.PNG"].caption) == ("ok", None)
    assert back["b/c.PNG"].extra["caption_error"].startswith("b/c.caption: unreadable file")


def test_hugging_face_imagefolder_metadata_captions(tmp_path: Path) -> None:
    # An imagefolder's metadata.jsonl / metadata.csv names each image by file_name relative to
    # its own folder; the nearest one above an image holds its caption (a caption file beside
    # the image comes first).
    root = _photo_folder(tmp_path / "photos")
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.jpg", "text": "a red cat"}) + "\n"
        + "not json\n"
        + json.dumps({"file_name": "./b/c.PNG", "text": "overridden below"}) + "\n"
        + json.dumps({"file_name": "b/deep/d.webp", "caption": "deep d"}) + "\n"
    )
    (root / "b" / "metadata.csv").write_text("file_name,text\nc.PNG,\"a c, from the csv\"\ncorrupt.jpg,\n")
    (root / "b" / "deep" / "d.txt").write_text("d beside")
    (shard,) = discover([str(root)])
    assert shard.captions == ("metadata.jsonl", "b/metadata.csv", "b/metadata.csv", "b/deep/d.txt")
    captions = {s.sample_id: s.caption for s in read_shard(shard)}
    assert captions == {"a.jpg": "a red cat", "b/c.PNG": "a c, from the csv", "b/corrupt.jpg": None, "b/deep/d.webp": "d beside"}
    (root / "b" / "deep" / "d.txt").unlink()
    (root / "b" / "metadata.csv").unlink()
    (again,) = discover([str(root)])
    assert {s.sample_id: s.caption for s in read_shard(again)}["b/deep/d.webp"] == "deep d"
    gone = {s.sample_id: s for s in read_shard(shard)}  # read after its metadata file went away
    assert gone["b/c.PNG"].caption is None and gone["b/c.PNG"].extra["caption_error"].startswith("b/metadata.csv: unreadable file")


def test_a_shared_metadata_file_is_parsed_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One metadata.jsonl at the root describes every batch: parsed once, not once per batch,
    # and parsed again once it changes.
    import dedup.sources._files as files

    root = _photo_folder(tmp_path / "photos")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "first"}) + "\n")
    parsed: list[bytes] = []
    real = files.metadata_captions
    monkeypatch.setattr(files, "metadata_captions", lambda data, csv_file: parsed.append(data) or real(data, csv_file))
    shards = discover([str(root)], folder_batch=1)
    assert len(shards) == 4 and all(s.captions == ("metadata.jsonl",) for s in shards)
    captions = {s.sample_id: s.caption for shard in shards for s in read_shard(shard)}
    assert captions["a.jpg"] == "first" and len(parsed) == 1
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "second, longer"}) + "\n")
    assert [s.caption for s in read_shard(shards[0])] == ["second, longer"] and len(parsed) == 2


def test_read_samples_opens_only_the_named_files_of_a_folder_batch(tmp_path: Path) -> None:
    # Reading a few images back (the second look, thumbnails) opens just those files; a named
    # file gone since discovery is still a failed sample, and other kinds stream the whole shard.
    root = _photo_folder(tmp_path / "photos")
    (shard,) = discover([str(root)])
    (root / "a.jpg").unlink()
    samples = list(read_samples(shard, {"a.jpg", "b/deep/d.webp"}))  # a batch yields every member it reads
    assert [(s.sample_id, s.status) for s in samples] == [("a.jpg", "failed"), ("b/deep/d.webp", "ok")]
    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as tf:
        for key in ("k0", "k1"):
            info = tarfile.TarInfo(f"{key}.jpg")
            data = _image((1, 2, 3))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (wds,) = discover([str(tar)])
    assert [s.sample_id for s in read_samples(wds, {"00000.tar/k1"})] == [s.sample_id for s in read_shard(wds)]


def test_single_image_file_source(tmp_path: Path) -> None:
    (tmp_path / "x.JPEG").write_bytes(_image((1, 1, 1)))
    (shard,) = discover([str(tmp_path / "x.JPEG")])
    assert (shard.kind, shard.members) == (ShardKind.FOLDER, ("x.JPEG",))
    (sample,) = read_shard(shard)
    assert sample.sample_id == "x.JPEG" and sample.data is not None


# --------------------------------------------------------------------------------------------
# LAION metadata


def test_laion_metadata_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {
            "SAMPLE_ID": pa.array([101, 102, 103], pa.int64()),
            "URL": ["http://a/1.jpg", "http://a/2.jpg", None],
            "TEXT": ["one", None, "three"],
            "HEIGHT": pa.array([480.0, float("nan"), 600.0]),
            "WIDTH": pa.array([640, 800, None], pa.int32()),
            "similarity": [0.31, 0.29, 0.4],
            "AESTHETIC_SCORE": [5.5, 6.1, 4.0],
            "punsafe": [0.01, 0.2, 0.0],
            "pwatermark": [0.1, 0.9, 0.5],
            "NSFW": ["UNLIKELY", "NSFW", "UNLIKELY"],
            "embedding": pa.array([[0.1, 0.2]] * 3, pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp_path / "part-00000.parquet", row_group_size=2)
    (shard,) = discover([str(tmp_path)])
    assert (shard.kind, shard.shard_id) == (ShardKind.LAION_METADATA, "part-00000.parquet")
    samples = list(read_shard(shard))
    assert [s.sample_id for s in samples] == [
        "part-00000.parquet/000000000",
        "part-00000.parquet/000000001",
        "part-00000.parquet/000000002",
    ]
    first, second, third = samples
    assert first.data is None and first.status == "ok"
    assert (first.url, first.caption, first.width, first.height) == ("http://a/1.jpg", "one", 640, 480)
    assert first.extra == {
        "SAMPLE_ID": 101,
        "similarity": 0.31,
        "AESTHETIC_SCORE": 5.5,
        "punsafe": 0.01,
        "pwatermark": 0.1,
        "NSFW": "UNLIKELY",
    }
    assert (second.caption, second.height) == (None, None)
    assert (third.url, third.width, third.status) == (None, None, "ok")


def test_laion_metadata_lowercase_with_key_column(tmp_path: Path) -> None:
    table = pa.table({"key": ["k2", "k1", "k1"], "url": ["u2", "u1", "u3"], "caption": ["c2", "c1", "c3"]})
    pq.write_table(table, tmp_path / "input.parquet")
    (shard,) = discover([str(tmp_path / "input.parquet")])
    assert shard.kind == ShardKind.LAION_METADATA
    samples = list(read_shard(shard))
    assert [s.sample_id for s in samples] == ["input.parquet/k2", "input.parquet/k1", "input.parquet/k1#2"]
    assert [(s.url, s.caption) for s in samples] == [("u2", "c2"), ("u1", "c1"), ("u3", "c3")]


def test_damaged_parquet_yields_a_damage_row(tmp_path: Path) -> None:
    table = pa.table({"URL": [f"u{i}" for i in range(10)]})
    pq.write_table(table, tmp_path / "meta.parquet")
    (shard,) = discover([str(tmp_path)])
    (tmp_path / "meta.parquet").write_bytes(b"not parquet any more")
    (sample,) = read_shard(shard)
    assert sample.sample_id == "meta.parquet/<damaged>" and sample.status == "failed"


def test_unrelated_parquet_in_a_folder_is_passed_over(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "embeddings.parquet")
    (tmp_path / "a.jpg").write_bytes(_image((1, 1, 1)))
    assert [s.kind for s in discover([str(tmp_path)])] == [ShardKind.FOLDER]
    with pytest.raises(SourceError, match="without image bytes or a url column"):
        discover([str(tmp_path / "embeddings.parquet")])


def test_sidecar_passed_on_its_own_is_refused(tmp_path: Path) -> None:
    folder = _webdataset(tmp_path / "out")
    with pytest.raises(SourceError, match=r"sidecar.*pass the img2dataset output folder"):
        discover([str(folder / "00000.parquet")])


# --------------------------------------------------------------------------------------------
# several sources, URLs, errors


def test_several_sources_get_unique_prefixed_ids(tmp_path: Path) -> None:
    wds = _webdataset(tmp_path / "wds")
    photos = _photo_folder(tmp_path / "photos")
    same = str(photos)  # the same folder twice must still give unique ids
    shards = discover([str(wds), str(photos), same])
    assert [s.shard_id for s in shards] == ["s0/00000.tar", "s1/part-00000", "s2/part-00000"]
    assert [s.source for s in shards] == [str(wds), str(photos), same]
    samples = _by_id([sample for shard in shards for sample in read_shard(shard)])
    assert "s0/00000.tar/000000000" in samples
    assert "s1/a.jpg" in samples and "s2/b/deep/d.webp" in samples


def test_mixed_folder_gives_every_kind(tmp_path: Path) -> None:
    _webdataset(tmp_path / "wds")
    _photo_folder(tmp_path / "photos")
    (tmp_path / "meta").mkdir()
    pq.write_table(pa.table({"URL": ["u"], "TEXT": ["t"]}), tmp_path / "meta" / "0.parquet")
    shards = discover([str(tmp_path)])
    assert [(s.shard_id, s.kind) for s in shards] == [
        ("meta/0.parquet", ShardKind.LAION_METADATA),
        ("part-00000", ShardKind.FOLDER),
        ("wds/00000.tar", ShardKind.WEBDATASET),
    ]
    assert shards[1].members[0] == "photos/a.jpg"


def test_file_url(tmp_path: Path) -> None:
    folder = _webdataset(tmp_path / "out")
    (shard,) = discover([folder.as_uri()])
    assert shard.source == folder.as_uri()
    assert shard.path == str(folder / "00000.tar")
    assert len(list(read_shard(shard))) == 4


def test_stamp_tracks_tar_and_sidecar(tmp_path: Path) -> None:
    folder = _webdataset(tmp_path / "out")
    (before,) = discover([str(folder)])
    os.utime(folder / "00000.parquet", (1_600_000_000, 1_600_000_000))
    (after,) = discover([str(folder)])
    assert before.stamp != after.stamp and before.shard_id == after.shard_id
    tar_stat = (folder / "00000.tar").stat()
    assert after.stamp.startswith(f"{tar_stat.st_size}-{tar_stat.st_mtime}+")


def test_missing_path_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist; hint: check the path"):
        discover([str(tmp_path / "nope")])


def test_empty_folder_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(SourceError, match=r"found nothing to read.*hint"):
        discover([str(tmp_path / "empty")])


def test_unknown_file_and_protocol_are_source_errors(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("url\nhttp://a\n")
    with pytest.raises(SourceError, match="not a file dedup can read"):
        discover([str(tmp_path / "x.csv")])
    with pytest.raises(SourceError, match="Protocol not known"):
        discover(["nosuchproto://bucket/x"])


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no source given"):
        discover([])
    with pytest.raises(ConfigError):
        discover([str(tmp_path)], folder_batch=0)
    (tmp_path / "a.jpg").write_bytes(_image((1, 1, 1)))
    assert [s.shard_id for s in discover(str(tmp_path))] == ["part-00000"]  # a bare str is one source


def test_s3_without_s3fs_names_the_extra() -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed")
    with pytest.raises(MissingDependencyError, match=r"pip install 'dedup\[s3\]'"):
        discover(["s3://some-bucket/laion"])


def test_shard_is_frozen_and_hashable(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_image((1, 1, 1)))
    (shard,) = discover([str(tmp_path)])
    assert isinstance(shard, Shard) and hash(shard) == hash(discover([str(tmp_path)])[0])


def test_http_without_aiohttp_names_the_package() -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("aiohttp is installed")
    with pytest.raises(MissingDependencyError, match="aiohttp"):
        discover(["http://example.invalid/00000.tar"])


def test_files_shard_folder_given_directly(tmp_path: Path) -> None:
    shard_dir = tmp_path / "00000"
    shard_dir.mkdir()
    for name, data in _sample_members("000000000", (1, 1, 1)):
        (shard_dir / name).write_bytes(data)
    _write_sidecar(tmp_path / "00000.parquet", [_meta("000000000"), _failed("000000001", "gone")])
    (shard,) = discover([str(shard_dir)])
    assert (shard.kind, shard.shard_id) == (ShardKind.I2D_FILES, "00000")
    assert [(s.sample_id, s.status) for s in read_shard(shard)] == [
        ("00000/000000000", "ok"),
        ("00000/000000001", "failed"),
    ]


@pytest.fixture
def memory_bucket(tmp_path: Path) -> Iterator[str]:
    """A ``memory://`` tree: fsspec's in-process filesystem stands in for an object store, so the
    remote code paths (URLs in shard paths, concurrent reads) run without a network."""
    fs = fsspec.filesystem("memory")
    root = f"/dedup-test-{os.getpid()}-{tmp_path.name}"
    local = tmp_path / "tree"
    _webdataset(local / "wds")
    _photo_folder(local / "photos")
    (local / "meta").mkdir()
    for name in ("a", "b"):  # two parquet footers to inspect, concurrently
        pq.write_table(pa.table({"URL": [f"http://{name}"]}), local / "meta" / f"{name}.parquet")
    fs.put(f"{local}/", root, recursive=True)
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_memory_filesystem_behaves_like_a_remote_store(memory_bucket: str) -> None:
    shards = discover([memory_bucket], folder_batch=2)
    assert [(s.shard_id, s.kind) for s in shards] == [
        ("meta/a.parquet", ShardKind.LAION_METADATA),
        ("meta/b.parquet", ShardKind.LAION_METADATA),
        ("part-00000", ShardKind.FOLDER),
        ("part-00001", ShardKind.FOLDER),
        ("wds/00000.tar", ShardKind.WEBDATASET),
    ]
    assert all(s.path.startswith("memory://") and s.stamp for s in shards)
    samples = _by_id([sample for shard in shards for sample in read_shard(shard)])
    assert len(samples) == 2 + 4 + 4
    assert samples["photos/b/corrupt.jpg"].data == b"\xff\xd8 this is not really a jpeg"
    assert samples["wds/00000.tar/000000001"].error == "download failed: Connection timed out after 10s"
