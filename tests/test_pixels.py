"""Pixel hashes only where they can label a link (dedup.pixels): the same links and labels as
hashing every image, in run, check, index add and decontamination, and an old (format 4) index
still reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from _data import encode_jpeg, natural_image

import dedup.featurize as featurize_module
from dedup import run
from dedup.add import add
from dedup.check import check
from dedup.config import RunConfig
from dedup.fingerprint import fingerprint
from dedup.pixels import pixel_keys, plan
from dedup.store import FORMAT, META, index_dir, open_index

CFG = RunConfig().with_overrides({"workers": 1, "embed.model": "none"})  # the hash path, in this process
SIZE = (96, 64)


def _with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a comment segment: other bytes, the same pixels (as metadata stripped
    or added by a re-upload)."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pixels")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    for seed in range(10):
        natural_image(seed, SIZE).save(a / f"i{seed}.png")
    natural_image(3, SIZE).save(a / "i3-twin.png", compress_level=1)  # pixel twin, other bytes
    jpeg = encode_jpeg(natural_image(20, SIZE))
    (a / "j20.jpg").write_bytes(jpeg)
    (a / "j20-comment.jpg").write_bytes(_with_comment(jpeg, b"re-uploaded"))
    shutil.copy(a / "i5.png", a / "i5-copy.png")  # byte twin
    natural_image(7, SIZE).save(b / "b7-twin.png", compress_level=0)  # twin of an index row hashed by no run
    (b / "b20.jpg").write_bytes(_with_comment(jpeg, b"another"))  # twin of index rows that were hashed
    for seed in range(30, 33):
        natural_image(seed, SIZE).save(b / f"n{seed}.png")
    return {"root": root, "a": a, "b": b}


def _eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image pixel-hashed in the per-shard step, as before dedup.pixels (workers=1: inline)."""
    monkeypatch.setattr(featurize_module, "fingerprint", lambda data, cfg, *, prepare=None, pixel_hash=True: fingerprint(data, cfg, prepare=prepare))


def test_plan_hashes_one_row_per_byte_hash_of_a_shared_key() -> None:
    p1, p2, s1, s2, s3 = (bytes([k]) * 32 for k in range(5))
    width, height = [10, 10, 10, 10, 12, 10], [8, 8, 8, 8, 8, 8]
    pdq = [b"q", b"q", b"q", b"r", b"q", None]
    sha = [s1, s1, s2, s3, s3, s2]
    # rows 0-2 share a key with two byte hashes: s1 once (row 0), s2 once (row 2); row 3 and 4
    # are alone in their keys; row 5 has no PDQ
    assert plan(width, height, pdq, sha, [None] * 6) == [0, 2]
    assert plan(width, height, pdq, sha, [p1, None, None, None, None, None]) == [2]  # s1's is known
    keys = pixel_keys([None, None, p2, None, None, None], sha)
    assert keys == [s1, s1, p2, s3, s3, p2]  # row 5 borrows its byte twin's pixel hash


def _signals(out: Path) -> dict[str, tuple[str | None, str | None]]:
    m = pl.read_parquet(out / "manifest.parquet")
    return {r["sample_id"].split("/")[-1]: (r["duplicate_of"], r["signal"]) for r in m.iter_rows(named=True)}


@pytest.mark.slow
def test_run_lazy_equals_eager(sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = sets["root"] / "lazy"
    run([str(sets["a"])], lazy, config=CFG)
    got = _signals(lazy)
    assert got["i3.png"][1] == "exact_pixels" or got["i3-twin.png"][1] == "exact_pixels"
    assert got["j20.jpg"][1] == "exact_pixels" or got["j20-comment.jpg"][1] == "exact_pixels"
    assert "exact_bytes" in {got["i5.png"][1], got["i5-copy.png"][1]}
    meta = json.loads((index_dir(lazy) / META).read_text())
    assert meta["format"] == FORMAT == 5
    samples = open_index(lazy, columns=["sample_id", "pixel_sha256"]).samples.to_pylist()
    hashed = {r["sample_id"] for r in samples if r["pixel_sha256"] is not None}
    assert hashed == {"i3.png", "i3-twin.png", "j20.jpg", "j20-comment.jpg"}  # the candidates only
    _eager(monkeypatch)
    eager = sets["root"] / "eager"
    run([str(sets["a"])], eager, config=CFG)
    assert (eager / "manifest.parquet").read_bytes() == (lazy / "manifest.parquet").read_bytes()
    full = open_index(eager, columns=["pixel_sha256"]).samples.column("pixel_sha256")
    assert full.null_count == 0


def _baseline_signals(result: object) -> dict[str, tuple[str, str]]:
    return {m.sample_id.split("/")[-1]: (m.match_id.split("/")[-1], m.signal) for m in result.baseline_matches}  # type: ignore[attr-defined]


@pytest.mark.slow
def test_check_add_and_against_label_pixel_twins_of_other_bytes(sets: dict[str, Path]) -> None:
    out = sets["root"] / "index"
    run([str(sets["a"])], out, config=CFG)
    got = _baseline_signals(check(str(sets["b"]), out, work=sets["root"] / "check-work"))
    # i7.png was never pixel-hashed (no twin in its run): re-read from the index's source
    assert got["b7-twin.png"] == ("i7.png", "exact_pixels")
    assert got["b20.jpg"][1] == "exact_pixels" and got["b20.jpg"][0] in {"j20.jpg", "j20-comment.jpg"}
    assert not any(k.startswith("n") for k in got)
    # decontamination: the drop as a training set against the index
    train = sets["root"] / "train"
    run([str(sets["b"])], train, config=CFG, against=[f"a={out}"])
    m = pl.read_parquet(train / "manifest.parquet").filter(pl.col("reason") == "contaminates:a")
    assert dict(zip(m["sample_id"], m["signal"], strict=True)) == {"b7-twin.png": "exact_pixels", "b20.jpg": "exact_pixels"}
    # index add: the grown index's manifest links them by their pixels
    add([str(sets["b"])], out)
    signals = _signals(out)
    pair = {k: v for k, v in signals.items() if k in {"i7.png", "b7-twin.png"}}
    assert "exact_pixels" in {v[1] for v in pair.values()}, pair
    pair = {k: v for k, v in signals.items() if k in {"j20.jpg", "j20-comment.jpg", "b20.jpg"}}
    assert {v[1] for v in pair.values()} == {None, "exact_pixels"}, pair


@pytest.mark.slow
def test_an_index_row_whose_source_is_gone_links_by_pdq(sets: dict[str, Path]) -> None:
    a = sets["root"] / "a-moved"
    shutil.copytree(sets["a"], a)
    out = sets["root"] / "index-gone"
    run([str(a)], out, config=CFG)
    (a / "i7.png").unlink()  # its pixel hash was never computed, and cannot be now
    got = _baseline_signals(check(str(sets["b"]), out))
    assert got["b7-twin.png"] == ("i7.png", "pdq")
    assert got["b20.jpg"][1] == "exact_pixels"  # the index holds these pixel hashes


@pytest.mark.slow
def test_a_format_4_index_still_works(sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    out = sets["root"] / "old"
    _eager(monkeypatch)
    run([str(sets["a"])], out, config=CFG)  # every pixel hash computed, as format 4 wrote them
    monkeypatch.undo()
    meta_path = index_dir(out) / META
    meta = json.loads(meta_path.read_text())
    meta["format"] = 4
    meta_path.write_text(json.dumps(meta))
    samples = pq.read_table(index_dir(out) / meta["data"] / "samples.parquet")
    assert samples.column("pixel_sha256").null_count == 0
    got = _baseline_signals(check(str(sets["b"]), out))
    assert got["b7-twin.png"] == ("i7.png", "exact_pixels")
    assert got["b20.jpg"][1] == "exact_pixels"
