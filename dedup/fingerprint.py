"""Decode an image once and derive every per-image signal from that one decode.

The fingerprint stage turns the encoded bytes of a sample into :class:`Features` (size, exact
hashes, pHash, PDQ) plus the small model input of the embedder, so the full-size image can be
freed at once: decoding is the dominant cost per image, and a billion-image run cannot afford
to do it twice or to keep decoded images around.

A bad image is a row, not an exception: :func:`fingerprint` never raises for bad data; it
returns ``Features(status="failed", error=<one line>)``. :func:`decode` raises
:class:`~dedup.errors.SampleError` with that line, for callers that want the image itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import math
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import imagehash
import numpy as np
import pdqhash
from PIL import Image, ImageOps, UnidentifiedImageError

from dedup.config import FingerprintConfig
from dedup.errors import SampleError

__all__ = ["Features", "decode", "fingerprint", "hamming", "pdq_dihedral", "pixel_sha256", "trim_borders", "trim_box"]

# The formats we open, most common first (Image.open tries them in this order). An allow-list
# rather than PIL's full registry: PIL's EPS plugin runs Ghostscript on the data, and a
# web-scraped data set must never make us start an external program; every other parser is
# attack surface too, and formats without a magic number (TGA) would claim random junk.
# This is what browsers show, plus TIFF and netpbm from older crawls and research sets.
_FORMATS = (
    "JPEG",  # also opens MPO (multi-picture JPEG from cameras)
    "PNG",  # and APNG
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "AVIF",
    "ICO",
    "JPEG2000",
    "PPM",
)

# PDQ hashes images fitted within this square by default, as Meta's Python reference hasher
# does (FingerprintConfig.pdq_side); see _pdq_input for what was measured.
_PDQ_MAX_SIDE = 512

_WHITE = (255, 255, 255)

# PIL's own decompression-bomb check reads the module global Image.MAX_IMAGE_PIXELS: it warns
# between 1x and 2x that limit and raises above 2x, before we can see the declared size. We
# replace it with our own check against FingerprintConfig.max_pixels, so we lift PIL's limit
# while we parse the header (cheap) and, for the rare images above PIL's limit that ours
# allows, while we decode them. PIL also warns about broken EXIF while parsing headers (JPEG
# reads EXIF for its DPI): common in crawled images, harmless to the pixels, and it would be
# stderr noise in a run and an error under pytest, so warnings are silenced in the same
# window. Both are process-wide state: the lock keeps our threads from racing on them (and
# from restoring each other's values), and both are always restored, so nothing outlives the
# call. Decoding itself, the expensive part, runs outside the lock.
_PIL_GUARD_LOCK = threading.Lock()


@dataclass(slots=True)
class Features:
    """What the fingerprint stage knows about one sample.

    Hashes are bytes (exact hashes, PDQ) or an unsigned int (pHash) so the manifest and the
    search stage can store them as integers/fixed-size binary, never as hex strings.
    """

    status: str  # "ok" | "failed"
    error: str | None = None  # one line, for failed samples
    width: int | None = None  # decoded size, after EXIF orientation
    height: int | None = None
    sha256: bytes | None = None  # of the encoded bytes (32 bytes)
    pixel_sha256: bytes | None = None  # of the decoded RGB pixels and the size (32 bytes)
    phash: int | None = None  # 64-bit pHash, == int(str(imagehash.phash(img)), 16)
    pdq: bytes | None = None  # 256-bit PDQ, Meta's bit order, packed MSB-first (32 bytes)
    pdq_quality: int | None = None  # PDQ's own 0..100 quality (low: flat, featureless image)
    # PDQ of the 7 other rotations/flips (rot 90, 180, 270, flip LR, flip TB, transpose,
    # transverse), 7 x 32 bytes, when FingerprintConfig.pdq_dihedral: one pass, same cost.
    pdq_variants: bytes | None = None
    # What the embedding saw, as shares of the decoded size: (left, top, right, bottom), (0, 0, 1,
    # 1) when nothing was trimmed; None when no model input was made. The second look crops its
    # re-read image to the same box instead of measuring the margins again.
    trim: tuple[float, float, float, float] | None = None

    @classmethod
    def failed(cls, error: str) -> Features:
        """A failed sample with a one-line reason."""
        return cls(status="failed", error=_one_line(error))


def decode(data: bytes, *, max_pixels: int, draft: int | None = None, grey: bool = False) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB image, as every signal expects it.

    The size is checked before the pixels are decoded, so a small file declaring a huge image
    (a decompression bomb) costs nothing. EXIF orientation is applied, so a photo and its
    rotated-by-metadata twin decode alike. Animated images give their first frame. Transparent
    pixels are composited onto white (what a browser, and so a person, sees on a page), and
    CMYK, 16-bit and other modes become 8-bit RGB. Truncated files fail: PIL's
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left as it is (False), because a truncated JPEG
    decoded with a grey bottom half would be fingerprinted as a different image.

    ``draft`` (pixels) lets a JPEG decode at a power-of-two reduction whose sides stay at
    least that large (libjpeg scales in the DCT: several times faster), for callers that
    need a small image only; exact pixel hashes must never use it. ``grey`` gives the image's
    luma (mode ``L``, as ``convert("L")`` of the RGB image makes it) for callers that look at
    brightness only: a colour JPEG then decodes its luma plane alone, without the colour
    conversion (a sixth of the second look's decoding and grey conversion on the bench).

    Raises:
        SampleError: with a one-line reason, for anything that is not a usable image.
    """
    if not data:
        raise SampleError("empty image data (0 bytes)")
    declared = _gif_size(data)
    if declared is not None:
        _check_size(*declared, max_pixels=max_pixels)
    try:
        # A GIF's frames can be larger than what _gif_size parsed (its blocks are easy to
        # damage in ways PIL reads differently), and PIL allocates the first frame while
        # opening: for GIFs PIL's own check stays on, at our limit (it raises above twice the
        # value set), so no frame over max_pixels is ever allocated (found by tests/fuzz).
        with _pil_guard(max(1, max_pixels // 2) if declared is not None else None):
            im = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError:
        raise SampleError(f"GIF frame declares more than fingerprint.max_pixels={max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise SampleError(_unidentified_reason(data)) from None
    except Exception as err:  # corrupt headers raise anything; each is a row
        raise SampleError(f"cannot read image header: {_describe(err)}") from None
    try:
        width, height = im.size
        pixels = width * height
        _check_size(width, height, max_pixels=max_pixels)
        if im.format == "JPEG" and (draft is not None or grey):
            # (PIL takes the "L" draft only for a colour JPEG; CMYK ones stay CMYK)
            im.draft("L" if grey else "RGB", (draft, draft) if draft is not None else im.size)
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and pixels > limit:
            # Rare and huge: decode one at a time under the lock, which also bounds memory.
            with _pil_guard():
                im.load()
        else:
            im.load()
        with _pil_guard():  # EXIF of PNG/WebP is parsed here, and may warn as above
            _exif_transpose(im)
        if grey and im.mode == "L" and "transparency" not in im.info:
            rgb = im  # a JPEG's luma plane (or a grey image): nothing to convert
        else:
            rgb = _to_rgb(im)  # transparency flattened onto white first, as for colour
            if grey:
                rgb = rgb.convert("L")
    except SampleError:
        im.close()
        raise
    except Exception as err:  # truncated/corrupt data raises many types
        im.close()
        raise SampleError(f"cannot decode {im.format or 'image'} data: {_describe(err)}") from None
    if rgb is not im:
        im.close()  # free the undecoded-mode copy now, not when the GC gets to it
    return rgb


def fingerprint(
    data: bytes | None,
    cfg: FingerprintConfig,
    *,
    prepare: Callable[[Image.Image], np.ndarray] | None = None,
    pixel_hash: bool = True,
) -> tuple[Features, np.ndarray | None]:
    """Decode ``data`` once and compute every configured signal from that decode.

    Returns the features and ``prepare(image)`` (the embedder's model input, small), so the
    caller never holds the full-size image. Never raises for bad data: a sample that cannot be
    used comes back as ``Features(status="failed", error=...)`` and ``None``.
    ``pixel_hash=False`` leaves ``pixel_sha256`` None (not computed): the per-shard stage hashes
    pixels later, only for the rows where it can label a link (:mod:`dedup.pixels`).
    """
    if data is None:
        return Features.failed("no image bytes"), None
    try:
        img = decode(data, max_pixels=cfg.max_pixels)
    except SampleError as err:
        return Features.failed(str(err)), None

    width, height = img.size
    features = Features(
        status="ok",
        width=width,
        height=height,
        sha256=hashlib.sha256(data).digest(),
        pixel_sha256=_pixel_sha256(np.asarray(img)) if pixel_hash else None,
    )
    if cfg.phash:
        features.phash = _phash(img)
    if cfg.pdq:
        luma = _pdq_input(img, cfg.pdq_side)
        if cfg.pdq_dihedral:
            packed, quality = _pdq_hashes(luma, dihedral=True)
            features.pdq, features.pdq_quality, features.pdq_variants = packed[:32], quality, packed[32:]
        else:
            features.pdq, features.pdq_quality = _pdq_hashes(luma, dihedral=False)
    if prepare is None:
        return features, None
    features.trim = (0.0, 0.0, 1.0, 1.0)
    if cfg.trim:
        box = trim_box(img)
        if box is not None:
            features.trim = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
            img = img.crop(box)
    return features, prepare(img)


def trim_borders(
    img: Image.Image, *, tolerance: int = 24, rounds: int = 3, preview: Image.Image | None = None
) -> Image.Image:
    """``img`` without uniform margins (letterbox bars, padding, a clip art's empty canvas).

    A border is trimmed when the four corners share one colour (within ``tolerance`` per
    channel, on a 128-pixel thumbnail that smooths JPEG noise): everything farther than that
    from it is content, and the content's bounding box is kept. Up to ``rounds`` times, so a
    white drawing padded with black bars comes down to the drawing, as its unpadded original
    does. Images without such margins (most photos) come back unchanged; so does an image that
    is all margin. The embedding sees the trimmed image; hashes and sizes keep the whole one.
    ``preview``, a smaller copy of ``img`` already at hand, makes the thumbnail cheaply.
    """
    box = trim_box(img, tolerance=tolerance, rounds=rounds, preview=preview)
    return img if box is None else img.crop(box)


def trim_box(
    img: Image.Image, *, tolerance: int = 24, rounds: int = 3, preview: Image.Image | None = None
) -> tuple[int, int, int, int] | None:
    """The box ``(left, top, right, bottom)`` that :func:`trim_borders` crops ``img`` to, or
    None when it keeps the whole image."""
    rgb = preview if preview is not None else img
    rgb = rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    thumb = np.asarray(rgb.resize(_fit_within(rgb.size, 128) or rgb.size, Image.Resampling.BILINEAR), np.int16)
    top, left, bottom, right = 0, 0, thumb.shape[0], thumb.shape[1]
    for _ in range(rounds):
        arr = thumb[top:bottom, left:right]
        h, w = arr.shape[:2]
        if h < 8 or w < 8:
            break
        # One pixel in from the edge: the outermost ring may be a seam blurred by the thumbnail.
        inner = arr[1:-1, 1:-1]
        corners = inner[[0, 0, -1, -1], [0, -1, 0, -1]]
        # |x - colour| > tolerance, colour the corners' median per channel, all in int16: the
        # median of four integers is half the sum of the middle two, so doubling both sides
        # keeps it exact (and a third of the time of the float max over the channel axis;
        # np.median itself cost 0.1 ms an image)
        middle = np.sort(corners, axis=0)
        twice = middle[1] + middle[2]
        if np.abs(2 * corners - twice).max() > 2 * tolerance:
            break
        far = np.abs(2 * inner - twice) > 2 * tolerance
        content = far[..., 0] | far[..., 1] | far[..., 2]
        rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
        if rows.size == 0 or (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) > 0.97 * h * w:
            break
        top, bottom, left, right = top + rows[0] + 1, top + rows[-1] + 2, left + cols[0] + 1, left + cols[-1] + 2
    if (top, left, bottom, right) == (0, 0, thumb.shape[0], thumb.shape[1]):
        return None
    sx, sy = img.width / thumb.shape[1], img.height / thumb.shape[0]
    box = (int(left * sx), int(top * sy), min(img.width, math.ceil(right * sx)), min(img.height, math.ceil(bottom * sy)))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return None
    return box




def pdq_dihedral(img: Image.Image, *, side: int = _PDQ_MAX_SIDE) -> list[bytes]:
    """The 8 PDQ hashes of an image's rotations and flips, from one pass over the pixels.

    Order as pdqhash returns them: original, rotated 90, 180, 270, flipped left-right,
    flipped top-bottom, transposed, transversed. The first equals ``Features.pdq`` for the
    same image and ``side`` (``FingerprintConfig.pdq_side``), so a flipped or rotated copy is
    found by comparing one image's PDQ against the other's 8 variants.
    """
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    packed, _quality = _pdq_hashes(_pdq_input(rgb, side), dihedral=True)
    return [packed[i : i + 32] for i in range(0, len(packed), 32)]


def hamming(a: bytes, b: bytes) -> int:
    """The number of differing bits between two equal-length hashes (PDQ, exact, ...)."""
    if len(a) != len(b):
        raise ValueError(f"hashes differ in length: {len(a)} and {len(b)} bytes")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()


# --- helpers -------------------------------------------------------------------------------


def _check_size(width: int, height: int, *, max_pixels: int) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise SampleError(
            f"image declares {width}x{height} = {pixels:.3g} pixels, "
            f"over fingerprint.max_pixels={max_pixels}"
        )
    if width < 1 or height < 1:
        raise SampleError(f"image declares an empty size {width}x{height}")


def _gif_size(data: bytes) -> tuple[int, int] | None:
    """The size PIL will give a GIF, read from its header without PIL; None if not a GIF.

    Other formats are checked after ``Image.open`` (which only parses headers), but PIL's GIF
    reader allocates a buffer of the first frame's size while *opening* (for its disposal and
    transparency), so a 70-byte GIF declaring a 65535 x 65535 frame costs 4 GB before any check
    could run (found by tests/fuzz). PIL's size is the logical screen, grown to the first
    frame's extent; that is what this returns.
    """
    if len(data) < 13 or not data.startswith((b"GIF87a", b"GIF89a")):
        return None
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # the global colour table
    while pos < len(data) and data[pos] != 0x3B:  # up to the trailer, as PIL reads it
        if data[pos] == 0x2C:  # image descriptor: left, top, width, height
            if pos + 9 > len(data):
                break
            left, top, frame_w, frame_h = struct.unpack_from("<HHHH", data, pos + 1)
            return max(width, left + frame_w), max(height, top + frame_h)
        if data[pos] == 0x21:  # extension: introducer, label, sub-blocks up to a zero length
            pos += 2
            while pos < len(data) and data[pos]:
                pos += data[pos] + 1
        pos += 1  # past the terminator, or past a byte PIL skips as an unknown tag
    return width, height


@contextmanager
def _pil_guard(limit: int | None = None) -> Iterator[None]:
    """PIL's bomb check off (or at ``limit``) and its warnings silenced for the block; see
    _PIL_GUARD_LOCK."""
    with _PIL_GUARD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _exif_transpose(im: Image.Image) -> None:
    """Apply the EXIF orientation in place; an unreadable EXIF block leaves the image as is.

    Broken EXIF is common in crawled images and says nothing about the pixels, which decoded
    fine: failing the sample for it would lose a usable image.
    """
    with suppress(Exception):  # any EXIF parse error means "no orientation"
        ImageOps.exif_transpose(im, in_place=True)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB, with transparency flattened onto white and deep modes scaled sensibly."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # PNG tRNS (a transparent colour or per-index palette alpha) and GIF transparency
        # live in info; converting to RGBA applies them.
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_deep_to_8bit(im), "L").convert("RGB")
    # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK JPEGs), YCbCr, LAB, HSV, ...
    return im.convert("RGB")


def _deep_to_8bit(im: Image.Image) -> np.ndarray:
    """16-bit and 32-bit grey to 8 bits, keeping the look rather than clipping at 255.

    PIL's own conversion of I;16 to L clips every value above 255 to white. A 16-bit file
    made from an 8-bit one stores v * 257, so the high byte gives the 8-bit image back
    exactly, and the same picture hashes alike at either depth.
    """
    arr: np.ndarray = np.asarray(im)
    out: np.ndarray
    if im.mode.startswith("I;16"):
        out = (arr.astype(np.uint16) >> 8).astype(np.uint8)
    elif im.mode == "F":
        scaled = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        out = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    elif arr.max(initial=0) > 255:
        # "I": 32-bit ints; PNG/PPM/TIFF store 16-bit data this way, but 8-bit data too.
        out = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
    else:
        out = np.clip(arr, 0, 255).astype(np.uint8)
    return out


def pixel_sha256(data: bytes, *, max_pixels: int) -> bytes:
    """The exact-pixel hash of encoded bytes, as :func:`fingerprint` computes it (full decode).

    Raises:
        SampleError: the bytes are not a usable image.
    """
    img = decode(data, max_pixels=max_pixels)
    try:
        return _pixel_sha256(np.asarray(img))
    finally:
        img.close()


def _pixel_sha256(pixels: np.ndarray) -> bytes:
    """SHA-256 of the size and the RGB bytes: equal for the same pixels in any encoding.

    The size goes in first so that two images whose pixel bytes happen to be equal but whose
    shapes differ (e.g. 2x6 and 6x2, or 3x4 and 4x3) never collide.
    """
    height, width = pixels.shape[:2]
    digest = hashlib.sha256(struct.pack(">II", width, height))
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.digest()


def _phash(img: Image.Image) -> int:
    """imagehash's pHash as a 64-bit unsigned int (bit order of ``int(str(h), 16)``)."""
    bits = imagehash.phash(img).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _pdq_input(img: Image.Image, side: int = _PDQ_MAX_SIDE) -> np.ndarray:
    """The uint8 array PDQ hashes: the image's luma ``(height, width)``, fitted within ``side`` x
    ``side``.

    Fitting is what Meta's Python reference hasher does (``thumbnail((512, 512))``, bicubic),
    and measured on photos and clip art it makes resized copies *closer* (median 2 bits apart
    instead of 6 for 30-70 % resized JPEG copies), because every image reaches PDQ's own
    64 x 64 filter from the same scale. It also bounds the cost: pdqhash spends ~15 ns per
    input pixel (80 ms for a 2048 x 1536 image, 12 ms after fitting). PDQ sees luma only, with
    the weights of PIL's ``convert("L")`` (ITU-R 601), so the luma is taken first and one channel
    resized instead of three: 0.9 ms an image less on the bench, the hashes equal but for the
    rounding of the luma (median 0 bits apart).
    """
    luma = img if img.mode == "L" else img.convert("L")
    size = _fit_within(luma.size, max(1, side))
    if size is not None:
        luma = luma.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.asarray(luma)


def _fit_within(size: tuple[int, int], side: int) -> tuple[int, int] | None:
    """The size ``Image.thumbnail((side, side))`` gives, or None when it would not shrink.

    Same rounding as PIL's thumbnail, so the result equals it without thumbnail's copy.
    """
    width, height = size
    if width <= side and height <= side:
        return None
    aspect = width / height
    if aspect <= 1:  # fit the height, round the width to keep the aspect closest
        candidates = (math.floor(side * aspect), math.ceil(side * aspect))
        new_w = max(min(candidates, key=lambda n: abs(aspect - n / side)), 1)
        return new_w, side
    candidates = (math.floor(side / aspect), math.ceil(side / aspect))
    new_h = max(min(candidates, key=lambda n: 0 if n == 0 else abs(aspect - side / n)), 1)
    return side, new_h


def _pdq_hashes(luma: np.ndarray, *, dihedral: bool) -> tuple[bytes, int]:
    """PDQ of a uint8 luma array ``(height, width)``: the hash (32 bytes, Meta's bit order), or
    with ``dihedral`` the 8 of its rotations and flips (256 bytes, pdqhash's order), and the
    quality.

    pdqhash's own C++ is called on the float luma (:data:`_PDQ_CORE`), as
    ``pdqhash.compute_dihedral`` does, without its Python around it: that converts the image to
    grey in float64 (our luma, three equal channels, comes back exactly: x * (0.299 + 0.587 +
    0.114) rounds to x in float32) and unpacks each hash bit by bit in a Python loop, 0.5 of its
    1.6 ms an image on the bench. The 8 orientations come from one DCT there: the C++ flips the
    signs and transposes the 16 x 16 coefficients (``dct16OriginalToRotate90`` ...). Where the
    functions cannot be found (another build of pdqhash), pdqhash's Python API gives the same
    hashes (tests/test_fingerprint.py compares the two).
    """
    if _PDQ_CORE is None:
        rgb = np.broadcast_to(luma[..., None], (*luma.shape, 3))  # read as is: no copy
        if dihedral:
            hashes, quality = pdqhash.compute_dihedral(rgb)
            return b"".join(_pack_bits(h) for h in hashes), int(quality)
        bits, quality = pdqhash.compute(rgb)
        return _pack_bits(bits), int(quality)
    single, eight = _PDQ_CORE
    # C order, as the C++ reads it; it filters this buffer in place
    grey = np.array(luma, dtype=np.float32, order="C", ndmin=2)
    scratch = np.zeros_like(grey)
    b64x64, b16x64 = np.empty((64, 64), np.float32), np.empty((16, 64), np.float32)
    b16x16, aux = np.empty((16, 16), np.float32), np.empty((16, 16), np.float32)
    words = np.zeros((8 if dihedral else 1, 16), np.uint16)  # Hash256: 16 words, least significant first
    quality = ctypes.c_int(0)
    rows, cols = grey.shape
    ptr = ctypes.c_void_p
    if dihedral:
        base = words.ctypes.data
        eight(ptr(grey.ctypes.data), ptr(scratch.ctypes.data), rows, cols, ptr(b64x64.ctypes.data),
              ptr(b16x64.ctypes.data), ptr(b16x16.ctypes.data), ptr(aux.ctypes.data),
              *(ptr(base + 32 * i) for i in range(8)), ctypes.byref(quality))
    else:
        single(ptr(grey.ctypes.data), ptr(scratch.ctypes.data), rows, cols, ptr(b64x64.ctypes.data),
               ptr(b16x64.ctypes.data), ptr(b16x16.ctypes.data), ptr(words.ctypes.data), ctypes.byref(quality))
    # Meta's bit order, most significant first: the words from the last, each big-endian
    return words[:, ::-1].astype(">u2").tobytes(), int(quality.value)


def _pdq_core() -> tuple[Any, Any] | None:
    """pdqhash's C++ hash functions (single, dihedral) from its extension module, or None."""
    try:
        from pdqhash import bindings

        lib = ctypes.CDLL(bindings.__file__)
        single = lib["_ZN8facebook3pdq7hashing23pdqHash256FromFloatLumaEPfS2_iiPA64_fS4_PA16_fRNS1_7Hash256ERi"]
        eight = lib[
            "_ZN8facebook3pdq7hashing33pdqDihedralHash256esFromFloatLumaEPfS2_iiPA64_fS4_PA16_fS6_"
            "PNS1_7Hash256ES8_S8_S8_S8_S8_S8_S8_Ri"
        ]
    except (ImportError, OSError, AttributeError):  # no such symbols in this build
        return None
    ptr, num = ctypes.c_void_p, ctypes.c_int
    single.argtypes = [ptr, ptr, num, num, ptr, ptr, ptr, ptr, ptr]
    eight.argtypes = [ptr, ptr, num, num, ptr, ptr, ptr, ptr, *([ptr] * 8), ptr]
    single.restype = eight.restype = None
    return single, eight


_PDQ_CORE = _pdq_core()


def _pack_bits(bits: np.ndarray) -> bytes:
    """pdqhash's 256 0/1 values (most significant first) as 32 bytes; hex() is Meta's hex."""
    return np.packbits(bits.astype(np.uint8)).tobytes()


# Magic numbers, to name what PIL could not open: a format we read whose header is broken,
# or one we do not read at all (dedup never starts an external converter).
_MAGIC: tuple[tuple[bytes, int, str, bool], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG", True),
    (b"\x89PNG", 0, "PNG", True),
    (b"GIF8", 0, "GIF", True),
    (b"WEBP", 8, "WebP", True),
    (b"ftypavif", 4, "AVIF", True),
    (b"ftypheic", 4, "HEIC", False),
    (b"ftypheix", 4, "HEIC", False),
    (b"ftypmif1", 4, "HEIF", False),
    (b"%PDF", 0, "PDF", False),
    (b"%!PS", 0, "PostScript", False),
)


def _unidentified_reason(data: bytes) -> str:
    """Say what the bytes are when PIL cannot open them (a common failed-download mode).

    PIL's own message names the BytesIO object's memory address, which would make manifests
    differ between runs, so it is never used.
    """
    size = f"{len(data)} bytes"
    for magic, offset, name, readable in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if readable:
                return f"cannot read {name} header: corrupt ({size})"
            return f"unsupported format: {name} ({size})"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return f"not an image: an HTML document ({size})"
    if head.startswith((b"<?xml", b"<svg")) and b"<svg" in head:
        return f"not a raster image: SVG ({size})"
    if head.startswith((b"{", b"[")):
        return f"not an image: JSON-like text ({size})"
    sample = data[:512]
    if sum(32 <= c < 127 or c in (9, 10, 13) for c in sample) >= 0.95 * len(sample):
        return f"not an image: text ({size})"
    return f"not a recognised image format (starts with {data[:8].hex()}, {size})"


def _describe(err: BaseException) -> str:
    """A one-line description of a decoder exception.

    PIL reports bad data as OSError/SyntaxError/ValueError with a readable message; anything
    else (KeyError, IndexError, ...) is only understandable with its type name.
    """
    text = str(err)
    if text and isinstance(err, OSError | SyntaxError | ValueError | EOFError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace (manifest errors are one line) and bound the length."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
