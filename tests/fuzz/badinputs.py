"""A corpus of bad (and odd but valid) inputs, made on the fly: nothing binary is committed.

Used by ``tests/test_reliability.py`` (through the whole pipeline), ``tests/test_properties.py``
and as the seed corpus of ``fuzz_readers.py``. Every builder is deterministic.

Each image case says what the manifest must say about it: ``Bad(substring)`` for a ``failed``
row whose one-line error contains ``substring``, ``Odd((width, height))`` for an ``ok`` row of
that decoded size (after EXIF orientation).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass(frozen=True)
class Bad:
    """A failed row whose error contains ``reason``."""

    reason: str


@dataclass(frozen=True)
class Odd:
    """An ``ok`` row with this decoded (width, height)."""

    size: tuple[int, int]


@dataclass(frozen=True)
class Case:
    name: str
    ext: str
    data: bytes
    expect: Bad | Odd


def picture(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small deterministic RGB picture with structure (not flat: every hash has work to do)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (3 + c) + yy * (5 - c)) % 256 for c in range(3)], axis=-1).astype(np.float32)
    base += rng.normal(0, 25, (1, 1, 3)).astype(np.float32)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        base[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring ``width`` x ``height``, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")


def png_text_bomb() -> bytes:
    """A valid 8x8 PNG carrying a zTXt chunk that inflates to 8 MB: PIL refuses text chunks over
    1 MB (``PngImagePlugin.MAX_TEXT_CHUNK``) before inflating them whole."""
    img = encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
    body = b"Comment\0\0" + zlib.compress(b"A" * (8 << 20), 9)
    return img[:33] + _png_chunk(b"zTXt", body) + img[33:]


def jpeg_bomb(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 declares ``width`` x ``height`` (3 components), and nothing to decode."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def gif_bomb(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame declare ``width`` x ``height``."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b";"


def gif_frame_bomb(width: int, height: int) -> bytes:
    """A 16x16 GIF whose first frame declares ``width`` x ``height`` and "restore to background"
    disposal: PIL grows the image to the frame and allocates a frame-sized buffer while merely
    *opening* the file (4 GB for 70 bytes; found by the fuzzer)."""
    head = b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0)
    transparency = b"\x21\xf9\x04\x08\x00\x00\x00\x00"  # graphic control: disposal 2
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return head + transparency + frame + b";"


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (20, 14), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buf.getvalue()


def exif_rotated() -> bytes:
    """A 40x20 JPEG whose EXIF says: display rotated by 90 degrees (so 20x40)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(picture(7, (40, 20)), "JPEG", exif=exif)


def palette_with_transparency() -> bytes:
    img = Image.new("P", (12, 10), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * (254 * 3))
    img.paste(1, (6, 0, 12, 10))
    return encode(img, "PNG", transparency=0)


def sixteen_bit_grey() -> bytes:
    grey = np.asarray(picture(8, (30, 20)).convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def image_cases() -> list[Case]:
    """The bad-image corpus: every way an image file in a scraped shard goes wrong, and the odd
    but valid images that must decode."""
    jpeg = encode(picture(1), "JPEG", quality=90)
    progressive = encode(picture(2), "JPEG", quality=90, progressive=True)
    png = encode(picture(3), "PNG")
    webp = encode(picture(4), "WEBP", quality=80)
    gif = encode(picture(5), "GIF")
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>"
    return [
        # --- damaged or not an image: a failed row -------------------------------------------
        Case("truncated_jpeg", "jpg", jpeg[: len(jpeg) // 2], Bad("truncated")),
        Case("truncated_progressive_jpeg", "jpg", progressive[: len(progressive) * 2 // 3], Bad("truncated")),
        Case("truncated_jpeg_header", "jpg", jpeg[:40], Bad("cannot read")),
        Case("truncated_png", "png", png[: len(png) // 2], Bad("truncated")),
        Case("truncated_webp", "webp", webp[: len(webp) // 2], Bad("cannot read")),
        Case("truncated_gif", "gif", gif[: len(gif) // 2], Bad("truncated")),
        Case("corrupt_jpeg_body", "jpg", jpeg[:20] + bytes(2048), Bad("JPEG")),
        Case("soi_only", "jpg", b"\xff\xd8\xff", Bad("JPEG")),
        Case("random_bytes", "jpg", bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)), Bad("not a recognised image format")),
        Case("zero_bytes_jpg", "jpg", b"", Bad("empty image data (0 bytes)")),
        Case("zero_bytes_png", "png", b"", Bad("empty image data (0 bytes)")),
        Case("html_as_jpg", "jpg", html, Bad("not an image: an HTML document")),
        Case("html_as_png", "png", b"<html><body>Access Denied</body></html>", Bad("not an image: an HTML document")),
        Case("text_as_webp", "webp", b"Rate limit exceeded. Try again later.\n", Bad("not an image: text")),
        Case("json_as_jpg", "jpg", b'{"error": "forbidden"}', Bad("not an image: JSON-like text")),
        Case("svg_as_png", "png", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', Bad("not a raster image: SVG")),
        Case("pdf_as_jpg", "jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", Bad("unsupported format: PDF")),
        Case("png_bomb", "png", png_bomb(50_000, 50_000), Bad("image declares 50000x50000")),
        Case("jpeg_bomb", "jpg", jpeg_bomb(65_000, 65_000), Bad("image declares 65000x65000")),
        Case("gif_bomb", "gif", gif_bomb(65_535, 65_535), Bad("image declares 65535x65535")),
        Case("png_text_bomb", "png", png_text_bomb(), Bad("Decompressed data too large")),
        Case("gif_frame_bomb", "gif", gif_frame_bomb(65_535, 65_535), Bad("image declares 65535x65535")),
        # --- odd but valid: an ok row of the right size ---------------------------------------
        Case("cmyk_jpeg", "jpg", encode(picture(9).convert("CMYK"), "JPEG", quality=90), Odd((64, 48))),
        Case("grey_jpeg", "jpg", encode(picture(10).convert("L"), "JPEG"), Odd((64, 48))),
        Case("sixteen_bit_png", "png", sixteen_bit_grey(), Odd((30, 20))),
        Case("palette_transparency_png", "png", palette_with_transparency(), Odd((12, 10))),
        Case("rgba_png", "png", encode(picture(11).convert("RGBA"), "PNG"), Odd((64, 48))),
        Case("la_png", "png", encode(picture(12).convert("LA"), "PNG"), Odd((64, 48))),
        Case("rgba_webp", "webp", encode(picture(13).convert("RGBA"), "WEBP", lossless=True), Odd((64, 48))),
        Case("animated_gif", "gif", animated("GIF"), Odd((20, 14))),
        Case("animated_webp", "webp", animated("WEBP"), Odd((20, 14))),
        Case("exif_rotated_jpeg", "jpg", exif_rotated(), Odd((20, 40))),
        Case("one_pixel_png", "png", encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), Odd((1, 1))),
        Case("one_pixel_gif", "gif", encode(Image.new("P", (1, 1), 3), "GIF"), Odd((1, 1))),
        Case("one_by_300_strip", "png", encode(picture(14, (1, 300)), "PNG"), Odd((1, 300))),
        Case("bmp", "bmp", encode(picture(15), "BMP"), Odd((64, 48))),
        Case("tiff", "tif", encode(picture(16), "TIFF"), Odd((64, 48))),
    ]


# --- containers ---------------------------------------------------------------------------------


def tar_bytes(members: Sequence[tuple[str | tarfile.TarInfo, bytes]]) -> bytes:
    """An uncompressed tar of ``(name or TarInfo, data)`` members, with fixed mtimes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            info.size = len(data) if info.isfile() else 0
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def sample_members(key: str, image: bytes, *, url: str | None = None, caption: str | None = None, ext: str = "jpg") -> list[tuple[str | tarfile.TarInfo, bytes]]:
    """One img2dataset webdataset sample: ``key.jpg``, ``key.txt``, ``key.json``."""
    meta = meta_row(key, url=url, caption=caption)
    return [
        (f"{key}.{ext}", image),
        (f"{key}.txt", (meta["caption"] or "").encode("utf-8", "surrogatepass")),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


def meta_row(key: str, *, url: str | None = None, caption: str | None = None, status: str = "success", error: str | None = None) -> dict[str, Any]:
    return {
        "url": url if url is not None else f"http://example.com/{key}.jpg",
        "caption": caption if caption is not None else f"caption of {key}",
        "key": key,
        "status": status,
        "error_message": error,
        "width": None,
        "height": None,
    }


SIDECAR_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def write_sidecar(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    pq.write_table(pa.Table.from_pylist(list(rows), schema=SIDECAR_SCHEMA), path)


def sidecar_bytes(rows: Sequence[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=SIDECAR_SCHEMA), buf)
    return buf.getvalue()


def i2d_parquet_bytes(n: int) -> bytes:
    """img2dataset ``parquet`` output: rows with a ``jpg`` column of image bytes."""
    rows = [{**meta_row(f"{i:09d}"), "jpg": encode(picture(i, (16, 12)), "JPEG")} for i in range(n)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()
