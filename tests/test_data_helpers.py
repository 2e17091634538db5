"""The test-data builders do what they say: images, edits, loopback server, img2dataset runs."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data import (
    EDIT_NAMES,
    LAION_COLUMNS,
    GroundTruth,
    LoopbackImageServer,
    PlantedDataset,
    corrupt_jpeg_bytes,
    edited_copies,
    encode_jpeg,
    heavy_tailed_copies,
    inject_corrupt_member,
    make_laion_parquet,
    natural_image,
    pairwise_scores,
    plant_copies,
    run_img2dataset,
)
from PIL import Image, ImageOps, UnidentifiedImageError


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def _no_proxy_get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as r:
        return bytes(r.read())


# ------------------------------------------------------------------------------------- images


def test_natural_image_is_deterministic_textured_and_seed_dependent() -> None:
    a, b, c = natural_image(1), natural_image(1), natural_image(2)
    assert a.size == (256, 192) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert _pixels(a).std() > 20  # not a flat colour
    assert np.abs(_pixels(a) - _pixels(c)).mean() > 25  # clearly another image
    assert natural_image(3, size=(100, 50)).size == (100, 50)


def test_edited_copies_make_every_named_edit() -> None:
    img = natural_image(7, (200, 150))
    edits = dict(edited_copies(img, np.random.default_rng(0)))
    assert tuple(edits) == EDIT_NAMES
    w, h = img.size
    assert edits["resize"].width < w and edits["resize"].height < h
    cw, ch = edits["crop"].size
    assert 0.89 * w <= cw <= 0.96 * w and 0.89 * h <= ch <= 0.96 * h
    assert edits["pad"].width == edits["pad"].height == w
    assert edits["grayscale"].mode == "L"
    assert edits["flip"].tobytes() == ImageOps.mirror(img).tobytes()
    for name in ("jpeg", "text", "brightness"):
        assert edits[name].size == img.size
        diff = np.abs(_pixels(edits[name]) - _pixels(img)).mean()
        assert 0.5 < diff < 40, name  # changed, but still the same picture


def test_corrupt_bytes_look_like_jpeg_but_do_not_decode() -> None:
    data = corrupt_jpeg_bytes(3)
    assert data[:3] == b"\xff\xd8\xff" and b"JFIF" in data[:12]
    with pytest.raises(UnidentifiedImageError):
        Image.open(io.BytesIO(data)).load()


def test_heavy_tailed_copies_sum_and_skew() -> None:
    counts = heavy_tailed_copies(100, 60, np.random.default_rng(0))
    assert sum(counts) == 60
    assert counts.count(0) >= 60  # most originals are unique
    assert max(counts) >= 5  # a few have many copies


# ------------------------------------------------------------------------------------- server


def test_loopback_server_serves_404s_and_accepts_new_files() -> None:
    with LoopbackImageServer({"a.jpg": b"hello"}) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert _no_proxy_get(server.url("/a.jpg")) == b"hello"
        assert _no_proxy_get(server.url("/a.jpg?x=1")) == b"hello"
        with pytest.raises(urllib.error.HTTPError) as err:
            _no_proxy_get(server.url("/missing.jpg"))
        assert err.value.code == 404
        err.value.close()
        server.add("/b.png", b"\x89PNG")
        assert _no_proxy_get(server.url("b.png")) == b"\x89PNG"
        assert server.hits == {"/a.jpg": 2, "/b.png": 1}
    with pytest.raises(RuntimeError, match="not running"):
        server.url("/a.jpg")


def test_loopback_server_as_proxy_serves_absolute_urls() -> None:
    url = "http://cdn.shop.example.net/p/1.jpg"
    with LoopbackImageServer({url: b"jpeg bytes"}) as server:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": server.base_url}))
        with opener.open(url, timeout=5) as r:
            assert r.read() == b"jpeg bytes"
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open("http://cdn.shop.example.net/p/2.jpg", timeout=5)
        assert err.value.code == 404
        err.value.close()
        with pytest.raises(urllib.error.HTTPError):  # not registered as a plain path
            _no_proxy_get(server.url("/p/1.jpg"))
    with pytest.raises(ValueError, match="http://"):
        LoopbackImageServer({"https://x.example.com/a.jpg": b""})


# ------------------------------------------------------------------------------------- parquet


def test_make_laion_parquet_writes_laion_columns(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"URL": "http://x/1.jpg", "TEXT": "a cat", "WIDTH": 10, "extra": "e"},
        {"URL": "http://x/2.jpg"},
    ]
    path = make_laion_parquet(tmp_path / "m" / "laion.parquet", rows)
    table = pq.read_table(path)
    assert table.column_names == [*LAION_COLUMNS, "extra"]
    assert table.column("WIDTH").to_pylist() == [10, None]
    assert table.column("TEXT").to_pylist() == ["a cat", None]
    with pytest.raises(ValueError, match="URL"):
        make_laion_parquet(tmp_path / "bad.parquet", [{"TEXT": "no url"}])


# ------------------------------------------------------------------------------------- img2dataset


def _tar_members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as tf:
        out = {}
        for m in tf.getmembers():
            fh = tf.extractfile(m)
            assert fh is not None
            out[m.name] = fh.read()
        return out


def test_i2d_webdataset_layout(i2d_webdataset: PlantedDataset) -> None:
    out_dir, truth = i2d_webdataset
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == [
        "00000.parquet", "00000.tar", "00000_stats.json",
        "00001.parquet", "00001.tar", "00001_stats.json",
    ]  # fmt: skip
    rows = [r for p in sorted(out_dir.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len(truth) == 63
    assert {r["url"] for r in rows} == set(truth)
    for col in (
        "key",
        "status",
        "error_message",
        "width",
        "height",
        "sha256",
        "caption",
        "AESTHETIC_SCORE",
        "similarity",
    ):
        assert col in rows[0], col
    assert all(len(r["key"]) == 7 for r in rows)  # 5 shard digits + ceil(log10(32)) row digits
    assert all(r["url"].startswith("http://") and ".example." in r["url"] for r in rows)

    stats = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*_stats.json"))]
    assert sum(s["count"] for s in stats) == 63
    assert sum(s["failed_to_download"] for s in stats) == 2
    # img2dataset itself refused the corrupt bytes (failed_to_resize); the injection moved that
    # count to successes, as img2dataset would have counted it with disable_all_reencoding.
    assert sum(s["failed_to_resize"] for s in stats) == 0
    assert sum(s["successes"] for s in stats) == 61
    assert sum(s["status_dict"].get("success", 0) for s in stats) == 61
    assert not any("Image decoding error" in s["status_dict"] for s in stats)


def test_i2d_failed_and_corrupt_rows(i2d_webdataset: PlantedDataset) -> None:
    out_dir, truth = i2d_webdataset
    members: dict[str, bytes] = {}
    for tar in sorted(out_dir.glob("*.tar")):
        members |= _tar_members(tar)
    rows = {r["url"]: r for p in sorted(out_dir.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}

    statuses = Counter((truth.kind[u], r["status"]) for u, r in rows.items())
    assert statuses[("missing", "failed_to_download")] == 2
    assert statuses[("corrupt", "success")] == 1  # injected: the sidecar agrees with the tar
    assert sum(n for (kind, status), n in statuses.items() if status != "success") == 2
    for url in truth.failed:
        row = rows[url]
        if truth.kind[url] == "missing":
            assert row["error_message"] == "HTTP Error 404: Not Found"
            assert not any(name.startswith(row["key"] + ".") for name in members)
        else:
            data = members[row["key"] + ".jpg"]
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
            assert json.loads(members[row["key"] + ".json"])["key"] == row["key"]
            with pytest.raises(UnidentifiedImageError):
                Image.open(io.BytesIO(data)).load()

    # Every successful sample has jpg + txt + json; the jpg bytes are what was served.
    keys = {name.rsplit(".", 1)[0] for name in members}
    assert len(members) == 3 * len(keys) == 3 * 61
    for row in rows.values():
        if row["status"] == "success":
            assert hashlib.sha256(members[row["key"] + ".jpg"]).hexdigest() == row["sha256"]
            assert members[row["key"] + ".txt"].decode() == row["caption"]


def test_i2d_exact_copies_stay_byte_identical(i2d_webdataset: PlantedDataset) -> None:
    out_dir, truth = i2d_webdataset
    by_key = i2d_webdataset.truth_by_key()
    assert set(by_key.values()) == set(truth.values())
    members: dict[str, bytes] = {}
    for tar in sorted(out_dir.glob("*.tar")):
        members |= _tar_members(tar)
    originals = {by_key[k]: members[k + ".jpg"] for k, kind in by_key.kind.items() if kind == "original"}
    exact = [k for k, kind in by_key.kind.items() if kind == "exact"]
    edited = [k for k, kind in by_key.kind.items() if kind in EDIT_NAMES]
    assert exact and edited
    for k in exact:
        assert members[k + ".jpg"] == originals[by_key[k]]
    for k in edited:
        assert members[k + ".jpg"] != originals[by_key[k]]
        assert Image.open(io.BytesIO(members[k + ".jpg"])).format == "JPEG"


def test_ground_truth_is_consistent(i2d_webdataset: PlantedDataset) -> None:
    _, truth = i2d_webdataset
    assert isinstance(truth, GroundTruth)
    kinds = Counter(truth.kind.values())
    assert kinds["original"] == 40 and kinds["missing"] == 2 and kinds["corrupt"] == 1
    assert sum(n for k, n in kinds.items() if k == "exact" or k in EDIT_NAMES) == 20
    groups = truth.groups()
    for members in groups.values():
        assert [truth.kind[m] for m in members].count("original") == 1
    assert all(truth[u] not in groups for u in truth.failed)
    assert pairwise_scores(dict(truth), truth) == (1.0, 1.0)
    singletons = {u: None for u in truth}
    assert pairwise_scores(singletons, truth) == (1.0, 0.0)
    n_pairs = len(truth.duplicate_pairs())
    assert n_pairs > 20
    everything = {u: 0 for u in truth if u not in truth.failed}
    precision, recall = pairwise_scores(everything, truth)
    assert recall == 1.0 and 0 < precision < 0.1


def test_pairwise_scores_small_example() -> None:
    truth = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 2}
    pred = {"a": "x", "b": "x", "c": "y", "d": "y", "e": None, "zz": "x"}
    # predicted pairs: (a,b) right, (c,d) wrong; true pairs: ab, ac, bc.
    assert pairwise_scores(pred, truth) == (0.5, 1 / 3)


def test_sample_images_dir(sample_images_dir: PlantedDataset) -> None:
    root, truth = sample_images_dir
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted(truth)
    assert len(files) == 6 + 6 + 1
    assert truth.corrupt == {"broken_00.jpg"}
    for rel, kind in truth.kind.items():
        if kind != "corrupt":
            Image.open(root / rel).load()
    exact = [r for r, k in truth.kind.items() if k == "exact"]
    for rel in exact:
        orig = next(o for o, k in truth.kind.items() if k == "original" and truth[o] == truth[rel])
        assert (root / rel).read_bytes() == (root / orig).read_bytes()


@pytest.mark.parametrize("output_format", ["parquet", "files"])
def test_run_img2dataset_other_formats(tmp_path: Path, output_format: str) -> None:
    images = [natural_image(i, (64, 48)) for i in range(3)]
    served = {f"/{i}.jpg": encode_jpeg(img) for i, img in enumerate(images)}
    served["/png.png"] = _png(images[0])
    with LoopbackImageServer(served) as server:
        rows = [{"URL": server.url(p), "TEXT": f"caption {p}", "AESTHETIC_SCORE": 5.0} for p in sorted(served)]
        rows.append({"URL": server.url("/gone.jpg"), "TEXT": "gone"})
        parquet = make_laion_parquet(tmp_path / "laion.parquet", rows)
        before = signal.getsignal(signal.SIGINT)
        result = run_img2dataset(parquet, tmp_path / "out", output_format=output_format)  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGINT) is before
        url = {p: server.url(p) for p in [*served, "/gone.jpg"]}
    assert [p.name for p in result.shards] == (["00000.parquet"] if output_format == "parquet" else ["00000"])
    side = result.read_sidecars().to_pylist()
    assert Counter(r["status"] for r in side) == {"success": 4, "failed_to_download": 1}
    by_url = {r["url"]: r for r in side}
    if output_format == "parquet":
        table = pq.read_table(result.shards[0]).to_pylist()
        stored = {r["url"]: r["jpg"] for r in table}
    else:
        stored = {}
        for r in side:
            path = result.shards[0] / f"{r['key']}.jpg"
            stored[r["url"]] = path.read_bytes() if path.exists() else None
    assert stored[url["/gone.jpg"]] is None
    for i in range(3):
        assert stored[url[f"/{i}.jpg"]] == served[f"/{i}.jpg"]  # JPEG kept byte for byte
    png_stored = stored[url["/png.png"]]
    assert png_stored is not None and png_stored[:3] == b"\xff\xd8\xff"  # PNG re-encoded as JPEG
    assert by_url[url["/png.png"]]["sha256"] == hashlib.sha256(served["/png.png"]).hexdigest()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_plant_copies_is_deterministic_and_counts_right() -> None:
    originals = [natural_image(i, (64, 48)) for i in range(4)]

    def plant() -> list[tuple[str, int, str, bytes | None]]:
        items = plant_copies(originals, [2, 1], np.random.default_rng(5), n_missing=1, n_corrupt=1)
        return [(it.url, it.group, it.kind, it.data) for it in items]

    a = plant()
    assert a == plant()
    assert len(a) == 4 + 3 + 1 + 1
    assert len({path for path, *_ in a}) == len(a)
    kinds = Counter(kind for _, _, kind, _ in a)
    assert kinds["original"] == 4 and kinds["missing"] == 1 and kinds["corrupt"] == 1


def test_inject_corrupt_member_rejects_unknown_or_present_keys(i2d_webdataset: PlantedDataset, tmp_path: Path) -> None:
    src = i2d_webdataset.out_dir
    tar, side = tmp_path / "00000.tar", tmp_path / "00000.parquet"
    tar.write_bytes((src / "00000.tar").read_bytes())
    side.write_bytes((src / "00000.parquet").read_bytes())
    with pytest.raises(ValueError, match="0 rows"):
        inject_corrupt_member(tar, "nope", b"x")
    present = pq.read_table(side, columns=["key", "status"]).to_pylist()
    ok_key = next(r["key"] for r in present if r["status"] == "success")
    with pytest.raises(ValueError, match="already holds"):
        inject_corrupt_member(tar, ok_key, b"x")


def test_run_img2dataset_raises_when_a_shard_silently_fails(tmp_path: Path) -> None:
    # The tfrecord writer needs tensorflow: img2dataset's worker fails the shard, prints, and
    # download() returns normally. The helper must notice and say so.
    with LoopbackImageServer({"/0.jpg": encode_jpeg(natural_image(0, (32, 32)))}) as server:
        parquet = make_laion_parquet(tmp_path / "laion.parquet", [{"URL": server.url("/0.jpg"), "TEXT": "x"}])
        with pytest.raises(RuntimeError, match=r"did not write .*00000_stats\.json"):
            run_img2dataset(parquet, tmp_path / "out", output_format="tfrecord")  # type: ignore[arg-type]
    pq.write_table(pa.table({"url": ["http://x.example.com/a.jpg"]}), tmp_path / "lower.parquet")
    with pytest.raises(ValueError, match="no URL column"):
        run_img2dataset(tmp_path / "lower.parquet", tmp_path / "out2")
