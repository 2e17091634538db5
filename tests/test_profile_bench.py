"""bench/profile_stage.py prints its per-step table (the hash path, a few generated images)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from _data import encode_jpeg, natural_image

_BENCH = str(Path(__file__).resolve().parents[1] / "bench")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

import profile_stage  # noqa: E402


def test_profile_prints_every_step_of_the_hash_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(6):
        (images / f"{seed}.jpg").write_bytes(encode_jpeg(natural_image(seed, (320, 240))))
    natural_image(9).save(images / "9.png")
    assert profile_stage.main(["--data", str(tmp_path), "--model", "none", "--rounds", "1", "--chunk", "3"]) == 0
    out = capsys.readouterr().out
    assert "7 images" in out
    rows = {name: value for name, value in (m.groups()[:2] for m in re.finditer(r"^\| ([^|]+?) \| ([0-9.]+|off) \|", out, re.M))}
    for step in ("read (file bytes)", "decode (RGB, full size)", "PDQ, 8 orientations",
                 "**whole step (FeatureStep, 1 thread)**", "bare Pillow decode, full size"):
        assert step in rows and float(rows[step]) > 0, step
    assert rows["pHash"] == "off" and rows["model"] == "off"  # off in the preset: not timed
    assert rows["SHA-256 of the pixels"] == "off"  # PDQ on: hashed in the global stage, where needed (dedup.pixels)


def test_profile_pixels_rereads_only_pixel_twins_of_other_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from PIL import Image

    import profile_pixels

    images = tmp_path / "images"
    images.mkdir()
    for seed in range(5):
        (images / f"{seed}.jpg").write_bytes(encode_jpeg(natural_image(seed, (160, 120))))
    # the PNG of a JPEG's decoded pixels: a pixel twin in another format
    Image.open(io.BytesIO((images / "0.jpg").read_bytes())).convert("RGB").save(images / "0-as.png")
    assert profile_pixels.main(["--data", str(tmp_path), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 rows, 2 re-read" in out and "2 pixel-hashed" in out


def test_profile_says_how_to_build_the_bench_when_it_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="quality_data.py"):
        profile_stage.main(["--data", str(tmp_path / "nowhere"), "--model", "none"])
