"""Reliability: bad input, crashes and untrusted data lose nothing.

Checked through the whole pipeline, on the manifest's rows: every bad image and every damaged
container is a ``failed`` row with a one-line reason while the run goes on; ``dedup run``
killed with SIGKILL at random points and rerun gives a byte-identical manifest; a full disk is
a clean error that leaves earlier checkpoints valid; captions, URLs and names never reach HTML
or a terminal as markup or escape sequences; model files that run code need an explicit flag;
nothing is read through a symlink that leaves the source.

The bad-input corpus is made here, by ``tests/fuzz/badinputs.py`` (also the fuzzer's seeds).
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
import types
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from badinputs import (  # noqa: E402
    Bad,
    Odd,
    encode,
    image_cases,
    meta_row,
    picture,
    sample_members,
    tar_bytes,
    write_sidecar,
)

from _configs import PLAIN  # noqa: E402
from dedup import run  # noqa: E402
from dedup.cli import app  # noqa: E402
from dedup.config import EmbedConfig, EmbedModel, RunConfig, load_config  # noqa: E402
from dedup.embed import build_embedder  # noqa: E402
from dedup.errors import ConfigError, ModelError, OutputError, printable  # noqa: E402
from dedup.featurize import FeatureStep  # noqa: E402
from dedup.sources import discover, read_shard  # noqa: E402

FAST = PLAIN.with_overrides({"embed.model": "sscd_distilled", "embed.size": 224})
CLI_FAST = ["--model", "sscd_distilled", "--quiet"]
runner = CliRunner()


def _manifest(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "manifest.parquet")


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    m = _manifest(out)
    assert m["sample_id"].n_unique() == m.height, "sample ids must be unique"
    return {row["sample_id"]: row for row in m.iter_rows(named=True)}


def _assert_failed(row: dict[str, Any], reason: str) -> None:
    assert row["status"] == "failed" and row["reason"] == "failed" and not row["keep"], row
    assert row["cluster_id"] is None, row
    error = row["error"]
    assert error and reason in error, (reason, row)
    assert "\n" not in error and "\x1b" not in error and len(error) <= 300, error


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------
# 1. bad images: each a failed row with a one-line reason, odd ones decoded, the run goes on


# The default preset with every pair sent to the second look: each odd image re-read, trimmed,
# given ORB features and aligned against the others (tiny, 1x300, 16-bit, CMYK, animated...).
SECOND_LOOK = load_config("default").with_overrides({"search.verify_from": 0.0, "workers": 1})


@pytest.mark.parametrize("config", [FAST, SECOND_LOOK], ids=["fast", "second-look"])
def test_every_bad_image_is_a_failed_row_and_every_odd_one_decodes(tmp_path: Path, config: RunConfig) -> None:
    cases = image_cases()
    src = tmp_path / "src"
    (src / "loose").mkdir(parents=True)
    members: list[tuple[Any, bytes]] = []
    listed = []
    for i, case in enumerate(cases):
        (src / "loose" / f"{case.name}.{case.ext}").write_bytes(case.data)
        members += sample_members(f"{i:09d}", case.data, ext=case.ext, caption=case.name)
        listed.append(meta_row(f"{i:09d}", caption=case.name))
    (src / "00000.tar").write_bytes(tar_bytes(members))
    write_sidecar(src / "00000.parquet", listed)

    result = run([str(src)], tmp_path / "out", config=config)
    rows = _rows(tmp_path / "out")
    assert len(rows) == result.samples == 2 * len(cases)  # the same corpus loose and in a tar
    if config is SECOND_LOOK:
        assert result.report["shards"]["second_look"]["checked"] > 0
    bad = [c for c in cases if isinstance(c.expect, Bad)]
    assert result.failed == 2 * len(bad)
    for i, case in enumerate(cases):
        loose, in_tar = rows[f"loose/{case.name}.{case.ext}"], rows[f"00000.tar/{i:09d}"]
        for row in (loose, in_tar):
            if isinstance(case.expect, Bad):
                _assert_failed(row, case.expect.reason)
            else:
                assert isinstance(case.expect, Odd)
                assert row["status"] == "ok" and row["error"] is None, (case.name, row)
                assert (row["width"], row["height"]) == case.expect.size, case.name
        assert in_tar["caption"] == case.name
        if isinstance(case.expect, Odd):  # the same bytes twice: the same cluster
            assert loose["cluster_id"] == in_tar["cluster_id"]
    ok = _manifest(tmp_path / "out").filter(pl.col("status") == "ok")
    assert ok.group_by("cluster_id").agg(pl.col("keep").sum())["keep"].to_list() == [1] * ok["cluster_id"].n_unique()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["summary"]["failed"] == 2 * len(bad)
    assert sum(report["failures"].values()) == 2 * len(bad)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux's /proc")
def test_bombs_are_refused_without_allocating_them() -> None:
    """Refused from the header, before any pixel buffer exists: in a fresh process, fingerprinting
    every bomb of the corpus (each declares gigabytes) peaks far below one of them."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from badinputs import image_cases\n"
        "from dedup.config import FingerprintConfig\n"
        "from dedup.fingerprint import fingerprint\n"
        "bombs = [c for c in image_cases() if 'bomb' in c.name]\n"
        "assert len(bombs) >= 5\n"
        "for c in bombs:\n"
        "    f, _ = fingerprint(c.data, FingerprintConfig())\n"
        "    assert f.status == 'failed', c.name\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's peak (pytest's) across exec into it.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)\n"
    )
    fuzz = str(Path(__file__).resolve().parent / "fuzz")
    proc = subprocess.run([sys.executable, "-c", script, fuzz], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) < 400, f"peak RSS {proc.stdout.strip()} MB"


def test_max_pixels_flag_refuses_large_images_before_decoding(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.png").write_bytes(encode(picture(1, (300, 200)), "PNG"))
    (src / "small.png").write_bytes(encode(picture(2, (100, 50)), "PNG"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(src), "--out", str(out), *CLI_FAST, "--max-pixels", "20000"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    _assert_failed(rows["big.png"], "image declares 300x200 = 6e+04 pixels, over fingerprint.max_pixels=20000")
    assert rows["small.png"]["status"] == "ok"
    assert json.loads((out / "config.json").read_text())["fingerprint"]["max_pixels"] == 20000
    bad = runner.invoke(app, ["run", str(src), "--out", str(tmp_path / "o2"), "--max-pixels", "0"])
    assert bad.exit_code == 2


# --------------------------------------------------------------------------------------------
# 2. bad containers


def _cut_inside(data: bytes, member_name: str) -> bytes:
    """``data`` (a tar) cut in the middle of ``member_name``'s bytes."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember(member_name)
        return data[: member.offset_data + member.size // 2]


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _not_utf8(texts: list[str]) -> pa.Array:
    """A string column holding ``texts`` encoded as latin-1: invalid UTF-8, as a careless
    writer leaves it (pyarrow itself would refuse to build it)."""
    raw = pa.array([t.encode("latin-1") for t in texts], pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())


def _bad_containers(src: Path) -> dict[str, tuple[str, str | None]]:
    """Write every kind of damaged container into ``src``; return ``{sample_id: (status,
    error substring)}`` of every row the manifest must have (and no others)."""
    src.mkdir(parents=True)
    jpg = [encode(picture(100 + i, (48, 36)), "JPEG") for i in range(12)]
    expect: dict[str, tuple[str, str | None]] = {}

    # 00000: odd members and metadata; its sidecar adds a missing sample and a failed download
    k = [f"{i:09d}" for i in range(11)]
    members: list[tuple[Any, bytes]] = []
    members += sample_members(k[0], jpg[0])
    members += [(f"{k[1]}.jpg", jpg[1]), (f"{k[1]}.txt", b"no json here")]
    members += [(f"{k[2]}.jpg", jpg[2]), (f"{k[2]}.json", b'{"url": "http://x/2", "capt')]
    members += [(f"{k[3]}.jpg", jpg[3]), (f"{k[3]}.json", b'{"url": "http://x/3", "caption": "caf\xe9 latin-1"}')]
    members += [(f"{k[4]}.jpg", jpg[4]), (f"{k[4]}.txt", b"na\xefve \xff\xfe bytes")]
    members += [(f"{k[5]}.jpg", jpg[5]), (f"{k[5]}.json", b'{"caption": "cut emoji \\ud83d", "url": "http://x/5"}')]
    members += [("bad\udcffname.jpg", jpg[6])]  # a member name that is not UTF-8 (byte 0xff)
    members += [("/abs/evil.jpg", jpg[7]), ("../../escape.jpg", jpg[8])]
    members += [(_special(f"{k[6]}.jpg", tarfile.SYMTYPE, "/etc/passwd"), b""), (f"{k[6]}.json", b"{}")]
    members += [(_special(f"{k[7]}.jpg", tarfile.LNKTYPE, f"{k[0]}.jpg"), b""), (f"{k[7]}.json", b"{}")]
    members += [(_special("somedir", tarfile.DIRTYPE), b""), (_special("dev.jpg", tarfile.CHRTYPE), b"")]
    members += [(f"{k[8]}.json", json.dumps(meta_row(k[8])).encode())]
    (src / "00000.tar").write_bytes(tar_bytes(members))
    write_sidecar(
        src / "00000.parquet",
        [meta_row(key) for key in k[:10]]
        + [meta_row(k[10], status="failed_to_download", error="\x1b[31mHTTP Error 404\n<script>alert(1)</script>")],
    )
    for key in k[:6]:
        expect[f"00000.tar/{key}"] = ("ok", None)
    expect["00000.tar/bad\\xffname"] = ("ok", None)
    expect["00000.tar//abs/evil"] = ("ok", None)
    expect["00000.tar/../../escape"] = ("ok", None)
    expect[f"00000.tar/{k[6]}"] = ("failed", "no image member in tar")  # a symlink member
    expect[f"00000.tar/{k[7]}"] = ("failed", "no image member in tar")  # a hard link member
    expect[f"00000.tar/{k[8]}"] = ("failed", "no image member in tar")  # json only
    expect[f"00000.tar/{k[9]}"] = ("failed", "missing from tar")
    expect[f"00000.tar/{k[10]}"] = ("failed", "download failed: ?[31mHTTP Error 404 <script>alert(1)</script>")

    # 00001: truncated inside its third sample's image; the sidecar lists four
    keys = [f"00001{i:04d}" for i in range(4)]
    whole = tar_bytes([m for i, key in enumerate(keys) for m in sample_members(key, jpg[i])])
    (src / "00001.tar").write_bytes(_cut_inside(whole, f"{keys[2]}.jpg"))
    write_sidecar(src / "00001.parquet", [meta_row(key) for key in keys])
    expect |= {f"00001.tar/{keys[0]}": ("ok", None), f"00001.tar/{keys[1]}": ("ok", None)}
    expect |= {f"00001.tar/{key}": ("failed", "missing from tar (shard truncated?)") for key in keys[2:]}

    # 00002: truncated, and no sidecar to say what was lost: one row carries the damage
    keys = [f"00002{i:04d}" for i in range(3)]
    whole = tar_bytes([m for i, key in enumerate(keys) for m in sample_members(key, jpg[i])])
    (src / "00002.tar").write_bytes(_cut_inside(whole, f"{keys[1]}.jpg"))
    expect[f"00002.tar/{keys[0]}"] = ("ok", None)
    expect[f"00002.tar/{keys[1]}"] = ("failed", "missing from tar (shard truncated?)")
    expect["00002.tar/<damaged>"] = ("failed", "tar damaged")

    # 00003: the same key (and image) as in 00000: two samples, two ids, one cluster
    (src / "00003.tar").write_bytes(tar_bytes(sample_members(k[0], jpg[0])))
    expect[f"00003.tar/{k[0]}"] = ("ok", None)

    # 00004: an empty file; 00005: an empty archive whose sidecar lists two samples
    (src / "00004.tar").write_bytes(b"")
    expect["00004.tar/<damaged>"] = ("failed", "tar damaged")
    (src / "00005.tar").write_bytes(tar_bytes([]))
    write_sidecar(src / "00005.parquet", [meta_row("000050000"), meta_row("000050001", status="failed_to_download", error="timeout")])
    expect["00005.tar/000050000"] = ("failed", "missing from tar")
    expect["00005.tar/000050001"] = ("failed", "download failed: timeout")

    # 00006: img2dataset parquet output that is garbage; 00007: a garbage sidecar
    (src / "00006.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    (src / "00006_stats.json").write_text("{}")
    expect["00006.parquet/<damaged>"] = ("failed", "parquet damaged after 0 rows")
    (src / "00007.tar").write_bytes(tar_bytes(sample_members("000070000", jpg[9])))
    (src / "00007.parquet").write_bytes(b"\x00" * 100)
    expect["00007.tar/000070000"] = ("ok", None)
    expect["00007.tar/<sidecar>"] = ("failed", "sidecar parquet unreadable")

    # 00008: a missing shard (its tar never arrived), its sidecar left behind
    write_sidecar(src / "00008.parquet", [meta_row("000080000"), meta_row("000080001", status="failed_to_download", error="404")])
    expect["00008.parquet/000080000"] = ("failed", "no image bytes in parquet")
    expect["00008.parquet/000080001"] = ("failed", "download failed: 404")

    # a metadata parquet that is not parquet at all; one whose text is not UTF-8 (parquet
    # writers do not check); and an empty folder
    (src / "meta").mkdir()
    (src / "meta" / "broken.parquet").write_bytes(b"truncated download")
    expect["meta/broken.parquet/<damaged>"] = ("failed", "parquet damaged after 0 rows")
    pq.write_table(pa.table({"URL": ["http://x/a", "http://x/b"], "TEXT": _not_utf8(["caf\xe9", "fine"])}), src / "meta" / "latin1.parquet")
    expect |= {"meta/latin1.parquet/000000000": ("ok", None), "meta/latin1.parquet/000000001": ("ok", None)}
    (src / "empty").mkdir()
    return expect


def test_damaged_containers_lose_no_sample_and_write_nothing_outside(tmp_path: Path) -> None:
    expect = _bad_containers(tmp_path / "src")
    before = _tree(tmp_path)
    result = run([str(tmp_path / "src")], tmp_path / "out", config=FAST)
    rows = _rows(tmp_path / "out")
    assert set(rows) == set(expect)  # every sample once, nothing made up
    assert result.samples == len(expect) and result.failed == sum(s == "failed" for s, _ in expect.values())
    for sample_id, (status, reason) in expect.items():
        row = rows[sample_id]
        if status == "failed":
            _assert_failed(row, reason or "")
        else:
            assert row["status"] == "ok", row
    r = rows
    assert r["00000.tar/000000001"]["caption"] == "no json here"
    assert r["00000.tar/000000001"]["url"] == "http://example.com/000000001.jpg"  # from the sidecar
    assert r["00000.tar/000000002"]["url"] == "http://example.com/000000002.jpg"  # malformed json
    assert (r["00000.tar/000000003"]["url"], r["00000.tar/000000003"]["caption"]) == ("http://x/3", "caf\ufffd latin-1")
    assert r["00000.tar/000000004"]["caption"] == "na\ufffdve \ufffd\ufffd bytes"
    assert r["00000.tar/000000005"]["caption"] == "cut emoji \ufffd"
    assert r["00000.tar//abs/evil"]["key"] == "/abs/evil"
    assert r["meta/latin1.parquet/000000000"]["caption"] == "caf\ufffd"
    # duplicate keys across shards: two rows, linked as exact copies
    assert r["00000.tar/000000000"]["cluster_id"] == r["00003.tar/000000000"]["cluster_id"]
    # tar members are names, never paths: nothing appeared outside the output folder
    assert {p for p in _tree(tmp_path) - before if not p.startswith("out")} == set()
    assert not Path("/abs/evil.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()


def test_missing_and_unreadable_sources_exit_2_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("not data")
    cases = {
        str(tmp_path / "nope"): "does not exist",
        str(tmp_path / "file.txt" / "sub"): "file.txt",
        str(tmp_path / "dangling"): "does not exist",
        str(tmp_path / "empty"): "found nothing to read",
        str(tmp_path / "notes.md"): "not a file dedup can read",
    }
    # One through the real console entry point (a separate process), the rest in-process.
    first = next(iter(cases))
    proc = subprocess.run(
        [sys.executable, "-m", "dedup.cli", "run", first, "--out", str(tmp_path / "o0"), "-q"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: ") and cases[first] in proc.stderr
    for n, (source, text) in enumerate(cases.items()):
        result = runner.invoke(app, ["run", source, "--out", str(tmp_path / f"o{n + 1}"), "-q"])
        assert result.exit_code == 2, (source, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.output
        assert "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder whatever its mode")
def test_unreadable_folder_is_a_clear_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "a.jpg").write_bytes(encode(picture(1), "JPEG"))
    (locked / "inner").chmod(0)
    try:
        result = runner.invoke(app, ["run", str(locked), "--out", str(tmp_path / "o"), "-q"])
    finally:
        (locked / "inner").chmod(0o755)
    assert result.exit_code == 2 and result.output.startswith("Error: cannot list")


def test_huge_members_fifos_and_devices_are_failed_rows_not_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dedup.sources._common
    import dedup.sources._webdataset

    monkeypatch.setattr(dedup.sources._common, "MAX_FILE_BYTES", 1000)  # stands in for 1 GiB
    monkeypatch.setattr(dedup.sources._webdataset, "MAX_FILE_BYTES", 1000)
    src = tmp_path / "src"
    src.mkdir()
    big = encode(picture(1, (200, 150)), "PNG")
    assert len(big) > 1000
    (src / "00000.tar").write_bytes(tar_bytes(sample_members("000000000", big, ext="png") + sample_members("000000001", b"small")))
    (src / "big.png").write_bytes(big)
    os.mkfifo(src / "pipe.jpg")  # a read would block forever
    (src / "null.jpg").symlink_to("/dev/null")  # a device (and outside the source)
    samples = {s.sample_id: s for shard in discover([str(src)]) for s in read_shard(shard)}
    assert samples["00000.tar/000000000"].error == f"tar member too large ({len(big)} bytes; the limit is 1000 bytes)"
    assert samples["00000.tar/000000001"].status == "ok"
    assert samples["big.png"].error == f"unreadable file: too large ({len(big)} bytes; the limit is 1000 bytes)"
    assert samples["pipe.jpg"].error == "unreadable file: not a regular file"
    assert samples["null.jpg"].error == "symlink outside source"


# --------------------------------------------------------------------------------------------
# 3. crash safety: SIGKILL at random points, then rerun: the same bytes


def _kill_dataset(root: Path) -> None:
    """4 webdataset shards (sidecars, one failed download, one corrupt image, exact copies
    across shards) and 8 loose images: 32 samples, 7 shards with ``folder_batch = 3``."""
    seeds = [1, 2, 3, 4, 5, 6, 7, 1, 8, 9, 10, 2, 11, 12, 13, 14, 3, 15, 16, 17]
    for shard in range(4):
        members: list[tuple[Any, bytes]] = []
        listed = []
        for i in range(5):
            key = f"{shard:05d}{i:04d}"
            seed = seeds[shard * 5 + i]
            data = encode(picture(seed, (72, 54)), "JPEG") if (shard, i) != (2, 3) else b"\xff\xd8\xff garbage"
            members += sample_members(key, data, caption=f"picture {seed}")
            listed.append(meta_row(key, caption=f"picture {seed}"))
        listed.append(meta_row(f"{shard:05d}0099", status="failed_to_download", error="HTTP Error 404"))
        (root / f"{shard:05d}.tar").write_bytes(tar_bytes(members))
        write_sidecar(root / f"{shard:05d}.parquet", listed)
    (root / "loose").mkdir()
    for i in range(8):
        (root / "loose" / f"img{i}.png").write_bytes(encode(picture(20 + i % 6, (64, 48)), "PNG"))


def _dedup_cmd(src: Path, out: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "dedup.cli", "run", str(src), "--out", str(out), "--config", str(config), "--quiet"]


class _Watch:
    """What a run has written so far, seen from outside (polled; no hooks in the code)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def config_inode(self) -> int | None:
        try:
            return (self.out / "config.json").stat().st_ino
        except FileNotFoundError:
            return None

    def markers(self) -> int:
        return len(list(self.out.glob(".work/*/done/*.done.json")))

    def writing_outputs(self) -> bool:
        for folder in (self.out, self.out / "index"):
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            if any(n.endswith(".tmp") and not n.startswith(".config.json") for n in names):
                return True
        return False


def _phases(src: Path, out: Path, config: Path, shards: int) -> dict[str, float]:
    """Run once, uninterrupted, and time its phases from outside: when the per-shard stage
    starts (config.json written), when every shard is done, and when the process ends."""
    watch = _Watch(out)
    start = time.monotonic()
    log = out.parent / f"{out.name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(_dedup_cmd(src, out, config), stdout=subprocess.DEVNULL, stderr=err)
    seen: dict[str, float] = {}
    while proc.poll() is None:
        now = time.monotonic() - start
        if "shards" not in seen and watch.config_inode() is not None:
            seen["shards"] = now
        if "global" not in seen and watch.markers() == shards:
            seen["global"] = now
        time.sleep(0.003)
    seen["end"] = time.monotonic() - start
    assert proc.returncode == 0, log.read_text()
    seen.setdefault("shards", seen["end"] / 3)
    seen.setdefault("global", seen["end"] * 2 / 3)
    return seen


def _kill_at(trigger: str, rng: random.Random, src: Path, out: Path, config: Path, shards: int, phases: dict[str, float]) -> str:
    """Start a run and SIGKILL it at a point of kind ``trigger``; returns where it died."""
    watch = _Watch(out)
    old_config = watch.config_inode()
    done_before = watch.markers()
    start = time.monotonic()
    proc = subprocess.Popen(_dedup_cmd(src, out, config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline: float | None = None
    if trigger == "startup":  # imports, discovery, before any output is touched
        deadline = start + rng.uniform(0.05, phases["shards"])
    # A shard kill lands while the shard after the target one is being computed.
    target_markers = rng.randint(done_before + 1, shards - 1) if done_before < shards - 1 else shards
    while proc.poll() is None:
        now = time.monotonic()
        started = watch.config_inode() not in (None, old_config)  # this run reached the shards
        if deadline is None and started:
            if trigger == "shard" and watch.markers() >= target_markers:
                deadline = now
            elif trigger == "global" and watch.markers() == shards:
                deadline = now + rng.uniform(0, phases["end"] - phases["global"])
            elif trigger == "writing" and watch.writing_outputs():
                deadline = now
        if deadline is not None and now >= deadline:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            state = f"{watch.markers()}/{shards} shards done"
            if (out / "manifest.parquet").exists():
                state += ", manifest written"
            return f"{trigger} at {now - start:.2f}s ({state})"
        time.sleep(0.001)
    return f"{trigger}: finished first"


def _assert_checkpoints_valid(out: Path) -> None:
    """Every shard marked done has both of its files, readable; no run left half a file behind
    under a final name (temp files may remain until the next run sweeps them)."""
    for marker in out.glob(".work/*/done/*.done.json"):
        body = json.loads(marker.read_text())
        base = marker.parent.parent / "shards" / marker.name.removesuffix(".done.json")
        table = pq.read_table(f"{base}.parquet")
        assert table.num_rows == body["stats"]["samples"]
        with open(f"{base}.npy", "rb") as fh:
            assert np.load(fh).shape[0] == body["stats"]["embedded"]


_OUTPUTS = ("manifest.parquet", "keep.parquet", "report.json")


KILL_SHARDS = 7


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float], Path]:
    """The kill tests' data, config and one uninterrupted run (outputs and phase timings)."""
    root = tmp_path_factory.mktemp("kill")
    src = root / "src"
    src.mkdir()
    _kill_dataset(src)
    config = root / "fast.toml"
    config.write_text('folder_batch = 3\n[embed]\nmodel = "sscd_distilled"\nsize = 160\n')
    phases = _phases(src, root / "clean", config, KILL_SHARDS)
    assert len(_rows(root / "clean")) == 32
    return src, config, phases, root / "clean"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_points_then_rerun_gives_the_same_bytes(
    tmp_path: Path, seed: int, kill_setup: tuple[Path, Path, dict[str, float], Path]
) -> None:
    src, config, phases, clean = kill_setup
    shards = KILL_SHARDS
    rng = random.Random(seed)
    # Kills chain on one output folder, so they follow the run's order: once a kill lands in
    # the global stage every shard is done. Where in each stage is random.
    triggers = ["startup", "shard", "shard", *rng.sample(["global", "writing"], 2)]
    out = tmp_path / "killed"
    where = []
    for trigger in triggers:
        where.append(_kill_at(trigger, rng, src, out, config, shards, phases))
        _assert_checkpoints_valid(out)
    killed = [w for w in where if "finished first" not in w]
    assert len(killed) >= 3, where  # most kill points must land inside a run

    final = subprocess.run(_dedup_cmd(src, out, config), capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0, final.stderr
    for name in _OUTPUTS:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), (name, where)
    assert len(_rows(out)) == 32  # no sample lost, none doubled
    assert not [p for p in out.rglob("*.tmp")], "a rerun sweeps the temp files of killed runs"
    print(f"seed {seed}: kills {where}")


def _children(pid: int) -> set[int]:
    """The processes ``pid`` started (Linux: /proc's children lists, one per thread)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc to find the run's worker processes")
def test_sigkill_leaves_no_worker_process_behind(tmp_path: Path, kill_setup: tuple[Path, Path, dict[str, float], Path]) -> None:
    """A run killed with SIGKILL (OOM killer, kill -9, a CI timeout) while its worker processes
    compute shards: the workers end too, instead of waiting on the task queue forever."""
    src, config, _, _ = kill_setup
    two = tmp_path / "two.toml"
    two.write_text(config.read_text().replace("folder_batch = 3\n", "folder_batch = 3\nworkers = 2\n", 1))
    proc = subprocess.Popen(_dedup_cmd(src, tmp_path / "out", two), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = _Watch(tmp_path / "out")
    workers: set[int] = set()
    deadline = time.monotonic() + 300
    # Killed once a worker has finished a shard: the workers are past their start-up (a worker
    # still starting reads its parent's pipe and ends by itself) and wait for the next task.
    while proc.poll() is None and time.monotonic() < deadline:
        workers |= {c for c in _children(proc.pid) if b"spawn_main" in _cmdline(c)}
        if workers and watch.markers() >= 1:
            break
        time.sleep(0.01)
    assert workers and watch.markers() < KILL_SHARDS, "the run must be killed while its worker processes compute shards"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them to the next test either
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their killed run"


# --------------------------------------------------------------------------------------------
# 3b. a full disk: a clean error, earlier checkpoints valid, the rerun resumes


def _enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.fixture
def shards_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"img{i}.png").write_bytes(encode(picture(30 + i % 4, (48, 36)), "PNG"))
    return src


SMALL_BATCH = FAST.with_overrides({"folder_batch": 2})


def test_full_disk_while_writing_a_checkpoint(tmp_path: Path, shards_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run([str(shards_src)], tmp_path / "clean", config=SMALL_BATCH)
    real_write = pq.write_table
    written: list[str] = []

    def full_on_third_checkpoint(table: Any, where: Any, *args: Any, **kwargs: Any) -> None:
        if "/shards/" in str(where):
            written.append(str(where))
            if len(written) == 3:
                raise _enospc(where)
        real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_on_third_checkpoint)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"the disk is full .*rerun the same command"):
        run([str(shards_src)], out, config=SMALL_BATCH)
    assert len(list(out.glob(".work/*/done/*.done.json"))) == 2
    _assert_checkpoints_valid(out)
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.parquet").exists()

    monkeypatch.setattr(pq, "write_table", real_write)
    calls: list[str] = []
    real_call = FeatureStep.__call__

    def counting(self: FeatureStep, shard: Any, progress: Any = None) -> dict[str, Any]:
        calls.append(shard.shard_id)
        return real_call(self, shard, progress)

    monkeypatch.setattr(FeatureStep, "__call__", counting)
    run([str(shards_src)], out, config=SMALL_BATCH)
    assert calls == ["part-00002"]  # the two finished shards were kept
    assert (out / "manifest.parquet").read_bytes() == (tmp_path / "clean" / "manifest.parquet").read_bytes()


@pytest.mark.parametrize(
    ("code", "meaning"),
    [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
)
def test_output_errors_while_writing_the_manifest_exit_2(
    tmp_path: Path, shards_src: Path, monkeypatch: pytest.MonkeyPatch, code: int, meaning: str
) -> None:
    real_writer = pq.ParquetWriter

    class FailingManifest(real_writer):  # type: ignore[misc,valid-type]
        """The manifest is written a row group at a time: fail on its first row group."""

        def write_table(self, table: Any, *args: Any, **kwargs: Any) -> None:
            if Path(str(self.where)).name.startswith(".manifest.parquet."):  # atomic_path's temp file
                raise OSError(code, os.strerror(code), str(self.where))
            super().write_table(table, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetWriter", FailingManifest)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(shards_src), "--out", str(out), *CLI_FAST])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("Error: cannot write ") and meaning in line and "\n" not in line, line
    assert "Traceback" not in result.output
    _assert_checkpoints_valid(out)
    assert len(list(out.glob(".work/*/done/*.done.json"))) == 1  # 6 images, one folder batch
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.parquet").exists()


def test_full_disk_creating_a_folder_is_an_output_error(tmp_path: Path, shards_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == out / "index":
            raise _enospc(self)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OutputError, match="the disk is full"):
        run([str(shards_src)], out, config=FAST)


def test_other_errors_are_not_dressed_up_as_disk_trouble(tmp_path: Path, shards_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dedup.pipeline

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "out" / "manifest.parquet"))

    monkeypatch.setattr(dedup.pipeline, "write_manifest", broken)
    with pytest.raises(OSError) as err:
        run([str(shards_src)], tmp_path / "out", config=FAST)
    assert not isinstance(err.value, OutputError) and err.value.errno == errno.EIO

    def source_full(*args: Any, **kwargs: Any) -> None:  # ENOSPC, but not about --out
        raise _enospc("/somewhere/else")

    monkeypatch.setattr(dedup.pipeline, "discover", source_full)
    with pytest.raises(OSError) as err2:
        run([str(shards_src)], tmp_path / "out2", config=FAST)
    assert not isinstance(err2.value, OutputError)


def test_a_run_killed_before_its_stamp_still_owns_its_folder(tmp_path: Path, shards_src: Path) -> None:
    from dedup._io import _HOST

    gone = subprocess.Popen(["true"])
    gone.wait()
    live = subprocess.Popen(["sleep", "60"])  # another dedup writing into the same folder
    try:
        out = tmp_path / "out"
        out.mkdir()
        stale = out / f".dedup.json.{_HOST}-{gone.pid}.abcd1234.tmp"  # what a kill leaves
        stale.write_text("")
        busy = out / f".manifest.parquet.{_HOST}-{live.pid}.abcd1234.tmp"
        busy.write_text("")
        run([str(shards_src)], out, config=FAST)
        assert (out / "manifest.parquet").is_file()
        assert not stale.exists() and busy.exists()  # a live writer's temp file is its own
        assert [p.name for p in out.rglob("*.tmp")] == [busy.name]
        assert (out / "manifest.parquet").stat().st_mode & 0o044  # readable by others, like open()
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------------------------
# 4. untrusted content: HTML, terminals, model files, symlinks

_PAYLOADS = [
    "<script>alert('caption')</script>",
    '"><img src=x onerror=alert(1)>',
    "</title><svg onload=alert(2)>",
    "<a href='javascript:alert(3)'>click</a>",
    "<iframe srcdoc='<script>alert(4)</script>'></iframe>",
    "\x1b[2J\x1b]0;pwned\x07 terminal escapes",
]


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "iframe", "object", "embed"):
            self.problems.append(f"<{tag}>")
        for name, value in attrs:
            if name.lower().startswith("on"):
                self.problems.append(f"{tag} {name}=")
            if name.lower() in ("href", "src", "srcdoc", "action", "formaction") and value:
                if value.strip().lower().startswith(("javascript:", "vbscript:")) or name.lower() == "srcdoc":
                    self.problems.append(f"{tag} {name}={value[:40]}")

    handle_startendtag = handle_starttag


def test_captions_urls_and_names_never_become_markup(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    members: list[tuple[Any, bytes]] = []
    listed = []
    for i, payload in enumerate(_PAYLOADS):
        key = f"{i:09d}"
        img = encode(picture(50 + i % 2, (48, 36)), "JPEG")  # exact copies: big clusters
        members += sample_members(key, img, url=f"javascript:alert({i})//{payload}", caption=payload)
        listed.append(meta_row(key, url=f"javascript:alert({i})//{payload}", caption=payload))
    listed.append(meta_row("000000099", status="failed_to_download", error=_PAYLOADS[0]))
    (src / "00000.tar").write_bytes(tar_bytes(members))
    write_sidecar(src / "00000.parquet", listed)
    (src / "loose").mkdir()
    for name in ("<script>alert(5)<!--.jpg", "x\" onmouseover=\"alert(6).jpg"):
        (src / "loose" / name).write_bytes(encode(picture(50, (48, 36)), "JPEG"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(src), "--out", str(out), *CLI_FAST])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    pages = sorted(out.rglob("*.html"))
    assert pages and (out / "report.html") in pages
    for page in pages:
        text = page.read_text(encoding="utf-8")
        parser = _Markup()
        parser.feed(text)
        parser.close()
        assert parser.problems == [], (page.name, parser.problems[:5])
    assert _rows(out)["loose/<script>alert(5)<!--.jpg"]["status"] == "ok"


def test_ctrl_c_exits_130_with_a_hint_to_resume(tmp_path: Path, shards_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dedup.pipeline

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dedup.pipeline, "run", interrupted)
    result = runner.invoke(app, ["run", str(shards_src), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 130
    assert result.output.strip() == "Interrupted: finished shards are kept; rerun the same command to resume."


def test_printable_strips_terminal_escapes() -> None:
    assert printable("a\x1b[31mred\x1b[0m b") == "ared b"
    assert printable("t\x1b]0;title\x07t") == "tt"
    assert printable("one\ntwo\r") == "one\\ntwo\\r"
    assert printable("rtl \u202eevil") == "rtl \\u202eevil"
    assert printable("caf\udce9") == "caf\\udce9"
    assert printable("plain ascii, accents é, 日本") == "plain ascii, accents é, 日本"


def test_error_messages_on_the_terminal_carry_no_escapes(tmp_path: Path) -> None:
    evil = tmp_path / "out\x1b[31m\x1b]0;pwned\x07\nFAKE LINE"
    evil.write_text("a file, not a folder")
    result = runner.invoke(app, ["run", str(tmp_path), "--out", str(evil), "-q"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: --out ") and result.output.count("\n") == 1
    assert "\x1b" not in result.output and "\x07" not in result.output


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch and open_clip stand-ins: they record what would have been loaded, and refuse."""
    loaded: list[str] = []

    def load(path: str, **kwargs: Any) -> None:
        loaded.append(path)
        raise RuntimeError("stand-in torch loads nothing")

    def create(name: str, pretrained: str, **kwargs: Any) -> None:
        loaded.append(pretrained)
        raise RuntimeError("stand-in open_clip loads nothing")

    torch = types.ModuleType("torch")
    torch.device = lambda kind, index=None: kind  # type: ignore[attr-defined]
    torch.cuda = types.SimpleNamespace(is_available=lambda: False)  # type: ignore[attr-defined]
    torch.set_num_threads = lambda n: None  # type: ignore[attr-defined]
    torch.jit = types.SimpleNamespace(load=load)  # type: ignore[attr-defined]
    open_clip = types.ModuleType("open_clip")
    open_clip.create_model_and_transforms = create  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "open_clip", open_clip)
    return loaded


def test_model_files_that_run_code_need_trust_model_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _fake_torch(monkeypatch)
    for name in ("sscd.torchscript.pt", "clip.pt", "clip.bin", "clip.safetensors"):
        (tmp_path / name).write_bytes(b"weights")
    scripted = str(tmp_path / "sscd.torchscript.pt")

    with pytest.raises(ConfigError, match=r"can run code when loaded; hint: pass --trust-model-code"):
        build_embedder(EmbedConfig(model=EmbedModel.SSCD_TORCHSCRIPT, model_path=scripted))
    for pickled in ("clip.pt", "clip.bin"):
        with pytest.raises(ConfigError, match=r"--trust-model-code .*\.safetensors"):
            build_embedder(EmbedConfig(model=EmbedModel.CLIP, model_path=str(tmp_path / pickled)))
    assert loaded == []  # refused before anything was opened

    # safetensors need no trust; trusted files get as far as the (stand-in) loader
    with pytest.raises(ModelError, match="cannot load CLIP model"):
        build_embedder(EmbedConfig(model=EmbedModel.CLIP, model_path=str(tmp_path / "clip.safetensors")))
    with pytest.raises(ModelError, match="cannot load TorchScript model"):
        build_embedder(EmbedConfig(model=EmbedModel.SSCD_TORCHSCRIPT, model_path=scripted, trust_code=True))
    with pytest.raises(ModelError, match="cannot load CLIP model"):
        build_embedder(EmbedConfig(model=EmbedModel.CLIP, model_path=str(tmp_path / "clip.pt"), trust_code=True))
    assert loaded == [str(tmp_path / "clip.safetensors"), scripted, str(tmp_path / "clip.pt")]

    # the CLI: refused with the flag named, exit 2; with --trust-model-code it tries to load
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(encode(picture(1), "PNG"))
    args = ["run", str(src), "--model", "sscd-torchscript", "--model-path", scripted, "-q"]
    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "o1")])
    assert refused.exit_code == 2 and "pass --trust-model-code" in refused.output, refused.output
    trusted = runner.invoke(app, [*args, "--out", str(tmp_path / "o2"), "--trust-model-code"])
    assert trusted.exit_code == 2 and "cannot load TorchScript model" in trusted.output, trusted.output
    assert json.loads((tmp_path / "o2" / "config.json").read_text())["embed"]["trust_code"] is True
    # trust does not change what the checkpoints are named
    assert PLAIN.stage_key() == PLAIN.with_overrides({"embed.trust_code": True}).stage_key()


def test_symlinks_leaving_the_source_are_failed_rows_never_read(tmp_path: Path) -> None:
    outside = tmp_path / "private"
    (outside / "album").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(encode(picture(60), "JPEG"))
    (outside / "album" / "holiday.jpg").write_bytes(encode(picture(61), "JPEG"))
    (outside / "00009.tar").write_bytes(tar_bytes(sample_members("000090000", encode(picture(62), "JPEG"))))
    write_sidecar(outside / "00001.parquet", [meta_row("000010000", caption="private caption")])

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "real.jpg").write_bytes(encode(picture(63), "JPEG"))
    (src / "inside.jpg").symlink_to("real.jpg")  # stays inside: read
    (src / "sub" / "escape.jpg").symlink_to(outside / "secret.jpg")
    (src / "relative.jpg").symlink_to(Path("..") / "private" / "secret.jpg")
    (src / "album").symlink_to(outside / "album")  # a linked folder leading out
    (src / "loop").symlink_to("..")
    (src / "dangling.jpg").symlink_to(src / "nothing.jpg")
    (src / "00009.tar").symlink_to(outside / "00009.tar")
    (src / "00001.tar").write_bytes(tar_bytes(sample_members("000010000", encode(picture(64), "JPEG"))))
    (src / "00001.parquet").symlink_to(outside / "00001.parquet")  # a sidecar leading out
    files = src / "00002"  # an img2dataset files folder with one image leading out
    files.mkdir()
    for name, data in sample_members("000020000", encode(picture(65), "JPEG")):
        (files / str(name)).write_bytes(data)
    (files / "000020001.jpg").symlink_to(outside / "secret.jpg")
    (files / "000020001.json").write_text(json.dumps(meta_row("000020001")))

    run([str(src)], tmp_path / "out", config=FAST)
    rows = _rows(tmp_path / "out")
    for sample_id in ("sub/escape.jpg", "relative.jpg", "album", "loop", "00009.tar", "00002/000020001"):
        _assert_failed(rows[sample_id], "symlink outside source")
    _assert_failed(rows["00001.tar/<sidecar>"], "symlink outside source")
    _assert_failed(rows["dangling.jpg"], "unreadable file")
    for sample_id in ("real.jpg", "inside.jpg", "00001.tar/000010000", "00002/000020000"):
        assert rows[sample_id]["status"] == "ok", sample_id
    assert rows["00001.tar/000010000"]["caption"] != "private caption"
    assert rows["real.jpg"]["cluster_id"] == rows["inside.jpg"]["cluster_id"]
    assert not [s for s in rows if s.startswith(("loop/", "album/"))]  # linked folders not entered
    assert len(rows) == 12


def test_gif_whose_frame_outgrows_the_parsed_header_fails_without_allocating_it() -> None:
    """A fuzz find (tests/fuzz/regressions/gif-frame-oom.bin, 9 KB): our GIF header walk saw a
    16 x 16 image, PIL found a 65535 x 65535 frame and allocated 4 GB for it while opening.
    Run under a 1.5 GB address-space limit: the sample must fail with one line, not crash."""
    import subprocess
    import sys

    blob = Path(__file__).parent / "fuzz" / "regressions" / "gif-frame-oom.bin"
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))\n"
        "from dedup.config import FingerprintConfig\n"
        "from dedup.fingerprint import fingerprint\n"
        f"data = open({str(blob)!r}, 'rb').read()[1:]  # byte 0 chose the fuzz target\n"
        "f, _ = fingerprint(data, FingerprintConfig())\n"
        "print(f.status, f.error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("failed GIF frame declares more than fingerprint.max_pixels"), out.stdout
