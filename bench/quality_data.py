"""Build a labelled detection-quality benchmark: distinct originals, edited copies, hard negatives.

Usage::

    python bench/quality_data.py --out bench/data/quality [--n-clip 1500] [--n-photo 600] [--seed 0] [--rebuild]

or ``build(out_dir, n_clip=..., n_photo=..., seed=..., rebuild=False) -> Path``.

Output (a contract: ``bench/quality.py`` reads it)::

    OUT/images/<16 hex>.<jpg|png|webp>   one flat folder; names are hashes and reveal nothing
    OUT/labels.parquet                   file, group, edit, edit_detail, source, lookalike_of
    OUT/meta.json                        seed, counts, packages and versions, licence notes

Construction
------------
* **Originals.** ``n_clip`` openclipart drawings picked by :func:`realdata.distinct_originals`
  (pairwise distinct, one per name family), composited on white and stored as JPEG q=90 at
  <= 512 px exactly like :func:`realdata.clipart_jpeg` (a few as PNG or WebP, as web data has);
  plus ``n_photo`` photographs: non-overlapping crops (384-640 px wide, 12-32 px apart) cut on a
  grid from the real photographs among Debian's wallpaper packages (``mate-backgrounds``,
  ``plasma-workspace-wallpapers``, ``lomiri-wallpapers-16.04``, ``lomiri-wallpapers-20.04``),
  fetched with ``apt-get download`` and cached under ``bench/data/photos``. Renders and
  gradients are left out by name (:data:`PHOTO_FILES` lists the photographs kept) and flat crops
  (sky, bokeh) by a detail statistic. A few photographs are held back as mock-up backgrounds
  only (:data:`BACKGROUND_FILES`), together with wall textures from ``gnome-backgrounds``, so
  that no background is itself an original.
  Looked at and not used: ``ukui-wallpapers`` and ``gnome-backgrounds`` 43 (renders and
  gradients only; three GNOME textures serve as walls), ``sway-backgrounds`` (renders). A
  package apt cannot get is skipped with a warning and listed in ``meta.json``.
* **Copies.** Heavy-tailed like LAION: ~67% of originals have none, most others 1-3, ~3% 4-10
  and ~0.5% (at least two) 20-50. Each copy is one edit of the original's published file
  (decoded): exact (byte copy or pixel-identical re-encode), resize, jpeg, crop, pad, text,
  watermark, color, grayscale, flip, rotate90, rotate, combo (2-3 chained) and partial (the
  original framed in a larger mock-up scene: wall or blurred-photo background, frame, mat,
  drop shadow, optional perspective warp; 20-60% of the scene). Shares: :data:`EDIT_SHARES`.
* **Hard negatives** (different images that look alike; ``lookalike_of`` = the group they
  resemble): (a) adjacent crops of one wallpaper (every crop is one; ``lookalike_of`` is set
  on ~30% of the photo originals, pointing at the right or lower neighbour), (b) openclipart drawings of the same family
  that pass ``distinct_originals``' distinctness tests against every original, (c) mock-up scenes
  sharing a template (background + frame + placement) but holding different pictures -- both the
  partial copies of different groups that share a template and extra scenes built around
  drawings that are not otherwise in the set, (d) one photo background with different large
  drawings pasted on it (``source`` photo). The extra originals made for (b)-(d) have no copies
  and an ``edit_detail`` starting with ``hardneg``.

Everything is seeded: the same seed (and the same packages, Pillow and libjpeg/libwebp) gives
byte-identical files and labels.

Licences: openclipart is public domain. The photographs are under the licences stated per file in
each package's ``copyright`` file (GPL-2+ for the MATE and Plasma wallpapers, CC-BY-4.0 /
CC-BY-SA-3.0 / CC-BY-SA-4.0 / CC0 for the Lomiri ones, GPL-2+ for the GNOME textures);
``meta.json`` lists each one used with its author and licence. The data are for local
benchmarking and are never committed (``bench/data/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realdata  # noqa: E402

__all__ = [
    "EDITS",
    "EDIT_SHARES",
    "LABEL_COLUMNS",
    "Template",
    "apply_edit",
    "build",
    "make_template",
    "render_scene",
]

HERE = Path(__file__).resolve().parent
PHOTO_CACHE = HERE / "data" / "photos"
LABEL_COLUMNS = ("file", "group", "edit", "edit_detail", "source", "lookalike_of")
EDITS = (
    "original",
    "exact",
    "resize",
    "jpeg",
    "crop",
    "pad",
    "text",
    "watermark",
    "color",
    "grayscale",
    "flip",
    "rotate90",
    "rotate",
    "combo",
    "partial",
)
EDIT_SHARES: dict[str, float] = {
    "exact": 0.09,
    "resize": 0.09,
    "jpeg": 0.09,
    "crop": 0.11,
    "pad": 0.06,
    "text": 0.07,
    "watermark": 0.06,
    "color": 0.08,
    "grayscale": 0.04,
    "flip": 0.05,
    "rotate90": 0.03,
    "rotate": 0.05,
    "combo": 0.08,
    "partial": 0.10,
}
"""Share of each edit among the copies (sums to 1)."""

# Photographs kept as originals, by package: globs under the unpacked package root.
PHOTO_FILES: dict[str, list[str]] = {
    "mate-backgrounds": [
        f"usr/share/backgrounds/mate/nature/{n}.jpg"
        for n in (
            "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird",
            "RainDrops", "Storm", "TwoWings", "YellowFlower",
        )
    ],
    "plasma-workspace-wallpapers": [
        f"usr/share/wallpapers/{n}/contents/images/*"
        for n in (
            "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
            "Grey", "OneStandsOut", "Path", "summer_1am",
        )
    ],
    "lomiri-wallpapers-16.04": [
        f"usr/share/backgrounds/{n}.jpg"
        for n in (
            "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
            "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "friends_by_Aitzol_Berasategi",
            "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
            "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
            "sunset_by_Aitzol_Berasategi",
        )
    ],
    "lomiri-wallpapers-20.04": [
        "usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",
        "usr/share/backgrounds/Infinite-Sea_by_Aury88.jpg",
    ],
}
# Held back for mock-up backgrounds only (never originals): photographs and wall textures.
BACKGROUND_FILES: dict[str, list[str]] = {
    "mate-backgrounds": ["usr/share/backgrounds/mate/nature/Wood.jpg"],
    "plasma-workspace-wallpapers": ["usr/share/wallpapers/Kite/contents/images/*"],
    "lomiri-wallpapers-16.04": [
        "usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
        "usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg",
    ],
    "gnome-backgrounds": [
        "usr/share/backgrounds/gnome/wood-l.webp",
        "usr/share/backgrounds/gnome/symbolic-l.webp",
        "usr/share/backgrounds/gnome/symbolic-d.webp",
    ],
}
_PHOTO_MAX_SIDE = 6144  # wallpapers are downscaled to this long side before cropping
_MIN_STD, _MIN_GRAD = 14.0, 1.0  # a crop flatter than this (grey std, mean |gradient|) is skipped

_WORDS = (
    "best summer ever when you finally find it classic vintage style new arrival free shipping "
    "wall art print home decor look at this how it started limited edition sale today only "
    "the original made with love daily inspiration nature lovers follow for more"
).split()


# --------------------------------------------------------------------------------------------
# small deterministic helpers


def _h(*keys: object) -> str:
    return hashlib.sha256(":".join(map(str, keys)).encode()).hexdigest()


def _u(*keys: object) -> float:
    """A uniform number in [0, 1) fixed by ``keys``."""
    return int(_h(*keys)[:13], 16) / 16**13


def _rng(*keys: object) -> np.random.Generator:
    return np.random.default_rng(int(_h(*keys)[:16], 16))


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """``img`` as ``jpg`` / ``png`` / ``webp`` (lossy at ``quality``) / ``webpll`` (lossless) bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=int(quality))
    elif fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=int(quality), method=4)
    elif fmt == "webpll":
        img.save(buf, format="WEBP", lossless=True, quality=80, method=4)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, int(size)))


def _words(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), int(rng.integers(lo, hi + 1))))


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


# --------------------------------------------------------------------------------------------
# edits: each takes an RGB image and a numpy Generator, returns (image, detail[, enc hints])


@dataclasses.dataclass
class Edited:
    image: Image.Image
    detail: str
    fmt: str | None = None  # forced output format
    quality: int | None = None  # forced JPEG/WebP quality


def edit_resize(img: Image.Image, rng: np.random.Generator) -> Edited:
    f = float(rng.uniform(0.3, 0.8)) if rng.random() < 0.75 else float(rng.uniform(1.2, 2.0))
    f = min(f, 1024 / max(img.size))
    size = (max(16, round(img.width * f)), max(16, round(img.height * f)))
    method = [Image.Resampling.LANCZOS, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC][int(rng.integers(3))]
    return Edited(img.resize(size, method), f"resize {f:.2f}x")


def edit_jpeg(img: Image.Image, rng: np.random.Generator) -> Edited:
    q = int(rng.integers(30, 71))
    return Edited(img, f"jpeg q={q}", fmt="jpg", quality=q)


def edit_crop(img: Image.Image, rng: np.random.Generator) -> Edited:
    area = float(rng.uniform(0.5, 0.9))
    fw = min(1.0, math.sqrt(area) * math.exp(float(rng.uniform(-0.2, 0.2))))
    fh = min(1.0, area / fw)
    fw = area / fh
    w, h = max(8, round(img.width * fw)), max(8, round(img.height * fh))
    x0 = int(rng.integers(0, img.width - w + 1))
    y0 = int(rng.integers(0, img.height - h + 1))
    return Edited(img.crop((x0, y0, x0 + w, y0 + h)), f"crop {w * h / (img.width * img.height):.2f} area")


_ASPECTS = {"1:1": 1.0, "16:9": 16 / 9, "9:16": 9 / 16, "4:3": 4 / 3, "3:4": 3 / 4, "2:1": 2.0}


def edit_pad(img: Image.Image, rng: np.random.Generator) -> Edited:
    cur = img.width / img.height
    names = [n for n, a in _ASPECTS.items() if abs(math.log(a / cur)) > 0.15]
    name = names[int(rng.integers(len(names)))]
    a = _ASPECTS[name]
    if a > cur:
        size = (round(img.height * a), img.height)
    else:
        size = (img.width, round(img.width / a))
    if rng.random() < 0.5:
        kind = "blur"
        canvas = img.resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(max(size) / 25))
    else:
        colors = {"black": (0, 0, 0), "white": (255, 255, 255)}
        kind = ["black", "white", "colour"][int(rng.integers(3))]
        fill = colors.get(kind) or tuple(int(c) for c in rng.integers(0, 256, 3))
        canvas = Image.new("RGB", size, fill)
    canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return Edited(canvas, f"pad to {name} {kind}")


def _draw_centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font: Any, **kw: Any) -> None:
    l, t, r, b = draw.textbbox((0, 0), text, font=font, stroke_width=kw.get("stroke_width", 0))
    x = box[0] + (box[2] - box[0] - (r - l)) // 2 - l
    y = box[1] + (box[3] - box[1] - (b - t)) // 2 - t
    draw.text((x, y), text, font=font, **kw)


def _fit_font(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> Any:
    while size > 9:
        font = _font(size)
        l, _, r, _ = draw.textbbox((0, 0), text, font=font)
        if r - l <= width:
            return font
        size = int(size * 0.85)
    return _font(9)


def edit_text(img: Image.Image, rng: np.random.Generator) -> Edited:
    img = _rgb(img)
    text = _words(rng, 2, 6)
    if rng.random() < 0.5:  # caption bar added above or below
        where = "bottom" if rng.random() < 0.6 else "top"
        bar = max(24, round(img.height * float(rng.uniform(0.12, 0.22))))
        dark = rng.random() < 0.4
        canvas = Image.new("RGB", (img.width, img.height + bar), (20, 20, 20) if dark else (255, 255, 255))
        canvas.paste(img, (0, 0 if where == "bottom" else bar))
        draw = ImageDraw.Draw(canvas)
        y0 = img.height if where == "bottom" else 0
        font = _fit_font(draw, text, int(img.width * 0.92), int(bar * 0.55))
        _draw_centered(draw, (0, y0, img.width, y0 + bar), text, font, fill=(255, 255, 255) if dark else (0, 0, 0))
        return Edited(canvas, f"text caption-bar {where}")
    out = img.copy()  # meme text on the picture, white with a black outline
    draw = ImageDraw.Draw(out)
    parts = ["top", "bottom"] if rng.random() < 0.5 else [["top", "bottom"][int(rng.integers(2))]]
    size = int(img.height * float(rng.uniform(0.08, 0.14)))
    for where in parts:
        t = text.upper() if where == "top" else _words(rng, 2, 5).upper()
        font = _fit_font(draw, t, int(img.width * 0.94), size)
        band = int(img.height * 0.2)
        box = (0, 0, img.width, band) if where == "top" else (0, img.height - band, img.width, img.height)
        _draw_centered(draw, box, t, font, fill=(255, 255, 255), stroke_width=max(1, size // 14), stroke_fill=(0, 0, 0))
    return Edited(out, f"text meme {'+'.join(parts)}")


def edit_watermark(img: Image.Image, rng: np.random.Generator) -> Edited:
    base = _rgb(img).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    alpha = int(rng.uniform(0.25, 0.5) * 255)
    colour = (255, 255, 255) if rng.random() < 0.6 else (0, 0, 0)
    brand = ["(c) stockpix", "SAMPLE", "picshare.example", "PREVIEW", "@artlover", "dreamstock"][int(rng.integers(6))]
    if rng.random() < 0.5:
        kind = "tiled"
        font = _font(max(12, base.height // 12))
        l, t, r, b = draw.textbbox((0, 0), brand, font=font)
        tw, th = r - l + 30, (b - t) * 3
        big = Image.new("RGBA", (base.width * 2, base.height * 2), (0, 0, 0, 0))
        bd = ImageDraw.Draw(big)
        for yy in range(0, big.height, th):
            for xx in range(-(yy // th % 2) * tw // 2, big.width, tw):
                bd.text((xx, yy), brand, font=font, fill=(*colour, alpha))
        big = big.rotate(float(rng.uniform(20, 40)), resample=Image.Resampling.BILINEAR)
        layer = big.crop((base.width // 2, base.height // 2, base.width // 2 + base.width, base.height // 2 + base.height))
    else:
        kind = "corner"
        s = max(16, int(min(base.size) * float(rng.uniform(0.1, 0.18))))
        font = _font(int(s * 0.6))
        l, t, r, b = draw.textbbox((0, 0), brand, font=font)
        w = s + 6 + (r - l)
        corner = int(rng.integers(4))
        m = max(4, s // 4)
        x = m if corner in (0, 2) else base.width - w - m
        y = m if corner in (0, 1) else base.height - s - m
        draw.ellipse((x, y, x + s, y + s), outline=(*colour, alpha), width=max(2, s // 8))
        draw.text((x + s + 6, y + (s - (b - t)) // 2 - t), brand, font=font, fill=(*colour, min(255, alpha + 40)))
    return Edited(Image.alpha_composite(base, layer).convert("RGB"), f"watermark {kind} a={alpha / 255:.2f}")


def edit_color(img: Image.Image, rng: np.random.Generator) -> Edited:
    img = _rgb(img)
    hue = int(rng.integers(-25, 26))
    sat, con, bri = (float(rng.uniform(lo, hi)) for lo, hi in ((0.5, 1.6), (0.65, 1.4), (0.7, 1.3)))
    if hue:
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + hue) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    img = ImageEnhance.Color(img).enhance(sat)
    img = ImageEnhance.Contrast(img).enhance(con)
    img = ImageEnhance.Brightness(img).enhance(bri)
    return Edited(img, f"color h{hue:+d} s{sat:.2f} c{con:.2f} b{bri:.2f}")


def edit_grayscale(img: Image.Image, rng: np.random.Generator) -> Edited:
    return Edited(img.convert("L"), "grayscale")


def edit_flip(img: Image.Image, rng: np.random.Generator) -> Edited:
    if rng.random() < 0.8:
        return Edited(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "flip horizontal")
    return Edited(img.transpose(Image.Transpose.FLIP_TOP_BOTTOM), "flip vertical")


def edit_rotate90(img: Image.Image, rng: np.random.Generator) -> Edited:
    k = int(rng.integers(1, 4))
    t = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}[k]
    return Edited(img.transpose(t), f"rotate90 {90 * k}")


def edit_rotate(img: Image.Image, rng: np.random.Generator) -> Edited:
    img = _rgb(img)
    angle = float(rng.uniform(3, 15)) * (1 if rng.random() < 0.5 else -1)
    if rng.random() < 0.5:
        fill = [(255, 255, 255), (0, 0, 0)][int(rng.integers(2))]
        return Edited(img.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=fill), f"rotate {angle:+.1f} fill")
    rot = img.rotate(angle, Image.Resampling.BICUBIC, expand=False)
    # largest axis-aligned rectangle inside the rotated image (same centre)
    w, h, a = img.width, img.height, math.radians(abs(angle))
    sin, cos = math.sin(a), math.cos(a)
    long_, short = max(w, h), min(w, h)
    if short <= 2 * sin * cos * long_:
        x = 0.5 * short
        wr, hr = (x / sin, x / cos) if w >= h else (x / cos, x / sin)
    else:
        c2 = cos * cos - sin * sin
        wr, hr = (w * cos - h * sin) / c2, (h * cos - w * sin) / c2
    wr, hr = int(wr) - 2, int(hr) - 2
    box = ((w - wr) // 2, (h - hr) // 2, (w - wr) // 2 + wr, (h - hr) // 2 + hr)
    return Edited(rot.crop(box), f"rotate {angle:+.1f} crop")


_COMBO_PARTS = ("resize", "crop", "pad", "text", "watermark", "color", "grayscale", "flip", "rotate", "jpeg")


def edit_combo(img: Image.Image, rng: np.random.Generator) -> Edited:
    k = int(rng.integers(2, 4))
    parts = [str(p) for p in rng.choice(_COMBO_PARTS, size=k, replace=False)]
    if "jpeg" in parts:  # recompression comes last, as on the web
        parts = [p for p in parts if p != "jpeg"] + ["jpeg"]
    details, fmt, q = [], None, None
    for p in parts:
        e = _EDIT_FUNCS[p](img, rng)
        img, fmt, q = e.image, e.fmt or fmt, e.quality or q
        details.append(e.detail)
    return Edited(img, "+".join(parts) + ": " + "; ".join(details), fmt=fmt, quality=q)


# --------------------------------------------------------------------------------------------
# mock-up scenes ("Canvas Wall Art Print"): a template = background + slot + frame + shadow + warp


@dataclasses.dataclass
class Template:
    tid: int
    background: np.ndarray  # (H, W, 3) uint8: the whole scene without the picture
    slot: tuple[int, int, int, int]  # x0, y0, x1, y1: the framed picture is centred on it
    frame: int  # frame width in px (0: none)
    frame_colour: tuple[int, int, int]
    mat: int  # passe-partout width in px (0: none)
    mat_colour: tuple[int, int, int]
    shadow: tuple[int, int, int, float]  # dx, dy, blur radius, opacity (0 opacity: none)
    warp: tuple[float, ...] | None  # 8 corner offsets as fractions of the framed size, or None
    kind: str  # background kind, for edit_detail
    frac: float = 0.35  # the picture's share of the scene area (less only when its aspect forbids)


def _wall(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """A plain painted wall with soft light, low-frequency blotches and often a floor or skirting."""
    w, h = size
    base = np.array([[236, 230, 218], [245, 245, 242], [205, 200, 195], [222, 228, 232], [214, 196, 170],
                     [180, 190, 175], [60, 64, 70], [196, 160, 140]], dtype=np.float32)[int(rng.integers(8))]
    base = base + rng.normal(0, 6, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = float(rng.uniform(0.2, 0.8)) * w, float(rng.uniform(-0.2, 0.4)) * h
    light = 1.06 - 0.18 * np.sqrt(((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2)
    noise = rng.normal(0, 1, (h // 16 + 2, w // 16 + 2)).astype(np.float32)
    blot = np.asarray(Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    img = base[None, None, :] * light[..., None] + 3.0 * blot[..., None] + rng.normal(0, 2.0, (h, w, 1)).astype(np.float32)
    kind = "wall"
    if rng.random() < 0.6:
        fy = int(h * float(rng.uniform(0.78, 0.9)))
        floor = np.array([[120, 84, 52], [150, 112, 76], [90, 90, 95], [200, 190, 175]], dtype=np.float32)[int(rng.integers(4))]
        stripes = 8.0 * np.sin(xx[fy:] / float(rng.uniform(6, 20)) + 3 * blot[fy:] / 10)
        img[fy:] = floor[None, None, :] + stripes[..., None] + rng.normal(0, 3, (h - fy, w, 1))
        img[fy : fy + max(3, h // 80)] = 245
        kind = "wall+floor"
    return np.clip(img, 0, 255).astype(np.uint8), kind


def make_template(
    rng: np.random.Generator,
    tid: int = 0,
    *,
    backgrounds: Sequence[Image.Image] = (),
    size: tuple[int, int] | None = None,
    warp: bool | None = None,
) -> Template:
    """A random mock-up template. Background: a painted wall (with floor), or a crop of one of
    ``backgrounds`` (blurred like a shallow-focus room photo), or a texture used as is."""
    if size is None:
        long_ = int(rng.integers(800, 1025))
        aspect = [4 / 3, 3 / 2, 1.0, 16 / 9, 3 / 4][int(rng.integers(5))]
        size = (long_, round(long_ / aspect)) if aspect >= 1 else (round(long_ * aspect), long_)
    w, h = size
    if backgrounds and rng.random() < 0.55:
        src = backgrounds[int(rng.integers(len(backgrounds)))]
        scale = max(w / src.width, h / src.height) * float(rng.uniform(1.0, 1.6))
        sw, sh = max(w, round(src.width * scale)), max(h, round(src.height * scale))
        x0, y0 = int(rng.integers(0, sw - w + 1)), int(rng.integers(0, sh - h + 1))
        # crop first in source coordinates (cheap), then resize
        # (clamped: sw, sh are rounded, so the far edge can overshoot the source by a fraction)
        box = (x0 / scale, y0 / scale, min(src.width, (x0 + w) / scale), min(src.height, (y0 + h) / scale))
        bg = src.resize((w, h), Image.Resampling.BILINEAR, box=box)
        blur = float(rng.choice([0.0, 2.0, 4.0, 8.0]))
        if blur:
            bg = bg.filter(ImageFilter.GaussianBlur(blur))
        background, kind = np.asarray(_rgb(bg)), f"photo-blur{blur:g}"
    else:
        background, kind = _wall(rng, size)
    frac = float(rng.uniform(0.22, 0.58))  # picture area / scene area
    sa = float(rng.uniform(0.75, 1.33))
    sw = min(int(w * 0.9), round(math.sqrt(frac * w * h * sa)))
    sh = min(int(h * 0.9), round(frac * w * h / sw))
    x0 = int(rng.integers(int(w * 0.05), max(int(w * 0.05) + 1, w - sw - int(w * 0.05))))
    y0 = int(rng.integers(int(h * 0.04), max(int(h * 0.04) + 1, h - sh - int(h * 0.15))))
    frame = int(rng.integers(0, 3)) * max(4, min(sw, sh) // 30)
    frame_colour = [(20, 20, 20), (240, 240, 240), (120, 80, 40), (190, 160, 90), (70, 45, 30)][int(rng.integers(5))]
    mat = max(6, min(sw, sh) // 14) if rng.random() < 0.3 else 0
    mat_colour = [(250, 250, 248), (240, 236, 225)][int(rng.integers(2))]
    shadow = (int(rng.integers(-6, 14)), int(rng.integers(4, 16)), int(rng.integers(4, 14)), float(rng.uniform(0.3, 0.6)))
    if rng.random() < 0.15:
        shadow = (0, 0, 0, 0.0)
    if warp is None:
        warp = bool(rng.random() < 0.5)
    warp_t = tuple(float(v) for v in rng.uniform(-0.06, 0.06, 8)) if warp else None
    return Template(tid, background, (x0, y0, x0 + sw, y0 + sh), frame, frame_colour, mat, mat_colour, shadow, warp_t, kind, frac)


def render_scene(img: Image.Image, tpl: Template) -> tuple[Image.Image, str, tuple[int, int, int, int]]:
    """Put ``img`` into the template: returns (scene, detail, box of the picture before warping).

    The picture keeps its aspect and covers ``tpl.frac`` of the scene (less where its aspect
    would not fit), framed, centred on the template's slot (moved inwards to stay inside)."""
    img = _rgb(img)
    scene = Image.fromarray(tpl.background).convert("RGBA")
    x0, y0, x1, y1 = tpl.slot
    border = tpl.frame + tpl.mat
    sw_, sh_ = scene.size
    area = tpl.frac * sw_ * sh_
    pw_f = math.sqrt(area * img.width / img.height)
    ph_f = area / pw_f
    s = min(1.0, (0.94 * sw_ - 2 * border) / pw_f, (0.9 * sh_ - 2 * border) / ph_f)
    pw, ph = max(8, round(pw_f * s)), max(8, round(ph_f * s))
    fw, fh = pw + 2 * border, ph + 2 * border
    framed = Image.new("RGB", (fw, fh), tpl.frame_colour)
    if tpl.mat:
        framed.paste(Image.new("RGB", (pw + 2 * tpl.mat, ph + 2 * tpl.mat), tpl.mat_colour), (tpl.frame, tpl.frame))
    if tpl.frame:  # a bevel line so the frame reads as a frame
        d = ImageDraw.Draw(framed)
        d.rectangle((0, 0, fw - 1, fh - 1), outline=tuple(max(0, c - 40) for c in tpl.frame_colour), width=max(1, tpl.frame // 4))
    framed.paste(img.resize((pw, ph), Image.Resampling.LANCZOS), (border, border))
    fx = min(max((x0 + x1 - fw) // 2, int(0.03 * sw_)), sw_ - fw - int(0.03 * sw_))
    fy = min(max((y0 + y1 - fh) // 2, int(0.03 * sh_)), sh_ - fh - int(0.05 * sh_))
    box = (fx + border, fy + border, fx + border + pw, fy + border + ph)
    rgba = framed.convert("RGBA")
    pos = (fx, fy)
    if tpl.warp is not None:
        import cv2

        src = np.float32([[0, 0], [fw, 0], [fw, fh], [0, fh]])
        dst = src + np.float32(tpl.warp).reshape(4, 2) * np.float32([fw, fh])
        dst -= dst.min(axis=0)
        ow, oh = int(math.ceil(dst[:, 0].max())) + 1, int(math.ceil(dst[:, 1].max())) + 1
        m = cv2.getPerspectiveTransform(src, dst)
        warped = cv2.warpPerspective(np.asarray(rgba), m, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
        rgba = Image.fromarray(warped, "RGBA")
        pos = (fx + (fw - ow) // 2, fy + (fh - oh) // 2)
    dx, dy, blur, opacity = tpl.shadow
    if opacity > 0:
        alpha = rgba.getchannel("A").point(lambda v: int(v * opacity))
        pad = 3 * blur
        sh = Image.new("L", (rgba.width + 2 * pad, rgba.height + 2 * pad), 0)
        sh.paste(alpha, (pad, pad))
        sh = sh.filter(ImageFilter.GaussianBlur(blur))
        dark = Image.new("RGBA", sh.size, (0, 0, 0, 0))
        dark.putalpha(sh)
        _paste_clipped(scene, dark, pos[0] - pad + dx, pos[1] - pad + dy)
    _paste_clipped(scene, rgba, pos[0], pos[1])
    area = pw * ph / (scene.width * scene.height)
    parts = [tpl.kind] + (["frame"] if tpl.frame else []) + (["mat"] if tpl.mat else []) + (["shadow"] if opacity > 0 else []) + (["warp"] if tpl.warp else [])
    detail = f"partial {area:.2f} area in {scene.width}x{scene.height} mock-up t{tpl.tid} {'+'.join(parts)}"
    return scene.convert("RGB"), detail, box


def _paste_clipped(scene: Image.Image, layer: Image.Image, x: int, y: int) -> None:
    sx0, sy0 = max(0, -x), max(0, -y)
    sx1, sy1 = min(layer.width, scene.width - x), min(layer.height, scene.height - y)
    if sx1 <= sx0 or sy1 <= sy0:
        return
    scene.alpha_composite(layer, (x + sx0, y + sy0), (sx0, sy0, sx1, sy1))


def edit_partial(img: Image.Image, rng: np.random.Generator, template: Template | None = None) -> Edited:
    tpl = template if template is not None else make_template(rng)
    scene, detail, _ = render_scene(img, tpl)
    return Edited(scene, detail)


_EDIT_FUNCS: dict[str, Callable[..., Edited]] = {
    "resize": edit_resize,
    "jpeg": edit_jpeg,
    "crop": edit_crop,
    "pad": edit_pad,
    "text": edit_text,
    "watermark": edit_watermark,
    "color": edit_color,
    "grayscale": edit_grayscale,
    "flip": edit_flip,
    "rotate90": edit_rotate90,
    "rotate": edit_rotate,
    "combo": edit_combo,
    "partial": edit_partial,
}


def apply_edit(kind: str, img: Image.Image, rng: np.random.Generator, **kw: Any) -> Edited:
    """Apply the named edit (any of :data:`EDITS` but ``original`` and ``exact``) to any PIL image."""
    return _EDIT_FUNCS[kind](_rgb(img), rng, **kw)


def paste_object(bg: Image.Image, obj: Image.Image, rng: np.random.Generator, frac: float) -> Image.Image:
    """Paste the drawing ``obj`` (on white) onto ``bg`` as a cut-out covering ~``frac`` of it."""
    bg = _rgb(bg).copy()
    obj = _rgb(obj)
    s = math.sqrt(frac * bg.width * bg.height / (obj.width * obj.height))
    s = min(s, 0.95 * bg.width / obj.width, 0.95 * bg.height / obj.height)
    obj = obj.resize((max(8, round(obj.width * s)), max(8, round(obj.height * s))), Image.Resampling.LANCZOS)
    mask = Image.fromarray(((np.asarray(obj.convert("L")) < 245) * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
    x = int(rng.integers(0, bg.width - obj.width + 1))
    y = int(rng.integers(0, bg.height - obj.height + 1))
    bg.paste(obj, (x, y), mask)
    return bg


# --------------------------------------------------------------------------------------------
# sources: openclipart (via realdata) and photographs from Debian wallpaper packages


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)


def fetch_package(package: str, cache: Path = PHOTO_CACHE) -> tuple[Path, str] | None:
    """Unpack ``package`` (``apt-get download``, cached) into ``cache/x/<package>``; returns
    (root, version), or None (with a warning) when apt cannot get it."""
    root = cache / "x" / package
    marker = cache / "x" / f".{package}.complete"
    if not marker.exists():
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            if shutil.which("apt-get") is None:
                print(f"warning: apt-get missing; skipping {package}", file=sys.stderr)
                return None
            res = _run(["apt-get", "download", package], debs)
            if res.returncode != 0 and os.geteuid() == 0 and "Unable to locate" in res.stderr:
                _run(["apt-get", "update"], debs)
                res = _run(["apt-get", "download", package], debs)
            found = sorted(debs.glob(f"{package}_*.deb"))
            if res.returncode != 0 or not found:
                print(f"warning: apt-get download {package} failed, skipping it: {res.stderr.strip()[-300:]}", file=sys.stderr)
                return None
        if root.exists():
            shutil.rmtree(root)
        realdata._unpack_deb(found[-1], root)
        marker.write_text(found[-1].name + "\n")
    deb = marker.read_text().strip()
    version = deb[len(package) + 1 :].rsplit("_", 1)[0].replace("%3a", ":")
    return root, version


def _copyright_notes(root: Path, package: str) -> list[tuple[list[str], str, str]]:
    """(file globs, copyright, licence) stanzas of a DEP-5 ``copyright`` file."""
    path = root / "usr/share/doc" / package / "copyright"
    if not path.exists():
        return []
    out = []
    for para in re.split(r"\n\s*\n", path.read_text(errors="replace")):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                key = m.group(1).lower()
                fields[key] = m.group(2).strip()
            elif key and line.startswith((" ", "\t")):
                fields[key] += " " + line.strip()
        if "files" in fields and "license" in fields:
            out.append((fields["files"].split(), " ".join(fields.get("copyright", "").split()), fields["license"].split(" ")[0]))
    return out


# Packages whose copyright file is not machine-readable: what it says for the files used here.
_FALLBACK_LICENCE = {
    "gnome-backgrounds": (
        "GNOME backgrounds authors (Jakub Steiner et al.)",
        "GPL-2+ (the package licence: these textures are not among the files it lists as CC-BY-SA)",
    ),
}


def _licence_of(notes: list[tuple[list[str], str, str]], file: Path, package: str = "") -> tuple[str, str]:
    best = _FALLBACK_LICENCE.get(package, ("", "unknown (see the package's copyright file)"))
    for globs, cr, lic in notes:
        for g in globs:
            if g.startswith("debian/"):
                continue
            if fnmatch.fnmatch(file.name, Path(g).name) or g == "*":
                best = (cr, lic)
    return best


def _resolve(root: Path, globs: Sequence[str]) -> list[Path]:
    files = []
    for g in globs:
        cands = [p for p in sorted(root.glob(g)) if p.is_file() and not p.is_symlink()]
        if not cands:
            print(f"warning: {g} not found in {root.name}", file=sys.stderr)
            continue
        files.append(max(cands, key=lambda p: p.stat().st_size) if "*" in g else cands[0])
    return files


def _load_wallpaper(path: Path, max_side: int) -> Image.Image:
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (im.width * max_side // max(im.size), im.height * max_side // max(im.size)))
        im.load()
        rgb = im.convert("RGB")
    if max(rgb.size) > max_side:
        s = max_side / max(rgb.size)
        rgb = rgb.resize((round(rgb.width * s), round(rgb.height * s)), Image.Resampling.LANCZOS)
    return rgb


def _detail_stats(a: np.ndarray) -> tuple[float, float]:
    g = a.astype(np.float32).mean(axis=2)[::2, ::2]
    grad = (np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()) / 2
    return float(g.std()), float(grad)


def _photo_candidates(args: tuple[str, int, int]) -> list[dict[str, Any]]:
    """Grid crops of one wallpaper: non-overlapping, 12-32 px apart; JPEG (or a few WebP) bytes."""
    path, widx, seed = args
    img = _load_wallpaper(Path(path), _PHOTO_MAX_SIDE)
    rng = _rng(seed, "wallpaper", Path(path).name)
    cw = int(rng.choice([384, 416, 448, 480, 512, 576, 640]))
    ch = round(cw / float(rng.choice([4 / 3, 3 / 2, 5 / 4, 1.0, 3 / 4])))
    gap = int(rng.integers(12, 33))
    cols, rows = (img.width + gap) // (cw + gap), (img.height + gap) // (ch + gap)
    ox = int(rng.integers(0, img.width - (cols * (cw + gap) - gap) + 1))
    oy = int(rng.integers(0, img.height - (rows * (ch + gap) - gap) + 1))
    a = np.asarray(img)
    out = []
    for r in range(rows):
        for c in range(cols):
            x, y = ox + c * (cw + gap), oy + r * (ch + gap)
            crop = a[y : y + ch, x : x + cw]
            std, grad = _detail_stats(crop)
            if std < _MIN_STD or grad < _MIN_GRAD:
                continue
            key = f"{Path(path).name}/{r}/{c}"
            fmt = "webp" if _u(seed, "fmt", key) < 0.06 else "jpg"
            q = 85 + int(_u(seed, "q", key) * 11)
            out.append({"wallpaper": widx, "row": r, "col": c, "key": key, "data": encode(Image.fromarray(crop), fmt, q), "ext": "webp" if fmt == "webp" else "jpg"})
    return out


def _distinct_cached(paths: Sequence[Path], n: int, seed: int, cache: Path) -> list[Path]:
    """:func:`realdata.distinct_originals`, remembered in ``cache`` (it is the slowest step)."""
    key = _h("distinct", n, seed, len(paths), *(realdata.clipart_name(p) for p in paths))[:20]
    f = cache / f"distinct-{key}.json"
    by_name = {realdata.clipart_name(p): p for p in paths}
    if f.exists():
        names = json.loads(f.read_text())
        if all(nm in by_name for nm in names):
            return [by_name[nm] for nm in names]
    picked = realdata.distinct_originals(paths, n, seed)
    cache.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps([realdata.clipart_name(p) for p in picked]))
    return picked


def _thumb16(img: Image.Image) -> tuple[np.ndarray, float] | None:
    """Like realdata's test thumbnails: 16x16 grey of the ink bounding box, and blank fraction."""
    grey = img.convert("L")
    ink = grey.point(lambda v: 255 if v < 248 else 0)
    box = ink.getbbox()
    if box is None:
        return None
    blank = 1.0 - float(np.asarray(ink.resize((64, 64), Image.Resampling.BOX), dtype=np.float32).mean()) / 255
    t = np.asarray(grey.crop(box).resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    return t.reshape(16, 4, 16, 4).mean(axis=(1, 3)), blank


def _clipart_job(args: tuple[str, int, bool]) -> dict[str, Any] | None:
    """One clip-art original: realdata.clipart_jpeg's bytes (or PNG / WebP of the same pixels)."""
    path, seed, vary = args
    try:
        rgb = realdata.clipart_rgb(path, max_side=512)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    th = _thumb16(rgb)
    if th is None:
        return None
    u = _u(seed, "clipfmt", realdata.clipart_name(path)) if vary else 0.0
    fmt = "png" if u > 0.92 else "webp" if u > 0.86 else "jpg"
    return {"path": path, "data": encode(rgb, fmt, 90), "ext": fmt, "thumb": th[0], "blank": th[1], "size": rgb.size}


def _distinct_from(ref_small: np.ndarray, ref_z: np.ndarray, t16: np.ndarray, min_distance: float = 12.0, max_corr: float = 0.85) -> bool:
    variants = realdata._dihedral(t16)
    z = (variants - variants.mean(axis=1, keepdims=True)) / (variants.std(axis=1, keepdims=True) + 1e-3)
    if len(ref_small) == 0:
        return True
    dist = np.abs(ref_small[:, None, :] - variants[None]).mean(axis=2)
    if float(dist.min()) < min_distance:
        return False
    return float(np.max(ref_z @ z.T)) / z.shape[1] <= max_corr


def _std16(t: np.ndarray) -> np.ndarray:
    v = t.ravel()
    return (v - v.mean()) / (v.std() + 1e-3)


# --------------------------------------------------------------------------------------------
# copies: which originals get how many, and which edits


def _copy_counts(n: int, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed: ~67% none, 1-3 for most others, ~3% 4-10, ~0.5% (>= 2) 20-50."""
    u = rng.random(n)
    counts = np.zeros(n, dtype=np.int64)
    counts[(u >= 0.67) & (u < 0.85)] = 1
    counts[(u >= 0.85) & (u < 0.93)] = 2
    counts[(u >= 0.93) & (u < 0.965)] = 3
    mid = u >= 0.965
    counts[mid] = rng.integers(4, 11, int(mid.sum()))
    heavy = rng.choice(n, size=min(n, max(2, round(0.005 * n))), replace=False)
    counts[heavy] = rng.integers(20, 51, len(heavy))
    return counts


def _copy_job(job: dict[str, Any]) -> tuple[bytes, str, str]:
    """Make one copy: returns (bytes, ext, detail)."""
    rng = _rng(job["seed"], "copy", job["uid"])
    data, edit = job["orig"], job["edit"]
    if edit == "exact":
        if job["byte_copy"]:
            return data, job["orig_ext"], "exact byte copy"
        img = decode(data)
        fmt = "webpll" if job["orig_ext"] == "png" or rng.random() < 0.3 else "png"
        return encode(img, fmt), "webp" if fmt == "webpll" else "png", f"exact pixels re-encoded as {fmt.replace('webpll', 'lossless webp')}"
    img = _rgb(decode(data))
    if edit == "partial":
        tpl = job["template"]
        e = apply_edit("partial", img, rng, template=tpl)
    elif edit == "scene":  # a hard-negative mock-up around a picture that has no other row
        scene, detail, _ = render_scene(img, job["template"])
        e = Edited(scene, "hardneg shared-template: " + detail)
    elif edit == "paste":
        e = Edited(paste_object(job["background"], img, rng, job["frac"]), job["detail"])
    else:
        e = apply_edit(edit, img, rng)
    fmt, q = e.fmt, e.quality
    if fmt is None:
        u = rng.random()
        fmt = "jpg" if u < 0.8 else "webp" if u < 0.92 else "png"
        q = int(rng.integers(70, 96))
    if e.image.mode == "L" and fmt == "webp":
        fmt = "jpg"
    return encode(e.image, fmt, q or 90), fmt, e.detail


# --------------------------------------------------------------------------------------------
# the build


def _map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, chunksize: int = 8) -> list[Any]:
    if workers <= 1 or len(items) < 4:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items, chunksize=chunksize))


def _params(n_clip: int, n_photo: int, seed: int) -> dict[str, Any]:
    return {"n_clip": n_clip, "n_photo": n_photo, "seed": seed, "version": 2}


def build(
    out_dir: str | os.PathLike[str],
    *,
    n_clip: int = 1500,
    n_photo: int = 600,
    seed: int = 0,
    rebuild: bool = False,
    workers: int | None = None,
    clipart_cache: str | os.PathLike[str] | None = None,
    photo_cache: str | os.PathLike[str] | None = None,
) -> Path:
    """Build the dataset into ``out_dir`` (skipped when it exists with the same parameters and
    ``rebuild`` is false) and return ``out_dir``."""
    out = Path(out_dir)
    params = _params(n_clip, n_photo, seed)
    if not rebuild and (out / "labels.parquet").exists() and (out / "meta.json").exists():
        if json.loads((out / "meta.json").read_text()).get("params") == params:
            print(f"{out} is built with these parameters; --rebuild to redo")
            return out
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    pcache = Path(photo_cache) if photo_cache is not None else PHOTO_CACHE
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    # ---- photographs
    packages: dict[str, str] = {}
    missing: list[str] = []
    photo_paths: list[Path] = []
    bg_paths: list[Path] = []
    licences: list[dict[str, str]] = []
    for pkg in sorted(set(PHOTO_FILES) | set(BACKGROUND_FILES)):
        got = fetch_package(pkg, pcache)
        if got is None:
            missing.append(pkg)
            continue
        root, version = got
        packages[pkg] = version
        notes = _copyright_notes(root, pkg)
        for role, table, sink in (("original", PHOTO_FILES, photo_paths), ("background", BACKGROUND_FILES, bg_paths)):
            for f in _resolve(root, table.get(pkg, [])):
                sink.append(f)
                cr, lic = _licence_of(notes, f, pkg)
                licences.append({"package": pkg, "file": str(f.relative_to(root)), "role": role, "copyright": cr, "license": lic})
    log(f"photo packages: {', '.join(f'{k} {v}' for k, v in packages.items())}" + (f"; missing: {missing}" if missing else ""))
    cand_lists = _map(_photo_candidates, [(str(p), i, seed) for i, p in enumerate(photo_paths)], workers, chunksize=1)
    cands = [c for lst in cand_lists for c in lst]
    order = rng.permutation(len(cands))
    photos = [cands[int(i)] for i in order[: min(n_photo, len(cands))]]
    if len(photos) < n_photo:
        print(f"warning: only {len(photos)} photo crops qualify (asked for {n_photo})", file=sys.stderr)
    log(f"{len(cands)} photo crops qualify from {len(photo_paths)} photographs; using {len(photos)}")

    # ---- clip art
    clip_paths = realdata.fetch_openclipart(clipart_cache) if clipart_cache is not None else realdata.fetch_openclipart()
    n_extra = max(8, round(0.04 * (n_clip + n_photo)))
    picked = _distinct_cached(clip_paths, n_clip + n_extra, seed, pcache / "cache")
    log(f"distinct_originals: {len(picked)} drawings")
    loaded = _map(_clipart_job, [(str(p), seed, i < n_clip) for i, p in enumerate(picked)], workers, chunksize=16)
    clips = [c for c in loaded[:n_clip] if c is not None]
    extras = [c for c in loaded[n_clip:] if c is not None]
    # (b) same-family drawings distinct from every picked drawing
    fam_of = {realdata.clipart_family(p): i for i, p in enumerate(picked[:n_clip])}
    picked_set = {str(p) for p in picked}
    sib_cands = [p for p in clip_paths if str(p) not in picked_set and realdata.clipart_family(p) in fam_of and "icons" not in Path(p).parts]
    n_sib_target = max(4, round(0.07 * n_clip))
    sib_order = rng.permutation(len(sib_cands))[: 3 * n_sib_target]
    sib_cands = [sib_cands[int(i)] for i in sib_order]
    sizes_ok = []
    for p in sib_cands:
        try:
            with Image.open(p) as im:
                if min(im.size) >= 128 and im.width * im.height <= 12_000_000:
                    sizes_ok.append(p)
        except (OSError, ValueError, Image.DecompressionBombError):
            pass
    sib_loaded = _map(_clipart_job, [(str(p), seed, False) for p in sizes_ok], workers, chunksize=8)
    ref = [c for c in clips + extras]
    ref_small = np.stack([c["thumb"].ravel() for c in ref]) if ref else np.zeros((0, 256), np.float32)
    ref_z = np.stack([_std16(c["thumb"]) for c in ref]) if ref else np.zeros((0, 256), np.float32)
    siblings: list[tuple[dict[str, Any], int]] = []  # (sibling, index in clips of its family member)
    clip_index = {c["path"]: i for i, c in enumerate(clips)}
    used_fams: set[str] = set()
    for s in sib_loaded:
        if s is None or s["blank"] > 0.92 or len(siblings) >= n_sib_target:
            continue
        fam = realdata.clipart_family(s["path"])
        if fam in used_fams:
            continue
        member = fam_of[fam]
        if str(picked[member]) not in clip_index:
            continue
        if not _distinct_from(ref_small, ref_z, s["thumb"]):
            continue
        siblings.append((s, clip_index[str(picked[member])]))
        used_fams.add(fam)
        ref_small = np.vstack([ref_small, s["thumb"].ravel()[None]])
        ref_z = np.vstack([ref_z, _std16(s["thumb"])[None]])
    log(f"{len(clips)} clip-art originals, {len(extras)} extra drawings, {len(siblings)} family look-alikes")

    # ---- originals and groups
    # base originals: clips then photos; their group ids are assigned after shuffling
    base: list[dict[str, Any]] = []
    for c in clips:
        base.append({"source": "clipart", "data": c["data"], "ext": c["ext"], "kind": "base", "detail": "original", "key": realdata.clipart_name(c["path"])})
    for p in photos:
        base.append({"source": "photo", "data": p["data"], "ext": p["ext"], "kind": "base", "detail": "original", "key": p["key"], "cell": (p["wallpaper"], p["row"], p["col"])})
    n_base = len(base)
    counts = _copy_counts(n_base, rng)
    share_names = list(EDIT_SHARES)
    share_p = np.array([EDIT_SHARES[k] for k in share_names])
    share_p /= share_p.sum()
    n_copies = int(counts.sum())
    # edits: a shuffled list with the exact shares, dealt out to the copies
    per_edit = np.floor(share_p * n_copies).astype(int)
    per_edit[np.argsort(-(share_p * n_copies - per_edit))[: n_copies - per_edit.sum()]] += 1
    edit_list = np.repeat(np.array(share_names), per_edit)
    rng.shuffle(edit_list)
    copies: list[dict[str, Any]] = []
    k = 0
    for i in range(n_base):
        for j in range(int(counts[i])):
            copies.append({"base": i, "edit": str(edit_list[k]), "uid": f"b{i}c{j}"})
            k += 1

    # ---- mock-up templates, shared by partial copies of different groups and by hard negatives
    bg_images = [_load_wallpaper(p, 2048) for p in bg_paths]
    partials = [c for c in copies if c["edit"] == "partial"]
    n_tpl = max(1, math.ceil(len(partials) / 3.5))
    templates = [make_template(_rng(seed, "template", t), t, backgrounds=bg_images) for t in range(n_tpl)]
    tpl_users: dict[int, list[int]] = {t: [] for t in range(n_tpl)}  # template -> base indices
    cursor = 0
    for c in partials:
        for step in range(n_tpl):
            t = (cursor + step) % n_tpl
            if c["base"] not in tpl_users[t]:
                break
        c["template"] = t
        tpl_users[t].append(c["base"])
        cursor = t + 1
    log(f"{n_copies} copies planned; {len(partials)} partial copies over {n_tpl} templates")

    # ---- hard-negative originals: (b) family siblings, (c) template distractors, (d) shared background
    hard: list[dict[str, Any]] = []
    for s, member in siblings:
        hard.append({"source": "clipart", "data": s["data"], "ext": s["ext"], "kind": "sibling", "like_base": member,
                     "detail": f"hardneg clipart-family '{realdata.clipart_family(s['path'])}'", "key": realdata.clipart_name(s["path"])})
    half = len(extras) // 2
    used_tpls = [t for t in range(n_tpl) if tpl_users[t]]
    scene_jobs: list[dict[str, Any]] = []
    for e_i, ex in enumerate(extras[:half]):
        if not used_tpls:
            break
        t = used_tpls[e_i % len(used_tpls)]
        scene_jobs.append({"source": "clipart", "orig": ex["data"], "template": templates[t], "like_base": tpl_users[t][0], "uid": f"scene{e_i}", "edit": "scene"})
    paste_jobs: list[dict[str, Any]] = []
    objs = extras[half:]
    n_sets = len(objs) // 3
    for s_i in range(n_sets):
        brng = _rng(seed, "shared-bg", s_i)
        src = bg_images[int(brng.integers(len(bg_images)))] if bg_images else Image.fromarray(_wall(brng, (768, 576))[0])
        w = int(brng.integers(512, 769))
        h = round(w / float(brng.choice([4 / 3, 3 / 2, 1.0])))
        scale = float(brng.uniform(max(w / src.width, h / src.height), max(w / src.width, h / src.height) * 2.5))
        x0 = float(brng.uniform(0, src.width - w / scale))
        y0 = float(brng.uniform(0, src.height - h / scale))
        bgc = src.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + w / scale, y0 + h / scale))
        for o_i in range(3):
            frac = float(brng.uniform(0.3, 0.45))
            paste_jobs.append({"source": "photo", "orig": objs[3 * s_i + o_i]["data"], "background": bgc, "frac": frac, "set": s_i,
                               "uid": f"paste{s_i}.{o_i}", "edit": "paste", "detail": f"hardneg shared-background set {s_i}, object {frac:.2f} area"})
    # copies need their original's bytes
    copy_jobs = []
    for c in copies:
        b = base[c["base"]]
        job = {"seed": seed, "uid": c["uid"], "edit": c["edit"], "orig": b["data"], "orig_ext": b["ext"]}
        if c["edit"] == "exact":
            job["byte_copy"] = bool(_u(seed, "exact", c["uid"]) < 0.5)
        if c["edit"] == "partial":
            job["template"] = templates[c["template"]]
        copy_jobs.append(job)
    for j in scene_jobs + paste_jobs:
        j["seed"] = seed
        j["orig_ext"] = "jpg"
    results = _map(_copy_job, copy_jobs + scene_jobs + paste_jobs, workers, chunksize=8)
    copy_res = results[: len(copy_jobs)]
    scene_res = results[len(copy_jobs) : len(copy_jobs) + len(scene_jobs)]
    paste_res = results[len(copy_jobs) + len(scene_jobs) :]
    log(f"{len(copy_res)} copies, {len(scene_res)} mock-up look-alikes, {len(paste_res)} shared-background look-alikes made")

    # ---- groups: one per original (base and hard-negative), ids in a seeded random order
    originals: list[dict[str, Any]] = list(base) + hard
    for j, (data, ext, detail) in zip(scene_jobs, scene_res):
        originals.append({"source": j["source"], "data": data, "ext": ext, "kind": "scene", "like_base": j["like_base"], "detail": detail, "key": j["uid"]})
    paste_first: dict[int, int] = {}
    for j, (data, ext, detail) in zip(paste_jobs, paste_res):
        originals.append({"source": "photo", "data": data, "ext": ext, "kind": "paste", "set": j["set"], "detail": detail, "key": j["uid"]})
        paste_first.setdefault(j["set"], len(originals) - 1)
    gid = rng.permutation(len(originals)).astype(np.int64)
    base_gid = gid[:n_base]
    rows: list[dict[str, Any]] = []

    def add(data: bytes, ext: str, group: int, edit: str, detail: str, source: str, like: int, uid: str) -> None:
        name = _h(seed, "file", uid)[:16] + "." + ext
        rows.append({"file": name, "group": int(group), "edit": edit, "edit_detail": detail, "source": source, "lookalike_of": int(like), "_data": data})

    # (a) adjacent wallpaper crops: a crop whose right or lower neighbour is also an original
    cell_of = {o["cell"]: i for i, o in enumerate(base) if "cell" in o}
    adj_pairs = []
    for (w, r, c), i in cell_of.items():
        for nb in ((w, r, c + 1), (w, r + 1, c)):
            if nb in cell_of:
                adj_pairs.append((i, cell_of[nb]))
                break
    adj_pairs.sort()
    n_adj = min(len(adj_pairs), max(2, round(0.3 * len(photos))))
    adj_like: dict[int, int] = {}
    for p_i in rng.permutation(len(adj_pairs))[:n_adj]:
        a, b = adj_pairs[int(p_i)]
        adj_like[a] = int(base_gid[b])
    # partial copies sharing a template: lookalike_of = another group on the same template
    for idx, o in enumerate(originals):
        like = -1
        if o["kind"] == "base":
            like = adj_like.get(idx, -1)
        elif o["kind"] in ("sibling", "scene"):
            like = int(base_gid[o["like_base"]])
        elif o["kind"] == "paste":
            first = paste_first[o["set"]]
            like = int(gid[first + 1]) if idx == first else int(gid[first])
        add(o["data"], o["ext"], int(gid[idx]), "original", o["detail"], o["source"], like, f"o{o['key']}:{idx}")
    for c, (data, ext, detail) in zip(copies, copy_res):
        like = -1
        if c["edit"] == "partial":
            others = [b for b in tpl_users[c["template"]] if b != c["base"]]
            if others:
                like = int(base_gid[others[0]])
        add(data, ext, int(base_gid[c["base"]]), c["edit"], detail, base[c["base"]]["source"], like, f"c{c['uid']}")

    df = write_dataset(
        out, rows, lambda d: _meta(d, params, packages, missing, licences, n_tpl, tpl_users, len(photo_paths), len(cands))
    )
    log(f"wrote {len(df)} images to {out}")
    print_summary(df)
    return out


def write_dataset(out: Path, rows: list[dict[str, Any]], meta_fn: Callable[[Any], dict[str, Any]]) -> Any:
    """Write ``rows`` (label columns plus ``_data``: the file's bytes) as ``out/images``,
    ``labels.parquet`` (sorted by file) and ``meta.json``; build in ``out.building``, self-check,
    then swap it in. Returns the labels DataFrame."""
    import pandas as pd

    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    rows = sorted(rows, key=lambda r: r["file"])
    names = [r["file"] for r in rows]
    if len(set(names)) != len(names):
        raise RuntimeError("file name collision")
    for r in rows:
        (tmp / "images" / r["file"]).write_bytes(r["_data"])
    df = pd.DataFrame([{k: r[k] for k in LABEL_COLUMNS} for r in rows], columns=list(LABEL_COLUMNS))
    df["group"] = df["group"].astype("int64")
    df["lookalike_of"] = df["lookalike_of"].astype("int64")
    df.to_parquet(tmp / "labels.parquet", index=False)
    (tmp / "meta.json").write_text(json.dumps(meta_fn(df), indent=2, sort_keys=True) + "\n")
    check(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return df


def _hardneg_kind(detail: str, edit: str, source: str, like: int) -> str | None:
    if like < 0:
        return None
    if edit == "partial":
        return "partial copies sharing a template"
    if "clipart-family" in detail:
        return "clipart family"
    if "shared-template" in detail:
        return "mock-up, shared template"
    if "shared-background" in detail:
        return "shared background"
    return "adjacent wallpaper crop"


def _meta(df: Any, params: dict[str, Any], packages: dict[str, str], missing: list[str], licences: list[dict[str, str]],
          n_tpl: int, tpl_users: dict[int, list[int]], n_walls: int, n_cands: int) -> dict[str, Any]:
    import PIL

    hard = Counter(k for k in (_hardneg_kind(d, e, s, lk) for d, e, s, lk in zip(df.edit_detail, df.edit, df.source, df.lookalike_of)) if k)
    sizes = df.groupby("group").size()
    return {
        "params": params,
        "seed": params["seed"],
        "images": int(len(df)),
        "groups": int(df.group.nunique()),
        "groups_with_copies": int((sizes > 1).sum()),
        "largest_group": int(sizes.max()),
        "counts_per_edit": {k: int(v) for k, v in df.edit.value_counts().sort_index().items()},
        "counts_per_source": {k: int(v) for k, v in df.source.value_counts().sort_index().items()},
        "counts_per_edit_and_source": {f"{e}/{s}": int(v) for (e, s), v in df.groupby(["edit", "source"]).size().items()},
        "counts_per_extension": {k: int(v) for k, v in df.file.str.rsplit(".", n=1).str[1].value_counts().sort_index().items()},
        "hard_negatives": dict(sorted(hard.items())),
        "templates": {"count": n_tpl, "reused_by_several_groups": sum(1 for v in tpl_users.values() if len(set(v)) > 1)},
        "packages": {"openclipart-png": _openclipart_version(), **packages},
        "missing_packages": missing,
        "photo_wallpapers": n_walls,
        "photo_crops_qualifying": n_cands,
        "licences": {
            "clipart": "openclipart-png: public domain (openclipart.org dedicated every drawing to the public domain; see usr/share/doc/openclipart-png/copyright)",
            "photo": "photographs from Debian wallpaper packages, under the licence given per file below (from each package's copyright file)",
            "files": licences,
        },
        "software": {"Pillow": PIL.__version__, "numpy": np.__version__},
    }


def _openclipart_version() -> str:
    marker = realdata.DEFAULT_CACHE / ".complete"
    if marker.exists():
        m = re.search(r"openclipart-png_([^_]+)_", marker.read_text())
        if m:
            return m.group(1).replace("%3a", ":")
    return "unknown"


def check(out: str | os.PathLike[str]) -> None:
    """Self-check of a built dataset; raises AssertionError on any inconsistency."""
    import pandas as pd

    out = Path(out)
    df = pd.read_parquet(out / "labels.parquet")
    assert list(df.columns) == list(LABEL_COLUMNS), df.columns
    assert df["group"].dtype == np.int64 and df["lookalike_of"].dtype == np.int64
    files = {p.name for p in (out / "images").iterdir()}
    assert set(df.file) == files, "labels and images differ"
    assert df.file.is_unique
    assert set(df.edit) <= set(EDITS), set(df.edit) - set(EDITS)
    assert set(df.source) <= {"clipart", "photo"}
    n_orig = df[df.edit == "original"].groupby("group").size()
    groups = set(df.group)
    assert set(n_orig.index) == groups and (n_orig == 1).all(), "every group needs exactly one original"
    like = df.lookalike_of[df.lookalike_of >= 0]
    assert set(like) <= groups, "lookalike_of names an unknown group"
    assert not (df.lookalike_of == df.group).any(), "an image is a look-alike of its own group"
    orig_by_group = df[df.edit == "original"].set_index("group").file
    for f, g, d in zip(df.file, df.group, df.edit_detail):
        if d == "exact byte copy":
            assert (out / "images" / f).read_bytes() == (out / "images" / orig_by_group[g]).read_bytes()
    assert (df.groupby("group").source.nunique() == 1).all(), "a group mixes sources"


def print_summary(df: Any) -> None:
    tab = df.groupby(["edit", "source"]).size().unstack(fill_value=0)
    tab["total"] = tab.sum(axis=1)
    order = [e for e in EDITS if e in tab.index]
    tab = tab.loc[order]
    tab.loc["total"] = tab.sum()
    print(tab.to_string())
    sizes = df.groupby("group").size() - 1
    print(f"groups: {len(sizes)}; without copies: {(sizes == 0).mean():.1%}; 1-3 copies: {((sizes >= 1) & (sizes <= 3)).sum()}; "
          f"4-19: {((sizes >= 4) & (sizes < 20)).sum()}; 20+: {(sizes >= 20).sum()} (max {sizes.max()})")
    hard = Counter(k for k in (_hardneg_kind(d, e, s, lk) for d, e, s, lk in zip(df.edit_detail, df.edit, df.source, df.lookalike_of)) if k)
    print(f"hard negatives (lookalike_of set): {sum(hard.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(hard.items())))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(HERE / "data" / "quality"))
    ap.add_argument("--n-clip", type=int, default=1500)
    ap.add_argument("--n-photo", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rebuild", action="store_true")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    build(a.out, n_clip=a.n_clip, n_photo=a.n_photo, seed=a.seed, rebuild=a.rebuild, workers=a.workers)
    print(f"done in {time.perf_counter() - t:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
