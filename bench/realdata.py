"""Real public-domain images for benchmarks: Debian's ``openclipart-png`` package.

Openclipart (https://openclipart.org) released every drawing into the public domain (see
``usr/share/doc/openclipart-png/copyright`` inside the package). Debian ships ~8,100 PNG
renderings of them in one ``.deb`` (130 MB, 290 MB unpacked), fetched from the configured apt
mirror by :func:`fetch_openclipart` and cached.

The collection duplicates itself: the same drawing sits in several folders, sometimes at another
size, and many files are tiny icons or mostly transparent. :func:`distinct_originals` picks images
whose pixels differ so that planted copies are the only duplicates a benchmark knows about.

Import from a bench script (``bench/`` is on ``sys.path`` when a script in it runs)::

    from realdata import fetch_openclipart, distinct_originals, clipart_jpeg
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_CACHE",
    "clipart_caption",
    "clipart_family",
    "clipart_jpeg",
    "clipart_name",
    "clipart_rgb",
    "distinct_originals",
    "fetch_openclipart",
]

DEFAULT_CACHE = Path(__file__).resolve().parent / "data" / "openclipart"
"""Where :func:`fetch_openclipart` unpacks the package by default (``bench/data/`` is git-ignored)."""

_PACKAGE = "openclipart-png"
_PNG_ROOT = Path("usr/share/openclipart/png")


def fetch_openclipart(
    cache_dir: str | os.PathLike[str] | None = None, *, deb: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Return the paths of the openclipart PNGs, downloading and unpacking the package once.

    Runs ``apt-get download openclipart-png`` (after ``apt-get update`` when apt does not know the
    package yet, which needs root) and unpacks the ``.deb`` with ``dpkg-deb -x`` (or in Python
    where dpkg is missing) into ``cache_dir/x``; later calls only list the files. Pass ``deb`` (or
    set ``OPENCLIPART_DEB``) to unpack a ``.deb`` you already have instead of calling apt.
    Raises ``RuntimeError`` with the command's output when a step fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    root = cache / "x"
    marker = cache / ".complete"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp_name:
            tmp = Path(tmp_name)
            given = deb if deb is not None else os.environ.get("OPENCLIPART_DEB")
            package = Path(given) if given else _apt_download(tmp)
            _unpack_deb(package, tmp / "x")
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp / "x", root)
        marker.write_text(f"{_PACKAGE} unpacked from {package.name}\n")
    paths = sorted((root / _PNG_ROOT).rglob("*.png"))
    if not paths:
        raise RuntimeError(f"no PNG under {root / _PNG_ROOT}; delete {cache} and run again")
    return paths


def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)


def _apt_download(dest: Path) -> Path:
    """``apt-get download`` the package into ``dest``; ``apt-get update`` first if apt needs it."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"apt-get not found: download the {_PACKAGE} .deb by hand and set OPENCLIPART_DEB=/path/to.deb"
        )
    res = _run(["apt-get", "download", _PACKAGE], dest)
    if res.returncode != 0 and re.search(
        r"Unable to locate package|has no installation candidate|Can't select", res.stderr
    ):
        if os.geteuid() != 0:
            raise RuntimeError(f"apt does not know {_PACKAGE}: run `sudo apt-get update` and try again")
        upd = _run(["apt-get", "update"], dest)
        if upd.returncode != 0:
            raise RuntimeError(f"apt-get update failed:\n{upd.stderr[-2000:]}")
        res = _run(["apt-get", "download", _PACKAGE], dest)
    if res.returncode != 0:
        raise RuntimeError(f"apt-get download {_PACKAGE} failed:\n{res.stderr[-2000:]}")
    debs = sorted(dest.glob(f"{_PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"apt-get download left {[d.name for d in debs]} in {dest}")
    return debs[0]


def _unpack_deb(deb: Path, dest: Path) -> None:
    """Extract the data of ``deb`` into ``dest`` (dpkg-deb, or Python's ar + tarfile without it)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb") is not None:
        res = _run(["dpkg-deb", "-x", str(deb.resolve()), str(dest)], dest)
        if res.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {deb} failed:\n{res.stderr[-2000:]}")
        return
    for name, data in _ar_members(deb):
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                tf.extractall(dest, filter="data")
            return
    raise RuntimeError(f"{deb} holds no data.tar member: not a Debian package?")


def _ar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """The members of a Unix ``ar`` archive (the container of a ``.deb``)."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{path} is not an ar archive")
        while header := fh.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = fh.read(size)
            if size % 2:
                fh.read(1)
            yield name, data


def clipart_rgb(path: str | os.PathLike[str], *, max_side: int | None = None) -> Image.Image:
    """Open a clip-art PNG as RGB, transparency composited on white, optionally downscaled so
    its longer side is at most ``max_side`` (Lanczos)."""
    with Image.open(path) as im:
        im.load()
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb


def clipart_jpeg(path: str | os.PathLike[str], *, max_side: int | None = 512, quality: int = 90) -> bytes:
    """:func:`clipart_rgb` encoded as a JFIF JPEG (what img2dataset stores byte for byte)."""
    buf = io.BytesIO()
    clipart_rgb(path, max_side=max_side).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def clipart_name(path: str | os.PathLike[str]) -> str:
    """The path of a clip-art PNG inside the package's ``openclipart/png/`` folder
    (``animals/black_cat_01.png``); the file name when the path is elsewhere."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i - 1] == "openclipart" and parts[i] == "png":
            return "/".join(parts[i + 1 :])
    return parts[-1]


def clipart_caption(path: str | os.PathLike[str]) -> str:
    """A LAION-ish caption from the file name and folder: ``.../animals/black_cat_01.png`` →
    ``"black cat, animals clip art"``."""
    p = Path(path)
    words = re.sub(r"[_\-]+", " ", re.sub(r"[_\-]*\d+$", "", p.stem)).strip() or "untitled"
    return f"{words}, {p.parent.name.replace('_', ' ')} clip art"


def _thumb(path: Path, side: int) -> tuple[np.ndarray, float] | None:
    """Grey ``side`` x ``side`` thumbnail on white of the drawing's bounding box (so margins do
    not matter; aspect ignored) and the near-white fraction of the whole image; None if
    unreadable or empty."""
    try:
        with Image.open(path) as im:
            im.load()
            rgba = im.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    grey = Image.alpha_composite(white, rgba).convert("L")
    ink = grey.point(lambda v: 255 if v < 248 else 0)
    box = ink.getbbox()
    if box is None:
        return None
    blank = 1.0 - float(np.asarray(ink.resize((64, 64), Image.Resampling.BOX), dtype=np.float32).mean()) / 255
    return np.asarray(grey.crop(box).resize((side, side), Image.Resampling.BOX), dtype=np.float32), blank


_FAMILY_NOISE = re.compile(r"\d+|\b(?:left|right|l|r|up|down|bw|color|colour)\b|[_\-\s.]+")


def clipart_family(path: str | os.PathLike[str]) -> str:
    """A key shared by numbered or mirrored variants of one drawing: the file stem, lowercased,
    without digits, one-letter words and the words left/right/up/down/bw/color
    (``cone3_bw_ganson`` and ``cone4_bw_ganson`` → ``cone ganson``; ``aiga_left_arrow1`` →
    ``aiga arrow``; ``people_juliane_krug_08a`` → ``people juliane krug``), first three words."""
    stem = Path(path).stem.lower().replace("_", " ").replace("-", " ")
    # Debian truncated long names (``alcatel_oxo_nicolas_clem1``, ``..._cle_``): 3 words at most.
    return " ".join([w for w in _FAMILY_NOISE.sub(" ", stem).split() if len(w) > 1][:3])


def _dihedral(t16: np.ndarray) -> np.ndarray:
    """The 8 rotations / mirrorings of a square thumbnail, flattened: shape (8, side * side)."""
    out = []
    for k in range(4):
        r = np.rot90(t16, k)
        out += [r.ravel(), r[:, ::-1].ravel()]
    return np.stack(out)


def distinct_originals(
    paths: Sequence[Path],
    n: int,
    seed: int = 0,
    *,
    min_side: int = 128,
    max_pixels: int = 12_000_000,
    max_blank: float = 0.92,
    min_distance: float = 12.0,
    max_correlation: float = 0.85,
    one_per_family: bool = True,
    exclude_folders: Sequence[str] = ("icons",),
    family: Callable[[Path], str] | None = None,
    allow_fewer: bool = False,
) -> list[Path]:
    """Pick ``n`` images from ``paths`` (in a seeded random order) that are not copies of each other.

    An image is skipped when

    * its shorter side is below ``min_side`` (icons), or it has more than ``max_pixels`` (a few
      renderings are 100+ megapixels: slow, and Pillow refuses them as decompression bombs);
    * more than ``max_blank`` of its area is near-white once composited on white (mostly
      transparent or empty);
    * its 64x64 thumbnail (of the drawing's bounding box, so added margins do not matter) equals
      one already picked (the same drawing in two folders);
    * any rotation or mirroring of its 16x16 grey thumbnail is within ``min_distance`` (mean
      absolute difference, 0-255) of one already picked (the same drawing at another size, or
      mirrored: left and right arrows, left and right feet), or correlates above
      ``max_correlation`` with one (standardised thumbnails: the same shapes recoloured);
    * with ``one_per_family``, an image of its :func:`clipart_family` was already picked
      (``cone3``/``cone4``, ``jigsaw_blue_14``/``_15``: variants SSCD scores above 0.9);
    * it lies under a folder named in ``exclude_folders``: icon themes (``computer/icons/...``)
      build icons from shared parts, so they are full of partial copies of each other.

    The tests are crude and err towards skipping, which keeps unlabelled duplicates out of the
    truth; similar but distinct drawings (playing cards of different suits) can remain.
    ``family`` replaces :func:`clipart_family` as the family key (other collections name their
    files otherwise). Raises ``ValueError`` when fewer than ``n`` qualify, unless
    ``allow_fewer``, which returns those that do.
    """
    family_of = family
    order = np.random.default_rng(seed).permutation(len(paths))
    picked: list[Path] = []
    seen: set[bytes] = set()
    families: set[str] = set()
    excluded = set(exclude_folders)
    small = np.empty((n, 256), dtype=np.float32)  # 16x16 grey thumbnails of the picked images
    shapes = np.empty((n, 256), dtype=np.float32)  # the same, standardised (zero mean, unit std)
    for i in order:
        path = paths[int(i)]
        if excluded & set(Path(path).parts):
            continue
        family = (family_of or clipart_family)(path)
        if one_per_family and family in families:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if min(w, h) < min_side or w * h > max_pixels:
            continue
        thumb = _thumb(path, 64)
        if thumb is None or thumb[1] > max_blank:
            continue
        t = thumb[0]
        digest = hashlib.sha1(np.round(t).astype(np.uint8).tobytes()).digest()
        if digest in seen:
            continue
        s16 = t.reshape(16, 4, 16, 4).mean(axis=(1, 3))
        variants = _dihedral(s16)  # (8, 256)
        z = (variants - variants.mean(axis=1, keepdims=True)) / (variants.std(axis=1, keepdims=True) + 1e-3)
        k = len(picked)
        if k:
            dist = np.abs(small[:k, None, :] - variants[None]).mean(axis=2)  # (k, 8)
            if float(dist.min()) < min_distance:
                continue
            if float(np.max(shapes[:k] @ z.T)) / z.shape[1] > max_correlation:
                continue
        seen.add(digest)
        families.add(family)
        small[k] = variants[0]
        shapes[k] = z[0]
        picked.append(path)
        if len(picked) == n:
            return picked
    if allow_fewer:
        return picked
    raise ValueError(f"only {len(picked)} distinct images qualify among {len(paths)}; asked for {n}")
