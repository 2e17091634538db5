"""bench/quality_v2.py: the hard edits, the template's paste size and the distractor join, on
generated images (no package is fetched)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_v2 as v2  # noqa: E402
from test_quality_data import _picture  # noqa: E402


@pytest.mark.parametrize("edit", sorted(v2._EDITS))
def test_hard_edit_is_deterministic(edit: str) -> None:
    img = _picture(3)
    a = v2._EDITS[edit](img, np.random.default_rng(5))
    b = v2._EDITS[edit](img, np.random.default_rng(5))
    assert a.detail == b.detail
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_crops_reach_a_quarter_of_the_area() -> None:
    img = _picture(4, (400, 300))
    areas = [float(re.search(r"crop (\d\.\d\d)", v2.edit_crop(img, np.random.default_rng(s)).detail).group(1)) for s in range(200)]
    assert min(areas) < 0.35 and max(areas) > 0.8 and min(areas) >= 0.2


def test_text_covers_up_to_a_third() -> None:
    img = _picture(5, (400, 300))
    covers = [float(re.search(r"(\d\.\d\d) of the image", v2.edit_text(img, np.random.default_rng(s)).detail).group(1)) for s in range(100)]
    assert max(covers) > 0.25 and max(covers) <= 0.34


def test_pastes_cover_8_to_35_percent_of_the_scene() -> None:
    bg = _picture(6, (1200, 900))
    areas = []
    for s in range(30):
        rng = np.random.default_rng(s)
        t = v2.make_template(rng, s, [bg])
        e = v2.edit_partial(_picture(s, (300, 240)), rng, t)
        areas.append(float(re.search(r"partial (\d\.\d\d) area", e.detail).group(1)))
    assert min(areas) < 0.15 and max(areas) <= 0.36 and min(areas) >= 0.05


def test_collage_holds_the_picture_among_others() -> None:
    others = [_picture(10 + k) for k in range(3)]
    e = v2.edit_collage(_picture(9), np.random.default_rng(1), others)
    assert e.detail.startswith("collage of 4")
    assert e.image.width >= 512


def test_with_distractors_adds_singletons(tmp_path: Path) -> None:
    test, dis = tmp_path / "test", tmp_path / "dis"
    (test / "images").mkdir(parents=True)
    (dis / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        _picture(1).save(test / "images" / name)
    pq.write_table(pa.table({
        "file": ["a.jpg", "b.jpg"], "group": pa.array([0, 0], pa.int64()), "edit": ["original", "crop"],
        "edit_detail": ["", ""], "source": ["photo", "photo"], "lookalike_of": pa.array([-1, -1], pa.int64()),
        "collection": ["x", "x"], "split": ["test", "test"],
    }), test / "labels.parquet")
    names = [(f"d{k}.jpg", f"crop/{k}") for k in range(3)]
    for k, (nm, _) in enumerate(names):
        Image.new("RGB", (64, 64), (40 * k, 0, 0)).save(dis / "images" / nm)
    (dis / "order.json").write_text(json.dumps(names))
    out = v2.with_distractors(test, dis, 2, tmp_path / "joined")
    t = pq.read_table(out / "labels.parquet").to_pylist()
    assert [r["file"] for r in t] == ["a.jpg", "b.jpg", "d0.jpg", "d1.jpg"]
    assert len({r["group"] for r in t}) == 3 and all(r["edit"] == "original" for r in t[2:])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.jpg", "b.jpg", "d0.jpg", "d1.jpg"]
    with pytest.raises(SystemExit):
        v2.with_distractors(test, dis, 5, tmp_path / "joined")
