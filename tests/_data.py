"""Builders of test and benchmark data: generated images with known edits, a loopback HTTP server,
LAION-style metadata, and real img2dataset runs over that server.

Everything here is deterministic given a seed and needs no network beyond 127.0.0.1.

The module is imported as a top-level module named ``_data``: ``tests/conftest.py`` puts
``tests/`` on ``sys.path`` (so test files write ``from _data import ...``), and the scripts in
``bench/`` do the same with ``sys.path.insert(0, <repo>/tests)``. ``tests/`` stays a plain folder,
not a package, so that no ``tests`` package can shadow (or be shadowed by) one in site-packages.

Facts about img2dataset 1.47 that these helpers rely on (checked by ``tests/test_data_helpers.py``):

* With ``resize_mode="no"``, ``skip_reencode=True`` and ``encode_format="jpg"``, a JPEG whose
  header ``imghdr`` recognises (JFIF or Exif, as PIL writes) and that has no alpha channel is
  stored byte for byte; the sidecar ``sha256`` is that of the downloaded bytes. Anything else
  (PNG, WebP, an alpha channel) is decoded by OpenCV and re-encoded as JPEG (quality 95).
* Bytes that OpenCV cannot decode become a sidecar row with ``status="failed_to_resize"`` and
  ``error_message="Image decoding error"``; an HTTP error becomes ``status="failed_to_download"``
  with ``error_message="HTTP Error 404: Not Found"``. Failed samples have a row in the sidecar
  parquet but no member in the tar. So img2dataset itself never writes an undecodable image
  (except with ``disable_all_reencoding=True``); :func:`inject_corrupt_member` plants one.
* Keys are ``{shard:0{oom_shard_count}d}{row:0{oom_sample}d}`` with ``oom_shard_count=5`` and
  ``oom_sample = ceil(log10(number_sample_per_shard))``: e.g. ``000010042`` is row 42 of shard 1
  with 10,000 samples per shard. Key order in the tar is download-completion order, not row order.
* ``download()`` installs a SIGINT handler that calls ``sys.exit(0)``, prints to stdout/stderr
  from three processes, and never raises when a shard fails (it only prints). It starts worker
  processes with the ``spawn`` start method, which works under pytest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

# img2dataset imports albumentations, which asks PyPI for a newer version at import time (a
# network call and a UserWarning) unless this is set. Spawned workers inherit the environment.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__all__ = [
    "EDIT_NAMES",
    "LAION_COLUMNS",
    "GroundTruth",
    "I2DOutput",
    "LoopbackImageServer",
    "PlantedDataset",
    "PlantedItem",
    "corrupt_jpeg_bytes",
    "edited_copies",
    "encode_jpeg",
    "heavy_tailed_copies",
    "inject_corrupt_member",
    "laion_caption",
    "laion_rows",
    "make_i2d_dataset",
    "make_image_folder",
    "make_laion_parquet",
    "natural_image",
    "pairwise_scores",
    "plant_copies",
    "run_img2dataset",
    "serve_and_download",
]

# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

EDIT_NAMES: tuple[str, ...] = (
    "resize",
    "jpeg",
    "crop",
    "pad",
    "text",
    "grayscale",
    "flip",
    "brightness",
)
"""The near-duplicate edits :func:`edited_copies` makes, in the order it returns them."""


def _pink_noise(rng: np.random.Generator, w: int, h: int, channels: int, beta: float) -> np.ndarray:
    """``channels`` fields of 1/f^(beta/2)-amplitude noise (natural images have beta ~ 2), each
    standardised to zero mean and unit variance; shape (h, w, channels)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2)
    amp[0, 0] = 0.0
    out = np.empty((h, w, channels), dtype=np.float32)
    for c in range(channels):
        x = np.fft.irfft2(amp * np.exp(1j * rng.uniform(0, 2 * np.pi, amp.shape)), s=(h, w))
        out[..., c] = (x - x.mean()) / (x.std() + 1e-9)
    return out


def natural_image(seed: int, size: tuple[int, int] = (256, 192)) -> Image.Image:
    """Return a deterministic, natural-looking RGB image of ``size`` (width, height).

    A background of 1/f noise (the spectrum of natural images; luminance stronger than colour, so
    the structure survives conversion to grey), 6-15 random shapes (ellipses, rectangles,
    polygons, polylines, striped patches; luminance-varied colours, some translucent, some
    blurred) and a little pixel noise. The same seed always gives the same pixels.

    Different seeds are unrelated images for a copy-detection model, with a margin: with the
    bundled SSCD ONNX model at 256x192, 60 seeds gave pairwise cosines of mean 0.24, max 0.49,
    while every :func:`edited_copies` edit of 16 of them scored at least 0.65 against its
    original (grayscale lowest, then pad 0.73, jpeg 0.77; resize, crop, flip, text, brightness
    0.85 or more). At 640x480 the same holds but pad drops to 0.64. Synthetic images sit closer
    together for SSCD than photos do (60 unrelated clip-art drawings: mean 0.13).
    """
    rng = np.random.default_rng(seed)
    w, h = size
    unit = max(w, h) / 256  # stripes and blur scale with the image: another size, the same picture
    field = _pink_noise(rng, w, h, 3, float(rng.uniform(2.0, 3.2)))
    amp = 60.0
    lum = field[..., :1] * amp
    chroma = field[..., 1:] @ (rng.normal(0, 1, (2, 3)) * amp * 0.5).astype(np.float32)
    base = rng.uniform(60, 190, 3).astype(np.float32) + lum + chroma
    canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert("RGBA")

    for _ in range(int(rng.integers(6, 16))):
        layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        grey = rng.uniform(0, 255)
        rgb = np.clip(grey + rng.normal(0, 70, 3), 0, 255)
        colour = (*(int(v) for v in rgb), int(rng.integers(140, 256)))
        scale = float(rng.choice([0.08, 0.2, 0.45]))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        rw, rh = scale * w * float(rng.uniform(0.5, 1.5)), scale * h * float(rng.uniform(0.5, 1.5))
        box = (cx - rw, cy - rh, cx + rw, cy + rh)
        kind = int(rng.integers(0, 5))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        elif kind == 2:
            m = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * math.pi, m))
            radii = rng.uniform(0.4, 1.0, m)
            pts = [(cx + rw * r * math.cos(a), cy + rh * r * math.sin(a)) for a, r in zip(angles, radii, strict=True)]
            draw.polygon(pts, fill=colour)
        elif kind == 3:
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(2, 5)))]
            draw.line(pts, fill=colour, width=int(rng.integers(2, max(3, w // 20))))
        else:  # a striped patch: texture at one frequency and angle
            period = max(3.0, int(rng.integers(4, 16)) * unit)
            angle = rng.uniform(0, math.pi)
            yy, xx = np.mgrid[0:h, 0:w]
            stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
            mask = Image.new("L", (w, h), 0)
            ImageDraw.Draw(mask).ellipse(box, fill=255)
            rgba = np.zeros((h, w, 4), np.uint8)
            rgba[(np.asarray(mask) > 0) & stripes] = colour
            layer = Image.fromarray(rgba, "RGBA")
        if rng.random() < 0.25:
            layer = layer.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 4.0)) * unit))
        canvas = Image.alpha_composite(canvas, layer)

    arr = np.asarray(canvas.convert("RGB"), dtype=np.float32)
    arr += rng.normal(0.0, 2.0, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """Encode ``img`` as a baseline JPEG with a JFIF header (which img2dataset stores unchanged)."""
    buf = io.BytesIO()
    img.convert("L" if img.mode == "L" else "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def corrupt_jpeg_bytes(seed: int = 0, length: int = 2048) -> bytes:
    """Bytes that start like a JPEG (SOI + JFIF APP0, so sniffers call them JPEG) but do not decode."""
    rng = np.random.default_rng(seed)
    header = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return header + rng.integers(0, 256, length, dtype=np.uint8).tobytes()


def edited_copies(img: Image.Image, rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    """Return near-duplicates of ``img``, one per name in :data:`EDIT_NAMES`, as ``(name, image)``.

    * ``resize``: scaled to 50-85 % (Lanczos);
    * ``jpeg``: recompressed at quality 40-90 (returned decoded);
    * ``crop``: 5-10 % of each dimension cut away, at a random offset;
    * ``pad``: letterboxed to a square (or a 10 % border if already square), black or white bars;
    * ``text``: a short caption drawn in a corner on a translucent box;
    * ``grayscale``: mode ``"L"`` (the only result that is not RGB);
    * ``flip``: mirrored left-right;
    * ``brightness``: brightness times 0.7-0.85 or 1.15-1.3.
    """
    src = img.convert("RGB")
    w, h = src.size
    out: list[tuple[str, Image.Image]] = []

    scale = float(rng.uniform(0.5, 0.85))
    out.append(("resize", src.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.LANCZOS)))

    quality = int(rng.integers(40, 91))
    out.append(("jpeg", Image.open(io.BytesIO(encode_jpeg(src, quality))).convert("RGB")))

    fw, fh = float(rng.uniform(0.05, 0.10)), float(rng.uniform(0.05, 0.10))
    cw, ch = round(w * fw), round(h * fh)
    left, top = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
    out.append(("crop", src.crop((left, top, left + w - cw, top + h - ch))))

    bar = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    side = max(w, h) if w != h else round(w * 1.2)
    padded = Image.new("RGB", (side, side), bar)
    padded.paste(src, ((side - w) // 2, (side - h) // 2))
    out.append(("pad", padded))

    texted = src.convert("RGBA")
    overlay = Image.new("RGBA", texted.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=max(10, h // 14))
    label = ["(c) stockphoto", "SALE -40%", "www.example.com", "my holiday 2019"][int(rng.integers(0, 4))]
    box = draw.textbbox((0, 0), label, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    x = 4 if rng.random() < 0.5 else max(4, w - tw - 8)
    y = 4 if rng.random() < 0.5 else max(4, h - th - 10)
    draw.rectangle((x - 3, y - 2, x + tw + 3, y + th + 6), fill=(0, 0, 0, 110))
    draw.text((x, y - box[1]), label, font=font, fill=(255, 255, 255, 235))
    out.append(("text", Image.alpha_composite(texted, overlay).convert("RGB")))

    out.append(("grayscale", src.convert("L")))
    out.append(("flip", ImageOps.mirror(src)))

    factor = float(rng.uniform(0.7, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.15, 1.3))
    out.append(("brightness", ImageEnhance.Brightness(src).enhance(factor)))
    return out


# --------------------------------------------------------------------------------------------
# Loopback HTTP server
# --------------------------------------------------------------------------------------------

_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; 404 for anything else; logs nothing."""

    server: _FileServer
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        """Send the bytes registered for the request target (query string ignored), or a 404.

        A client that uses this server as its HTTP proxy sends the absolute URL as the target
        (``GET http://cdn.example.com/a.jpg``): that is looked up as is, so files registered
        under absolute URLs are served under those URLs.
        """
        target = self.path.split("?", 1)[0]
        data = self.server.files.get(target)
        if data is None:
            self.send_error(404, "Not Found")
            return
        # Count before answering: a client that has its bytes may check ``hits`` at once.
        with self.server.lock:
            self.server.hits[target] = self.server.hits.get(target, 0) + 1
        self.send_response(200)
        self.send_header("Content-Type", _CONTENT_TYPES.get(Path(target).suffix.lower(), "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        """Stay quiet: tests and benchmarks read their own output."""


class _FileServer(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    hits: dict[str, int]
    lock: threading.Lock


class LoopbackImageServer:
    """Serve ``{path or URL: bytes}`` on ``http://127.0.0.1:<free port>`` from a background thread.

    Two ways to address a file:

    * a path (``"/a.jpg"``; a missing leading ``/`` is added), fetched directly from
      :meth:`url` ``("/a.jpg")`` = ``http://127.0.0.1:<port>/a.jpg``;
    * an absolute ``http://`` URL with any host (``"http://cdn.example.com/a.jpg"``), fetched
      through the server used as an HTTP proxy (``http_proxy=`` :attr:`base_url`). Clients then
      see stable, realistic URLs that do not depend on the port. Plain HTTP only (no CONNECT).

    Anything else answers 404. ``files`` may change while the server runs; ``hits`` counts
    successful GETs per registered key.

    >>> with LoopbackImageServer({"/a.jpg": b"..."}) as server:  # doctest: +SKIP
    ...     server.url("/a.jpg")
    'http://127.0.0.1:40123/a.jpg'
    """

    def __init__(self, files: Mapping[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self._server: _FileServer | None = None
        self._thread: threading.Thread | None = None
        for key, data in (files or {}).items():
            self.add(key, data)

    def add(self, key: str, data: bytes) -> str:
        """Register ``data`` under a path or an absolute ``http://`` URL; return the normalised key."""
        if key.startswith("https://"):
            raise ValueError(f"{key}: only http:// URLs can be served through the proxy")
        norm = key if key.startswith(("/", "http://")) else "/" + key
        self.files[norm] = data
        return norm

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash); also the proxy URL. Only while running."""
        if self._server is None:
            raise RuntimeError("LoopbackImageServer is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        """The direct URL of ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def __enter__(self) -> LoopbackImageServer:
        server = _FileServer(("127.0.0.1", 0), _Handler)
        server.files = self.files  # shared, so later add() calls are served
        server.hits = self.hits
        server.lock = threading.Lock()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-image-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None


# --------------------------------------------------------------------------------------------
# LAION metadata
# --------------------------------------------------------------------------------------------

LAION_COLUMNS: dict[str, pa.DataType] = {
    "URL": pa.string(),
    "TEXT": pa.string(),
    "WIDTH": pa.int64(),
    "HEIGHT": pa.int64(),
    "similarity": pa.float64(),
    "punsafe": pa.float64(),
    "pwatermark": pa.float64(),
    "AESTHETIC_SCORE": pa.float64(),
}
"""The LAION-5B / LAION-Aesthetics metadata columns :func:`make_laion_parquet` writes, in order."""

_SUBJECTS = (
    "sunset over the lake",
    "red vintage car",
    "cat sleeping on a sofa",
    "mountain landscape",
    "bowl of fresh fruit",
    "city skyline at night",
    "abstract watercolor",
    "old wooden door",
    "field of sunflowers",
    "portrait of a dog",
    "snowy forest path",
    "beach with palm trees",
    "cup of coffee",
    "geometric pattern",
    "hot air balloons",
    "lighthouse on the coast",
)
_STYLES = ("photo", "illustration", "poster", "vector art", "stock image", "painting", "clip art")
_COPY_TEMPLATES = (
    "Canvas Wall Art Print {s}",
    "{s} - Framed Art Print",
    "{s} | Poster, Sticker, T-Shirt",
    "Buy {s} Canvas Print Online",
    "{s} royalty free stock image",
)


def laion_caption(rng: np.random.Generator, subject: str | None = None, *, shop: bool = False) -> str:
    """A LAION-ish alt text; ``shop=True`` gives the print-shop style that copies often carry."""
    s = subject if subject is not None else _SUBJECTS[int(rng.integers(0, len(_SUBJECTS)))]
    if shop:
        return _COPY_TEMPLATES[int(rng.integers(0, len(_COPY_TEMPLATES)))].format(s=s.title())
    style = _STYLES[int(rng.integers(0, len(_STYLES)))]
    return f"{s} {style}" if rng.random() < 0.5 else f"A {style} of a {s}"


def make_laion_parquet(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as a LAION-style metadata parquet and return its path.

    Each row needs ``URL``; the other :data:`LAION_COLUMNS` default to null. Keys that are not
    LAION columns are written too, after them, with inferred types.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = [k for k in dict.fromkeys(itertools.chain.from_iterable(rows)) if k not in LAION_COLUMNS]
    arrays: dict[str, pa.Array] = {}
    for name, dtype in LAION_COLUMNS.items():
        arrays[name] = pa.array([r.get(name) for r in rows], type=dtype)
    for name in extra:
        arrays[name] = pa.array([r.get(name) for r in rows])
    if any(r.get("URL") is None for r in rows):
        raise ValueError("every row needs a URL")
    pq.write_table(pa.table(arrays), out)
    return out


# --------------------------------------------------------------------------------------------
# img2dataset
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class I2DOutput:
    """What one :func:`run_img2dataset` call wrote.

    ``shards`` are the data files (``NNNNN.tar`` for webdataset, ``NNNNN.parquet`` for parquet,
    ``NNNNN/`` folders for files); ``sidecars`` the per-shard ``NNNNN.parquet`` of img2dataset
    (for the parquet format they are the shards themselves); ``stats`` the ``NNNNN_stats.json``.
    """

    out_dir: Path
    output_format: str
    shards: tuple[Path, ...]
    sidecars: tuple[Path, ...]
    stats: tuple[Path, ...]
    seconds: float
    log: str = ""

    def read_sidecars(self) -> pa.Table:
        """All sidecar rows (one per input URL, failed ones included) as one Arrow table."""
        cols_to_skip = {"jpg", "png", "webp"}  # the image bytes of output_format="parquet"
        tables = []
        for p in self.sidecars:
            t = pq.read_table(p)
            tables.append(t.select([c for c in t.column_names if c not in cols_to_skip]))
        return pa.concat_tables(tables)


@contextlib.contextmanager
def _redirect_fds(log: IO[bytes] | None) -> Iterator[None]:
    """Point fds 1 and 2 at ``log`` (inherited by spawned workers), then restore them."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    # sys.stdout may not write to fd 1 (pytest's capture replaces it), so redirect it as well.
    text = open(os.dup(log.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield
    finally:
        text.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


_PROXY_VARS = (
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
)


@contextlib.contextmanager
def _proxy_env(http_proxy: str | None) -> Iterator[None]:
    """Make urllib (in this process and in spawned workers) reach only what we mean it to.

    Any proxy settings of the environment are hidden; 127.0.0.1 is never proxied; with
    ``http_proxy`` every other ``http://`` URL goes through it. Restored afterwards.
    """
    saved = {k: os.environ.get(k) for k in _PROXY_VARS}
    for k in _PROXY_VARS:
        os.environ.pop(k, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    if http_proxy is not None:
        os.environ["http_proxy"] = os.environ["HTTP_PROXY"] = http_proxy
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _read_log(log: IO[bytes] | None) -> str:
    if log is None:
        return ""
    log.seek(0)
    return log.read().decode("utf-8", "replace")


@contextlib.contextmanager
def _stop_logger_on_error(before: set[multiprocessing.process.BaseProcess]) -> Iterator[None]:
    """When ``download()`` raises, stop the logger process it started (it would otherwise be
    joined at interpreter exit, which fails with "can't create new thread at interpreter
    shutdown"). Only processes that appeared during the call are touched."""
    try:
        yield
    except BaseException:
        for proc in set(multiprocessing.active_children()) - before:
            queue = getattr(proc, "q", None)  # img2dataset's LoggerProcess stops on any message
            if queue is not None:
                with contextlib.suppress(Exception):
                    queue.put("stop")
            multiprocessing.process.BaseProcess.join(proc, timeout=10)
            if proc.is_alive():
                proc.terminate()
                multiprocessing.process.BaseProcess.join(proc, timeout=5)
        raise


def run_img2dataset(
    url_list: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    output_format: Literal["webdataset", "parquet", "files"] = "webdataset",
    number_sample_per_shard: int = 10_000,
    image_size: int = 256,
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "no",
    skip_reencode: bool = True,
    resize_only_if_bigger: bool = False,
    encode_format: Literal["jpg", "png", "webp"] = "jpg",
    save_additional_columns: Sequence[str] | None = None,
    processes_count: int = 1,
    thread_count: int = 8,
    timeout: int = 5,
    http_proxy: str | None = None,
    quiet: bool = True,
) -> I2DOutput:
    """Run the real ``img2dataset.download`` on a LAION-style parquet and check what it wrote.

    The defaults keep the downloaded bytes: ``resize_mode="no"`` with ``skip_reencode=True``
    stores a JFIF/Exif JPEG unchanged (see the module docstring), so planted exact copies stay
    exact. ``save_additional_columns`` defaults to every column of the parquet except ``URL`` and
    ``TEXT``. ``out_dir`` is overwritten. ``http_proxy`` (e.g. a :class:`LoopbackImageServer`'s
    :attr:`~LoopbackImageServer.base_url`) routes every ``http://`` URL but 127.0.0.1 through it;
    proxy settings of the environment are ignored either way. With ``quiet`` the output of img2dataset and of its
    worker processes goes to a temporary log, kept in :attr:`I2DOutput.log` and quoted in the
    error when the run fails.

    Must be called from the main thread (img2dataset installs a SIGINT handler; the previous one
    is restored afterwards). Raises ``RuntimeError`` when ``download()`` raises and when a shard
    is missing from the output (img2dataset itself only prints when a shard fails).
    """
    src = Path(url_list)
    out = Path(out_dir)
    columns = pq.read_schema(src).names
    if "URL" not in columns:
        raise ValueError(f"{src} has no URL column (columns: {columns})")
    if save_additional_columns is None:
        save_additional_columns = [c for c in columns if c not in ("URL", "TEXT")]
    n_rows = pq.read_metadata(src).num_rows
    n_shards = math.ceil(n_rows / number_sample_per_shard)

    with warnings.catch_warnings():
        # imghdr (stdlib, deprecated in 3.12) and albumentations warn at import time.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from img2dataset import download

    # Not incremental_mode="overwrite": img2dataset 1.47 then deletes its own _tmp folder after
    # creating it and fails with FileNotFoundError '.../_tmp/0.feather'. Start from nothing.
    if out.exists():
        shutil.rmtree(out)
    sigint = signal.getsignal(signal.SIGINT)
    log = tempfile.TemporaryFile() if quiet else None  # noqa: SIM115 (closed below)
    before = set(multiprocessing.active_children())
    start = time.perf_counter()
    try:
        with _proxy_env(http_proxy), _redirect_fds(log), _stop_logger_on_error(before):
            download(
                url_list=str(src),
                output_folder=str(out),
                input_format="parquet",
                url_col="URL",
                caption_col="TEXT" if "TEXT" in columns else None,
                save_additional_columns=list(save_additional_columns) or None,
                output_format=output_format,
                number_sample_per_shard=number_sample_per_shard,
                image_size=image_size,
                resize_mode=resize_mode,
                resize_only_if_bigger=resize_only_if_bigger,
                skip_reencode=skip_reencode,
                encode_format=encode_format,
                processes_count=processes_count,
                thread_count=thread_count,
                distributor="multiprocessing",
                enable_wandb=False,
                timeout=timeout,
                retries=0,
            )
        seconds = time.perf_counter() - start
        text = _read_log(log)
    except Exception as err:
        raise RuntimeError(f"img2dataset failed: {err!r}; its output ends with:\n{_read_log(log)[-3000:]}") from err
    finally:
        signal.signal(signal.SIGINT, sigint)
        if log is not None:
            log.close()

    names = [f"{i:05d}" for i in range(n_shards)]
    stats = tuple(out / f"{n}_stats.json" for n in names)
    sidecars = tuple(out / f"{n}.parquet" for n in names)
    if output_format == "webdataset":
        shards: tuple[Path, ...] = tuple(out / f"{n}.tar" for n in names)
    elif output_format == "parquet":
        shards = sidecars
    else:
        shards = tuple(out / n for n in names)
    missing = [str(p) for p in (*stats, *sidecars, *shards) if not p.exists()]
    if missing:
        raise RuntimeError(f"img2dataset did not write {missing}; its output ends with:\n{text[-3000:]}")
    return I2DOutput(out, output_format, shards, sidecars, stats, seconds, text)


def inject_corrupt_member(
    tar_path: str | os.PathLike[str],
    key: str,
    data: bytes,
    *,
    sidecar: str | os.PathLike[str] | None = None,
    ext: str = "jpg",
) -> None:
    """Add ``key.<ext>`` (+ ``.txt``, ``.json``) holding ``data`` to a webdataset tar, as if
    img2dataset had stored it (it would with ``disable_all_reencoding=True``).

    ``key`` must already have a sidecar row (a failed one, typically ``failed_to_resize``): that
    row becomes ``status="success"``, ``error_message=None``, ``sha256`` of ``data``, width and
    height null, and the counts in ``<tar stem>_stats.json`` move from the failure to
    ``successes``, so tar, sidecar and stats stay consistent. The tar is appended to in place;
    the sidecar (``<tar stem>.parquet`` by default) and the stats are rewritten atomically.
    """
    tar = Path(tar_path)
    side = Path(sidecar) if sidecar is not None else tar.with_suffix(".parquet")
    table = pq.read_table(side)
    rows = table.to_pylist()
    hits = [r for r in rows if r.get("key") == key]
    if len(hits) != 1:
        raise ValueError(f"key {key!r} has {len(hits)} rows in {side}")
    row = hits[0]
    old_status, old_error = row.get("status"), row.get("error_message")
    row["status"] = "success"
    row["error_message"] = None
    for col in ("width", "height", "original_width", "original_height"):
        if col in row:
            row[col] = None
    if "sha256" in row:
        row["sha256"] = hashlib.sha256(data).hexdigest()
    caption = row.get("caption")
    members = {
        f"{key}.{ext}": data,
        f"{key}.txt": ("" if caption is None else str(caption)).encode("utf-8"),
        f"{key}.json": json.dumps(row, indent=4).encode("utf-8"),
    }
    with tarfile.open(tar) as tf:
        if any(m.name.startswith(key + ".") for m in tf.getmembers()):
            raise ValueError(f"{tar} already holds members for key {key!r}")
    with tarfile.open(tar, "a") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o444  # as webdataset's TarWriter writes them
            info.uname = info.gname = "bigdata"
            info.mtime = int(time.time())
            tf.addfile(info, io.BytesIO(payload))
    new = pa.Table.from_pylist(rows, schema=table.schema)
    tmp = side.with_name(f".{side.name}.tmp")
    pq.write_table(new, tmp)
    os.replace(tmp, side)
    stats_path = tar.with_name(f"{tar.stem}_stats.json")
    if stats_path.exists() and old_status != "success":
        stats = json.loads(stats_path.read_text())
        if old_status in ("failed_to_resize", "failed_to_download") and stats.get(old_status, 0) > 0:
            stats[old_status] -= 1
        stats["successes"] = stats.get("successes", 0) + 1
        status_dict = stats.get("status_dict", {})
        if old_error in status_dict:
            status_dict[old_error] -= 1
            if status_dict[old_error] <= 0:
                del status_dict[old_error]
        status_dict["success"] = status_dict.get("success", 0) + 1
        stats["status_dict"] = status_dict
        tmp = stats_path.with_name(f".{stats_path.name}.tmp")
        tmp.write_text(json.dumps(stats, indent=4))
        os.replace(tmp, stats_path)


# --------------------------------------------------------------------------------------------
# Planted duplicates and ground truth
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlantedItem:
    """One planted file: its URL, its group, how it was made, its bytes and LAION metadata.

    ``kind`` is ``"original"``, ``"exact"`` (same bytes as the original), an edit name from
    :data:`EDIT_NAMES`, ``"missing"`` (the URL answers 404) or ``"corrupt"`` (undecodable bytes).
    ``data`` is ``None`` for ``"missing"``.
    """

    url: str
    group: int
    kind: str
    data: bytes | None
    caption: str
    width: int | None
    height: int | None


class PlantedDataset(NamedTuple):
    """A built dataset and its ground truth; unpacks as ``out_dir, truth``."""

    out_dir: Path
    truth: GroundTruth

    def truth_by_key(self) -> GroundTruth:
        """The truth keyed by img2dataset ``key`` instead of URL (read from the sidecar parquets)."""
        keys: dict[str, str] = {}
        for side in sorted(self.out_dir.glob("*.parquet")):
            for row in pq.read_table(side, columns=["key", "url"]).to_pylist():
                keys[row["url"]] = row["key"]
        return self.truth.remap(keys)


class GroundTruth(Mapping[str, int]):
    """Maps each planted URL (or relative path) to its original's group id.

    Two entries with the same group id are copies of one original. Missing and corrupt entries
    have a group of their own each. ``kind[url]`` says how the entry was made (see
    :class:`PlantedItem`).
    """

    def __init__(self, group: Mapping[str, int], kind: Mapping[str, str]) -> None:
        self._group = dict(group)
        self.kind: dict[str, str] = dict(kind)

    def __getitem__(self, key: str) -> int:
        return self._group[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._group)

    def __len__(self) -> int:
        return len(self._group)

    def __repr__(self) -> str:
        return f"GroundTruth({len(self)} entries, {len(set(self._group.values()))} groups)"

    @property
    def failed(self) -> set[str]:
        """Entries that cannot yield an image: 404s and corrupt bytes."""
        return {k for k, v in self.kind.items() if v in ("missing", "corrupt")}

    @property
    def corrupt(self) -> set[str]:
        """Entries whose bytes are not a decodable image."""
        return {k for k, v in self.kind.items() if v == "corrupt"}

    def groups(self) -> dict[int, list[str]]:
        """Group id → its entries, for groups of decodable images only."""
        out: dict[int, list[str]] = {}
        failed = self.failed
        for k, g in self._group.items():
            if k not in failed:
                out.setdefault(g, []).append(k)
        return out

    def duplicate_pairs(self) -> set[frozenset[str]]:
        """Every unordered pair of decodable entries that share a group."""
        return {frozenset(p) for members in self.groups().values() for p in itertools.combinations(members, 2)}

    def remap(self, keys: Mapping[str, str]) -> GroundTruth:
        """The same truth keyed differently (e.g. URL → img2dataset key); unmapped entries drop."""
        return GroundTruth(
            {keys[k]: g for k, g in self._group.items() if k in keys},
            {keys[k]: v for k, v in self.kind.items() if k in keys},
        )


def heavy_tailed_copies(
    n_originals: int, n_copies: int, rng: np.random.Generator, *, share: float = 0.15, alpha: float = 1.1
) -> list[int]:
    """Split ``n_copies`` among ``n_originals`` like web duplication: most originals get none, a
    few get many. A random ``share`` of the originals get one copy each; the remaining copies
    follow Zipf weights ``1/rank**alpha`` over them. Returns copies per original."""
    counts = [0] * n_originals
    if n_copies <= 0 or n_originals <= 0:
        return counts
    n_dup = max(1, min(n_originals, round(share * n_originals), n_copies))
    chosen = rng.choice(n_originals, size=n_dup, replace=False)
    weights = 1.0 / np.arange(1, n_dup + 1) ** alpha
    weights /= weights.sum()
    extra = rng.multinomial(n_copies - n_dup, weights)
    for i, idx in enumerate(chosen):
        counts[int(idx)] = 1 + int(extra[i])
    return counts


_HOSTS = (
    "images.example.com",
    "cdn.shop.example.net",
    "media.example.org",
    "i.pins.example.com",
    "static.blog.example.net",
    "photos.example.com",
)


def _fresh_url(rng: np.random.Generator, used: set[str], prefix: str) -> str:
    """A new plausible image URL on a reserved example domain (RFC 2606), unique within ``used``."""
    while True:
        host = _HOSTS[int(rng.integers(0, len(_HOSTS)))]
        h = f"{int(rng.integers(0, 2**32)):08x}"
        style = int(rng.integers(0, 4))
        if style == 0:
            path = f"/{prefix}/{h}.jpg"
        elif style == 1:
            path = f"/wp-content/uploads/{int(rng.integers(2012, 2023))}/{int(rng.integers(1, 13)):02d}/{h}.jpg"
        elif style == 2:
            path = f"/products/{int(rng.integers(1000, 99999))}/{h}_large.jpg"
        else:
            path = f"/originals/{h[:2]}/{h[2:4]}/{h}.jpg"
        url = f"http://{host}{path}"
        if url not in used:
            used.add(url)
            return url


def plant_copies(
    originals: Sequence[Image.Image | bytes],
    copies: Sequence[int],
    rng: np.random.Generator,
    *,
    exact_fraction: float = 0.35,
    n_missing: int = 2,
    n_corrupt: int = 1,
    prefix: str = "img",
    captions: Sequence[str] | None = None,
    copy_kinds: Sequence[str] | None = None,
) -> list[PlantedItem]:
    """Build the planted items for ``originals`` (images, or JPEG bytes served as they are).

    ``copies[i]`` copies of original ``i``: each is an exact byte copy with probability
    ``exact_fraction``, otherwise a random edit from :data:`EDIT_NAMES` encoded as JPEG. Copies
    share their original's caption half the time, and get a print-shop caption otherwise. Adds
    ``n_missing`` 404 entries and ``n_corrupt`` undecodable ones. URLs are ``http://`` URLs on
    example domains (serve them with a :class:`LoopbackImageServer` used as a proxy); nothing in
    them gives the group away. Items come shuffled.

    ``copy_kinds`` (``"exact"`` or edit names) fixes the kind of each copy instead, taken in
    order (copies of original 0 first) and cycled, e.g. to make sure every edit appears.
    """
    if copy_kinds is not None:
        unknown = set(copy_kinds) - {"exact", *EDIT_NAMES}
        if unknown or not copy_kinds:
            raise ValueError(f"copy_kinds must be 'exact' or edit names {EDIT_NAMES}, got {sorted(unknown) or '[]'}")
    next_kind = itertools.cycle(copy_kinds) if copy_kinds is not None else None
    items: list[PlantedItem] = []
    used: set[str] = set()
    for g, orig in enumerate(originals):
        img: Image.Image
        if isinstance(orig, bytes):
            data = orig
            img = Image.open(io.BytesIO(orig))
            img.load()
        else:
            img = orig
            data = encode_jpeg(img, 90)
        caption = captions[g] if captions is not None else laion_caption(rng)
        items.append(PlantedItem(_fresh_url(rng, used, prefix), g, "original", data, caption, img.width, img.height))
        n = copies[g] if g < len(copies) else 0
        if n == 0:
            continue
        edits = dict(edited_copies(img, rng))
        for _ in range(n):
            url = _fresh_url(rng, used, prefix)
            cap = caption if rng.random() < 0.5 else laion_caption(rng, caption, shop=True)
            if next_kind is not None:
                name = next(next_kind)
            else:
                exact = rng.random() < exact_fraction
                name = "exact" if exact else EDIT_NAMES[int(rng.integers(0, len(EDIT_NAMES)))]
            if name == "exact":
                items.append(PlantedItem(url, g, "exact", data, cap, img.width, img.height))
            else:
                edited = edits[name]
                q = 95 if name == "jpeg" else int(rng.integers(75, 96))  # "jpeg" already lost quality
                items.append(PlantedItem(url, g, name, encode_jpeg(edited, q), cap, edited.width, edited.height))
    g = len(originals)
    for _ in range(n_missing):
        items.append(PlantedItem(_fresh_url(rng, used, prefix), g, "missing", None, laion_caption(rng), 640, 480))
        g += 1
    for _ in range(n_corrupt):
        bad = corrupt_jpeg_bytes(int(rng.integers(0, 2**31)))
        items.append(PlantedItem(_fresh_url(rng, used, prefix), g, "corrupt", bad, laion_caption(rng), 512, 512))
        g += 1
    order = rng.permutation(len(items))
    return [items[int(i)] for i in order]


def laion_rows(items: Sequence[PlantedItem], rng: np.random.Generator) -> list[dict[str, Any]]:
    """LAION metadata rows for ``items``, in order.

    ``similarity``, ``punsafe``, ``pwatermark`` and ``AESTHETIC_SCORE`` are random but plausible;
    the copies of one original get scores near their original's (edited ones a bit further off),
    as in LAION, where a keep-policy on ``AESTHETIC_SCORE`` then has something to choose.
    """
    base: dict[int, tuple[float, float]] = {}
    rows = []
    for it in items:
        if it.group not in base:
            base[it.group] = (float(rng.uniform(0.28, 0.40)), float(rng.normal(5.2, 0.7)))
        sim, aes = base[it.group]
        spread = 0.0 if it.kind == "original" else 0.02 if it.kind == "exact" else 0.1
        rows.append(
            {
                "URL": it.url,
                "TEXT": it.caption,
                "WIDTH": it.width,
                "HEIGHT": it.height,
                "similarity": round(sim + float(rng.normal(0, spread / 5)), 6),
                "punsafe": round(float(rng.beta(1, 30)), 6),
                "pwatermark": round(float(rng.beta(1, 8)), 6),
                "AESTHETIC_SCORE": round(aes + float(rng.normal(0, spread * 3)), 6),
            }
        )
    return rows


def serve_and_download(
    items: Sequence[PlantedItem],
    root: str | os.PathLike[str],
    rng: np.random.Generator,
    *,
    output_format: Literal["webdataset", "parquet", "files"] = "webdataset",
    number_sample_per_shard: int = 10_000,
    inject_corrupt: bool = False,
    processes_count: int = 1,
    thread_count: int = 8,
) -> tuple[I2DOutput, GroundTruth]:
    """Write ``root/laion.parquet`` for ``items``, serve them through a loopback proxy, run
    img2dataset into ``root/i2d`` and return what it wrote with the truth keyed by URL.

    With ``inject_corrupt`` (webdataset only), the bytes of every ``"corrupt"`` item are also
    put into its tar with :func:`inject_corrupt_member`, so the output holds undecodable image
    members (img2dataset itself never stores them).
    """
    base = Path(root)
    if inject_corrupt and output_format != "webdataset":
        raise ValueError("inject_corrupt needs output_format='webdataset'")
    rows = laion_rows(items, rng)
    parquet = make_laion_parquet(base / "laion.parquet", rows)
    with LoopbackImageServer({it.url: it.data for it in items if it.data is not None}) as server:
        result = run_img2dataset(
            parquet,
            base / "i2d",
            output_format=output_format,
            number_sample_per_shard=number_sample_per_shard,
            http_proxy=server.base_url,
            processes_count=processes_count,
            thread_count=thread_count,
        )
    truth = GroundTruth({it.url: it.group for it in items}, {it.url: it.kind for it in items})
    if inject_corrupt:
        _inject_all_corrupt(result, truth, {it.url: it.data for it in items})
    return result, truth


def make_i2d_dataset(
    tmp_dir: str | os.PathLike[str],
    n_originals: int = 40,
    *,
    copies: Sequence[int] | None = None,
    failing: int = 2,
    corrupt: int = 1,
    inject_corrupt: bool = False,
    output_format: Literal["webdataset", "parquet", "files"] = "webdataset",
    number_sample_per_shard: int = 32,
    image_size: tuple[int, int] = (192, 144),
    seed: int = 0,
) -> PlantedDataset:
    """Build a small img2dataset output with planted duplicates; return ``(out_dir, truth)``.

    Generates ``n_originals`` :func:`natural_image` originals, plants ``copies[i]`` copies of
    original ``i`` (default: :func:`heavy_tailed_copies` with half as many copies as originals),
    ``failing`` URLs that answer 404 and ``corrupt`` URLs that serve undecodable bytes, then
    :func:`serve_and_download` into ``tmp_dir`` (``laion.parquet``, ``i2d/``). ``out_dir`` is
    ``tmp_dir/i2d``; ``truth`` is keyed by URL, and its ``kind`` tells how each URL was made.
    The same arguments give the same URLs, bytes and keys (only timings and the order of members
    in a tar vary). See :func:`serve_and_download` for ``inject_corrupt``.

    About 3-6 s for the default 40 originals + 20 copies on a 2-core machine.
    """
    rng = np.random.default_rng(seed)
    if copies is None:
        copies = heavy_tailed_copies(n_originals, n_originals // 2, rng)
    originals = [natural_image(seed * 100_003 + i, image_size) for i in range(n_originals)]
    items = plant_copies(originals, copies, rng, n_missing=failing, n_corrupt=corrupt)
    result, truth = serve_and_download(
        items,
        tmp_dir,
        rng,
        output_format=output_format,
        number_sample_per_shard=number_sample_per_shard,
        inject_corrupt=inject_corrupt and corrupt > 0,
    )
    return PlantedDataset(result.out_dir, truth)


def _inject_all_corrupt(result: I2DOutput, truth: GroundTruth, data_by_url: Mapping[str, bytes | None]) -> None:
    """Put the bytes of every corrupt URL into its tar (see :func:`inject_corrupt_member`)."""
    for tar, side in zip(result.shards, result.sidecars, strict=True):
        for row in pq.read_table(side, columns=["key", "url"]).to_pylist():
            data = data_by_url.get(row["url"])
            if truth.kind.get(row["url"]) == "corrupt" and data is not None:
                inject_corrupt_member(tar, row["key"], data, sidecar=side)


def make_image_folder(
    root: str | os.PathLike[str],
    n_originals: int = 6,
    *,
    copies: Sequence[int] = (3, 2, 1),
    corrupt: int = 1,
    size: tuple[int, int] = (160, 120),
    seed: int = 0,
) -> GroundTruth:
    """Write generated JPEGs with planted copies into ``root`` (with one level of subfolders).

    Originals go to ``root/originals/``, copies to ``root/copies/``, and ``corrupt`` undecodable
    ``.jpg`` files to ``root/``. Returns the truth keyed by POSIX path relative to ``root``.
    """
    base = Path(root)
    rng = np.random.default_rng(seed)
    originals = [natural_image(seed * 7919 + 1_000_000 + i, size) for i in range(n_originals)]
    items = plant_copies(originals, copies, rng, n_missing=0, n_corrupt=corrupt, prefix="x")
    group: dict[str, int] = {}
    kind: dict[str, str] = {}
    counters: dict[str, int] = {}
    for it in sorted(items, key=lambda i: (i.group, i.kind != "original", i.kind)):
        folder = "originals" if it.kind == "original" else "." if it.kind == "corrupt" else "copies"
        n = counters[folder] = counters.get(folder, -1) + 1
        stem = {"originals": f"orig_{n:03d}", "copies": f"copy_{n:03d}_{it.kind}", ".": f"broken_{n:02d}"}[folder]
        rel = f"{stem}.jpg" if folder == "." else f"{folder}/{stem}.jpg"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        assert it.data is not None
        (base / rel).write_bytes(it.data)
        group[rel] = it.group
        kind[rel] = it.kind
    return GroundTruth(group, kind)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def pairwise_scores(predicted: Mapping[str, Hashable | None], truth: Mapping[str, int]) -> tuple[float, float]:
    """Pairwise precision and recall of a clustering against ground-truth groups.

    ``predicted`` maps an item to its cluster id (``None`` = a cluster of its own). Only items
    present in both mappings count. A pair is predicted when both share a cluster, true when both
    share a group. Returns ``(precision, recall)``; each is 1.0 when it has no pairs to judge.
    """
    common = [k for k in predicted if k in truth]
    by_cluster: dict[Hashable, list[str]] = {}
    for k in common:
        c = predicted[k]
        if c is not None:
            by_cluster.setdefault(c, []).append(k)
    by_group: dict[int, list[str]] = {}
    for k in common:
        by_group.setdefault(truth[k], []).append(k)
    pred_pairs = {frozenset(p) for m in by_cluster.values() for p in itertools.combinations(m, 2)}
    true_pairs = {frozenset(p) for m in by_group.values() for p in itertools.combinations(m, 2)}
    hit = len(pred_pairs & true_pairs)
    precision = hit / len(pred_pairs) if pred_pairs else 1.0
    recall = hit / len(true_pairs) if true_pairs else 1.0
    return precision, recall
