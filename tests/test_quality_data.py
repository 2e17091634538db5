"""bench/quality_data.py: the edit functions, mock-up scenes, copy counts and the labels contract,
on generated images (no package is fetched)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_data as qd  # noqa: E402


def _picture(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A busy generated picture: gradient, random rectangles and circles."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.uint8)
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(10, 90)), y0 + int(rng.integers(10, 70)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    return img


COPY_EDITS = [e for e in qd.EDITS if e not in ("original", "exact")]


@pytest.mark.parametrize("edit", COPY_EDITS)
def test_edit_runs_and_is_deterministic(edit: str) -> None:
    img = _picture(1)
    a = qd.apply_edit(edit, img, np.random.default_rng(7))
    b = qd.apply_edit(edit, img, np.random.default_rng(7))
    assert isinstance(a.image, Image.Image) and a.image.mode in ("RGB", "L")
    assert min(a.image.size) >= 8 and a.detail
    assert a.detail == b.detail
    assert qd.encode(a.image, a.fmt or "jpg", a.quality or 90) == qd.encode(b.image, b.fmt or "jpg", b.quality or 90)
    if edit not in ("jpeg",):  # every other edit changes the pixels
        assert a.image.size != img.size or a.image.mode != "RGB" or np.any(np.asarray(a.image) != np.asarray(img))


def test_edit_parameters_in_range() -> None:
    img = _picture(2, (400, 300))
    for s in range(20):
        rng = np.random.default_rng(s)
        c = qd.edit_crop(img, rng)
        frac = c.image.width * c.image.height / (400 * 300)
        assert 0.48 <= frac <= 0.92, frac
        j = qd.edit_jpeg(img, np.random.default_rng(s))
        assert j.fmt == "jpg" and 30 <= (j.quality or 0) <= 70
        r = qd.edit_rotate90(img, np.random.default_rng(s))
        assert sorted(r.image.size) == [300, 400]
    assert qd.edit_grayscale(img, np.random.default_rng(0)).image.mode == "L"


def test_partial_scene_contains_the_original() -> None:
    img = _picture(3, (300, 200))
    for s in range(6):
        tpl = qd.make_template(np.random.default_rng(s), s, warp=False)
        tpl.shadow = (0, 0, 0, 0.0)
        scene, detail, box = qd.render_scene(img, tpl)
        assert scene.size == (tpl.background.shape[1], tpl.background.shape[0])
        area = (box[2] - box[0]) * (box[3] - box[1]) / (scene.width * scene.height)
        assert 0.15 <= area <= 0.62, (area, detail)
        assert scene.width * scene.height > 1.6 * (box[2] - box[0]) * (box[3] - box[1])
        region = np.asarray(scene.crop(box).resize(img.size, Image.Resampling.BILINEAR), dtype=np.float32)
        diff = np.abs(region - np.asarray(img, dtype=np.float32)).mean()
        assert diff < 12, diff  # the picture is there, only resampled
        assert detail.startswith("partial ") and f"t{s} " in detail


def test_templates_are_shared_between_different_pictures() -> None:
    tpl = qd.make_template(np.random.default_rng(5), 5, warp=True, backgrounds=[_picture(9, (640, 480))])
    s1, _, b1 = qd.render_scene(_picture(10), tpl)
    s2, _, b2 = qd.render_scene(_picture(11), tpl)
    a1, a2 = np.asarray(s1, dtype=np.int16), np.asarray(s2, dtype=np.int16)
    assert b1 == b2  # same placement, same aspect
    mask = np.ones(a1.shape[:2], bool)
    x0, y0, x1, y1 = tpl.slot
    m = 80  # frame, shadow and warp stay near the slot
    mask[max(0, b1[1] - m) : b1[3] + m, max(0, b1[0] - m) : b1[2] + m] = False
    assert (a1[mask] == a2[mask]).all()  # the same background around the picture
    assert np.abs(a1[b1[1] + 10 : b1[3] - 10, b1[0] + 10 : b1[2] - 10] - a2[b1[1] + 10 : b1[3] - 10, b1[0] + 10 : b1[2] - 10]).mean() > 20


def test_copy_counts_are_heavy_tailed_and_seeded() -> None:
    c = qd._copy_counts(3000, np.random.default_rng(0))
    assert (c == qd._copy_counts(3000, np.random.default_rng(0))).all()
    assert 0.65 <= (c == 0).mean() <= 0.75
    assert ((c >= 1) & (c <= 3)).sum() > 5 * ((c >= 4) & (c < 20)).sum()
    assert (c >= 20).sum() >= 2 and c.max() <= 50


def test_exact_copies() -> None:
    img = _picture(4)
    data = qd.encode(img, "jpg", 90)
    job = {"seed": 0, "uid": "u1", "edit": "exact", "orig": data, "orig_ext": "jpg", "byte_copy": True}
    out, ext, detail = qd._copy_job(job)
    assert out == data and ext == "jpg" and detail == "exact byte copy"
    out, ext, detail = qd._copy_job({**job, "byte_copy": False})
    assert out != data and ext in ("png", "webp") and detail.startswith("exact pixels")
    assert (np.asarray(qd.decode(out)) == np.asarray(qd.decode(data))).all()


def test_labels_contract(tmp_path: Path) -> None:
    """write_dataset + check on a tiny hand-made set: columns, dtypes, consistency."""
    import pandas as pd

    rows = []
    for g in range(3):
        img = _picture(20 + g, (160, 120))
        rows.append({"file": f"{qd._h(0, g)[:16]}.jpg", "group": g, "edit": "original", "edit_detail": "original",
                     "source": "photo", "lookalike_of": (g + 1) % 3 if g == 0 else -1, "_data": qd.encode(img, "jpg")})
        for k, edit in enumerate(("flip", "partial")):
            e = qd.apply_edit(edit, img, np.random.default_rng(g * 10 + k))
            rows.append({"file": f"{qd._h(1, g, k)[:16]}.webp", "group": g, "edit": edit, "edit_detail": e.detail,
                         "source": "photo", "lookalike_of": -1, "_data": qd.encode(_rgb(e.image), "webp", 80)})
    out = tmp_path / "q"
    df = qd.write_dataset(out, rows, lambda d: {"images": len(d)})
    got = pd.read_parquet(out / "labels.parquet")
    assert list(got.columns) == list(qd.LABEL_COLUMNS) == ["file", "group", "edit", "edit_detail", "source", "lookalike_of"]
    assert got.group.dtype == np.int64 and got.lookalike_of.dtype == np.int64
    assert got.file.tolist() == sorted(got.file) and len(got) == 9 == len(df)
    assert sorted(p.name for p in (out / "images").iterdir()) == got.file.tolist()
    for f in got.file:
        Image.open(io.BytesIO((out / "images" / f).read_bytes())).verify()
    # a broken set fails the self-check
    (out / "images" / got.file[0]).unlink()
    with pytest.raises(AssertionError):
        qd.check(out)


def _rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")
