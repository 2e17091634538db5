"""dedup.fingerprint: hashes checked against their reference libraries, and every bad input
kind a crawl produces turned into a failed row with a one-line reason."""

from __future__ import annotations

import io
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pdqhash
import pytest
from _configs import plain_fingerprint
from _data import natural_image
from PIL import Image

from dedup.config import FingerprintConfig
from dedup.errors import SampleError
from dedup.fingerprint import Features, decode, fingerprint, hamming, pdq_dihedral

CFG = plain_fingerprint(phash=True)  # every signal, so each is tested


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring ``width`` x ``height`` RGB, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _ok(data: bytes, cfg: FingerprintConfig = CFG) -> Features:
    features, _ = fingerprint(data, cfg)
    assert features.status == "ok", features.error
    return features


# --- hashes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(256, 192), (512, 512), (731, 389), (1100, 900)])
def test_phash_equals_imagehash_bit_for_bit(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "img.jpg"
    natural_image(sum(size), size).save(path, quality=88)
    with Image.open(path) as img:
        expected = int(str(imagehash.phash(img)), 16)
    assert _ok(path.read_bytes()).phash == expected


def test_sha256_is_of_the_encoded_bytes() -> None:
    import hashlib

    data = _encode(natural_image(1), "JPEG")
    assert _ok(data).sha256 == hashlib.sha256(data).digest()


def test_pixel_hash_equal_across_lossless_encodings() -> None:
    img = natural_image(2)
    png, bmp, tiff = (_encode(img, f) for f in ("PNG", "BMP", "TIFF"))
    webp = _encode(img, "WEBP", lossless=True)
    feats = [_ok(d) for d in (png, bmp, tiff, webp)]
    assert len({f.pixel_sha256 for f in feats}) == 1
    assert len({f.sha256 for f in feats}) == 4  # the files differ, the pixels do not
    assert len({f.pdq for f in feats}) == 1 and len({f.phash for f in feats}) == 1


def test_pixel_hash_changes_with_one_pixel() -> None:
    img = natural_image(3)
    edited = img.copy()
    r, g, b = edited.getpixel((10, 10))  # type: ignore[misc]
    edited.putpixel((10, 10), ((r + 1) % 256, g, b))
    assert _ok(_encode(img, "PNG")).pixel_sha256 != _ok(_encode(edited, "PNG")).pixel_sha256


def test_pixel_hash_includes_the_size() -> None:
    # The same 36 bytes of pixels as 2x6 and as 6x2 must not collide.
    raw = bytes(range(36))
    a = Image.frombytes("RGB", (2, 6), raw)
    b = Image.frombytes("RGB", (6, 2), raw)
    assert _ok(_encode(a, "PNG")).pixel_sha256 != _ok(_encode(b, "PNG")).pixel_sha256


def test_grey_and_rgb_versions_of_grey_pixels_hash_alike() -> None:
    grey = natural_image(4).convert("L")
    assert (
        _ok(_encode(grey, "PNG")).pixel_sha256
        == _ok(_encode(grey.convert("RGB"), "PNG")).pixel_sha256
    )


def test_pdq_is_pdqhash_in_meta_bit_order() -> None:
    img = natural_image(5, (400, 300))
    bits, quality = pdqhash.compute(np.asarray(img))
    f = _ok(_encode(img, "PNG"))
    assert f.pdq == np.packbits(bits.astype(np.uint8)).tobytes()
    assert len(f.pdq) == 32 and f.pdq_quality == quality
    # Meta's hex form prints the most significant bit first: bit 0 of the vector is the top bit.
    assert f"{int.from_bytes(f.pdq, 'big'):0256b}" == "".join(str(int(b)) for b in bits)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (63, 65), (128, 64), (384, 288), (300, 384)])
def test_pdq_core_call_is_pdqhash_bit_for_bit(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    # pdqhash's C++ called on our float luma (no Python grey conversion, no bit-by-bit unpacking)
    # gives pdqhash.compute / compute_dihedral's hashes and quality exactly, every grey level
    # included; so does the fallback through pdqhash's Python API.
    from dedup import fingerprint as fp

    assert fp._PDQ_CORE is not None, "pdqhash's C++ functions were not found: the slow path runs"
    rng = np.random.default_rng(sum(size))
    luma = np.asarray(natural_image(sum(size), size).convert("L")).copy()
    luma.reshape(-1)[: min(256, luma.size)] = rng.permutation(256)[: min(256, luma.size)]
    rgb = np.ascontiguousarray(np.repeat(luma[..., None], 3, axis=2))
    bits, quality = pdqhash.compute(rgb)
    hashes, quality8 = pdqhash.compute_dihedral(rgb)
    want1 = np.packbits(bits.astype(np.uint8)).tobytes()
    want8 = b"".join(np.packbits(h.astype(np.uint8)).tobytes() for h in hashes)
    for core in (fp._PDQ_CORE, None):
        monkeypatch.setattr(fp, "_PDQ_CORE", core)
        assert fp._pdq_hashes(luma, dihedral=False) == (want1, quality)
        assert fp._pdq_hashes(luma, dihedral=True) == (want8, quality8)


def test_pdq_of_a_large_image_is_computed_like_metas_reference_hasher() -> None:
    # Meta's Python reference hashes img.thumbnail((512, 512)); we do the same, without the copy.
    img = natural_image(6, (1300, 700))
    thumb = img.copy()
    thumb.thumbnail((512, 512))
    bits, _ = pdqhash.compute(np.asarray(thumb))
    assert _ok(_encode(img, "PNG")).pdq == np.packbits(bits.astype(np.uint8)).tobytes()


def test_pdq_of_a_greyscale_copy_is_its_originals() -> None:
    # PDQ sees luma only, and the luma is taken before the image is fitted: a copy turned grey
    # (saved as RGB or as L) hashes bit for bit as the colour original, at any size.
    for size in ((400, 300), (1300, 700)):
        img = natural_image(11, size)
        colour = _ok(_encode(img, "PNG"), plain_fingerprint(pdq_dihedral=True, pdq_side=384))
        for grey in (img.convert("L"), img.convert("L").convert("RGB")):
            copy = _ok(_encode(grey, "PNG"), plain_fingerprint(pdq_dihedral=True, pdq_side=384))
            assert copy.pdq == colour.pdq and copy.pdq_variants == colour.pdq_variants, size


def test_pdq_close_for_resized_recompressed_copy_far_for_unrelated() -> None:
    # Measured over 20 generated images: copies at most 24 bits away, unrelated at least 110.
    img = natural_image(7, (800, 600))
    original = _ok(_encode(img, "JPEG", quality=92))
    for scale, quality in ((0.6, 70), (0.35, 60), (1.4, 85)):
        size = (round(800 * scale), round(600 * scale))
        copy = _ok(_encode(img.resize(size, Image.Resampling.LANCZOS), "JPEG", quality=quality))
        assert original.pdq is not None and copy.pdq is not None
        assert hamming(original.pdq, copy.pdq) <= 31, (scale, quality)  # Meta's threshold
    for seed in range(20, 26):
        other = _ok(_encode(natural_image(seed, (800, 600)), "JPEG"))
        assert other.pdq is not None
        assert hamming(original.pdq, other.pdq) >= 80


# pdqhash's dihedral order, in PIL's terms (index 0 is the image itself).
DIHEDRAL = (
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)


def test_pdq_dihedral_variants_are_the_hashes_of_flipped_and_rotated_images() -> None:
    # At 320 x 320 (64 x an odd number, odd filter window) PDQ's sampling is mirror-symmetric,
    # so each variant is exactly the hash of the transformed image.
    img = natural_image(8, (320, 320))
    variants = pdq_dihedral(img)
    assert len(variants) == 8 and all(len(v) == 32 for v in variants)
    assert variants[0] == _ok(_encode(img, "PNG")).pdq
    for index, transpose in enumerate(DIHEDRAL, start=1):
        assert _ok(_encode(img.transpose(transpose), "PNG")).pdq == variants[index], transpose


def test_pdq_dihedral_variants_are_approximate_at_other_sizes() -> None:
    # Elsewhere the sampling is off by a pixel: the right variant is still by far the closest
    # (measured on 40 images at 640 x 480: median 12 bits, max 52; wrong variants >= 88).
    img = natural_image(9, (640, 480))
    variants = pdq_dihedral(img)
    for index, transpose in enumerate(DIHEDRAL, start=1):
        hashed = _ok(_encode(img.transpose(transpose), "PNG")).pdq
        assert hashed is not None
        distances = [hamming(hashed, v) for v in variants]
        assert distances.index(min(distances)) == index and distances[index] <= 64, distances


def test_pdq_side_sets_the_scale_pdq_hashes_at() -> None:
    # A 1024 px image is hashed fitted within pdq_side: the fingerprint's PDQ is the first
    # dihedral variant at the same side, and a different side gives a (slightly) different hash.
    data = _encode(natural_image(10, (1024, 768)), "PNG")
    img = Image.open(io.BytesIO(data))
    at_384 = _ok(data, plain_fingerprint(pdq_dihedral=True, pdq_side=384))
    at_512 = _ok(data, plain_fingerprint(pdq_dihedral=True, pdq_side=512))
    assert at_384.pdq == pdq_dihedral(img, side=384)[0]
    assert at_512.pdq == pdq_dihedral(img, side=512)[0]
    assert at_384.pdq is not None and at_512.pdq is not None and at_384.pdq != at_512.pdq
    assert hamming(at_384.pdq, at_512.pdq) <= 32


def test_hamming() -> None:
    assert hamming(b"\x00\xff", b"\x00\xff") == 0
    assert hamming(b"\x00\xff", b"\x01\x7f") == 2
    assert hamming(bytes(32), b"\xff" * 32) == 256
    with pytest.raises(ValueError, match="differ in length"):
        hamming(b"\x00", b"\x00\x00")


def test_signals_can_be_switched_off() -> None:
    f = _ok(_encode(natural_image(9), "JPEG"), plain_fingerprint(phash=False, pdq=False))
    assert f.phash is None and f.pdq is None and f.pdq_quality is None
    assert f.sha256 is not None and f.pixel_sha256 is not None


def test_prepare_gets_the_decoded_rgb_image_and_its_result_is_returned() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(natural_image(10, (64, 32)), "JPEG", exif=exif)
    seen: list[tuple[str, tuple[int, int]]] = []

    def prepare(img: Image.Image) -> np.ndarray:
        seen.append((img.mode, img.size))
        return np.zeros(3, dtype=np.uint8)

    features, prepared = fingerprint(data, CFG, prepare=prepare)
    assert features.status == "ok" and prepared is not None and prepared.shape == (3,)
    assert seen == [("RGB", (32, 64))]  # oriented
    features, prepared = fingerprint(b"junk", CFG, prepare=prepare)
    assert features.status == "failed" and prepared is None and len(seen) == 1


# --- bad input: a failed row with a one-line reason, never an exception ----------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_INPUTS: dict[str, tuple[bytes | None, str]] = {
    "none": (None, "no image bytes"),
    "zero bytes": (b"", "empty image data (0 bytes)"),
    "html": (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>",
        "not an image: an HTML document",
    ),
    "text": (b"Access denied. Please log in.\n", "not an image: text"),
    "random bytes": (bytes(range(256)) * 4, "not a recognised image format"),
    "truncated jpeg": (
        _truncated(_encode(natural_image(11), "JPEG", quality=90)),
        "cannot decode JPEG data: image file is truncated",
    ),
    "truncated png": (
        _truncated(_encode(natural_image(12), "PNG")),
        "cannot decode PNG data",
    ),
    "corrupt jpeg body": (
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(2048),
        "cannot read JPEG header: corrupt",
    ),
    "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "unsupported format: PDF"),
    "decompression bomb": (
        _png_header_only(50_000, 50_000),
        "image declares 50000x50000 = 2.5e+09 pixels, over fingerprint.max_pixels=178956970",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_failed_row_with_a_one_line_reason(name: str) -> None:
    data, reason = BAD_INPUTS[name]
    features, prepared = fingerprint(data, CFG, prepare=lambda img: np.zeros(1))
    assert features.status == "failed" and prepared is None
    assert features.error is not None and reason in features.error
    assert "\n" not in features.error and len(features.error) <= 300
    # No memory addresses (PIL's own message has one): manifests must be reproducible.
    assert re.search(r"0x[0-9a-f]{6,}|object at", features.error) is None
    assert features.width is None and features.phash is None and features.pdq is None


def test_decode_raises_sample_error() -> None:
    with pytest.raises(SampleError, match="HTML"):
        decode(BAD_INPUTS["html"][0] or b"", max_pixels=CFG.max_pixels)


def test_bomb_is_refused_from_the_header_under_any_pil_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Our limit applies even if the process turned PIL's off, and PIL's never fires instead.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(SampleError, match=r"over fingerprint\.max_pixels=1000"):
        decode(_encode(natural_image(13, (50, 40)), "PNG"), max_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode(_encode(natural_image(13, (50, 40)), "PNG"), max_pixels=10_000).size == (50, 40)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_size_between_pil_limits_raises_no_pil_warning() -> None:
    # 10000 x 10000 is over PIL's warning limit (89M) and under ours: PIL must stay quiet (a
    # warning is an error here) and the image fails only because its data is missing.
    saved = Image.MAX_IMAGE_PIXELS
    features, _ = fingerprint(_png_header_only(10_000, 10_000), CFG)
    assert features.status == "failed" and "truncated" in (features.error or "")
    assert saved == Image.MAX_IMAGE_PIXELS


# --- odd but valid images --------------------------------------------------------------------


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    img = natural_image(14)
    out = decode(_encode(img.convert("CMYK"), "JPEG", quality=95), max_pixels=CFG.max_pixels)
    assert out.mode == "RGB" and out.size == img.size
    assert _mean_abs_diff(out, img) < 8


def test_16_bit_png_scales_to_the_same_8_bit_pixels() -> None:
    grey = natural_image(15).convert("L")
    deep = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # 0..255 -> 0..65535
    data = _encode(deep, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")  # really a 16-bit image
    f16 = _ok(data)
    assert f16.pixel_sha256 == _ok(_encode(grey, "PNG")).pixel_sha256


def test_palette_with_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * (254 * 3))
    img.paste(1, (4, 0, 8, 8))
    out = decode(_encode(img, "PNG", transparency=0), max_pixels=CFG.max_pixels)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index 0 -> white, not black
    assert out.getpixel((6, 6)) == (200, 30, 30)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    colour = (40, 80, 120, 0) if mode == "RGBA" else (60, 0)
    img = Image.new(mode, (4, 4), colour)
    opaque = (40, 80, 120, 255) if mode == "RGBA" else (60, 255)
    img.putpixel((1, 1), opaque)
    out = decode(_encode(img, "PNG"), max_pixels=CFG.max_pixels)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == ((40, 80, 120) if mode == "RGBA" else (60, 60, 60))


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 12), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode(buf.getvalue(), max_pixels=CFG.max_pixels)
    assert out.size == (16, 12) and out.getpixel((5, 5)) == (250, 0, 0)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    f, _ = fingerprint(_encode(img, "PNG", exif=exif), CFG)
    assert (f.width, f.height) == (10, 20)
    out = decode(_encode(img, "PNG", exif=exif), max_pixels=CFG.max_pixels)
    assert out.getpixel((5, 1)) == (255, 0, 0) and out.getpixel((5, 18)) == (0, 0, 255)
    jpeg = _ok(_encode(img, "JPEG", exif=exif))
    assert (jpeg.width, jpeg.height) == (10, 20)


def test_corrupt_exif_is_ignored_not_fatal() -> None:
    broken = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00"
    f = _ok(_encode(natural_image(16, (30, 20)), "JPEG", exif=broken))
    assert (f.width, f.height) == (30, 20)


def test_one_pixel_image() -> None:
    f = _ok(_encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"))
    assert (f.width, f.height) == (1, 1) and f.phash is not None and f.pdq is not None


def test_concurrent_fingerprints_match_sequential_ones() -> None:
    inputs = [_encode(natural_image(s, (96, 64)), "JPEG") for s in range(6)]
    inputs += [v[0] for v in BAD_INPUTS.values() if v[0] is not None]
    sequential = [fingerprint(d, CFG)[0] for d in inputs]
    saved = Image.MAX_IMAGE_PIXELS
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda d: fingerprint(d, CFG)[0], inputs * 3))
    assert concurrent == sequential * 3
    assert saved == Image.MAX_IMAGE_PIXELS


def test_trim_cuts_uniform_margins_and_records_the_box() -> None:
    """A picture padded onto a white canvas reaches the model without the padding, and the box it
    was cut to is recorded as shares of the decoded size (the second look crops to it)."""
    picture = natural_image(21, (200, 150))
    canvas = Image.new("RGB", (300, 250), (255, 255, 255))
    canvas.paste(picture, (40, 60))
    cfg = plain_fingerprint(trim=True)
    features, seen = fingerprint(_encode(canvas, "PNG"), cfg, prepare=np.asarray)
    assert seen is not None and features.trim is not None
    left, top, right, bottom = features.trim
    # the 128 px thumbnail measures the margins: within its 2.3 px cells of the pasted box
    assert abs(left * 300 - 40) <= 3 and abs(top * 250 - 60) <= 3
    assert abs(right * 300 - 240) <= 3 and abs(bottom * 250 - 210) <= 3
    assert seen.shape == (round(bottom * 250) - round(top * 250), round(right * 300) - round(left * 300), 3)

    whole, seen_whole = fingerprint(_encode(picture, "PNG"), cfg, prepare=np.asarray)
    assert whole.trim == (0.0, 0.0, 1.0, 1.0) and seen_whole is not None and seen_whole.shape == (150, 200, 3)
    untrimmed, _ = fingerprint(_encode(canvas, "PNG"), plain_fingerprint(trim=False), prepare=np.asarray)
    assert untrimmed.trim == (0.0, 0.0, 1.0, 1.0)
    no_model, _ = fingerprint(_encode(canvas, "PNG"), cfg)
    assert no_model.trim is None  # no model input, nothing cut


@pytest.mark.parametrize("kind", ["jpeg", "cmyk-jpeg", "transparent-png", "transparent-grey-png"])
def test_grey_decode_is_the_luma_of_the_colour_decode(kind: str) -> None:
    """``grey=True`` (the second look's decode): a colour JPEG decodes its luma plane only; any
    other image is decoded in colour first (transparency on white) and then taken to luma."""
    img = natural_image(16)
    if kind == "jpeg":
        data = _encode(img, "JPEG", quality=90)
    elif kind == "cmyk-jpeg":
        data = _encode(img.convert("CMYK"), "JPEG", quality=95)
    elif kind == "transparent-grey-png":  # a grey PNG whose black is transparent (tRNS)
        data = _encode(img.convert("L").point(lambda v: 0 if v < 96 else v), "PNG", transparency=0)
    else:
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(img.size))
        data = _encode(rgba, "PNG")
    colour = decode(data, max_pixels=CFG.max_pixels)
    grey = decode(data, max_pixels=CFG.max_pixels, grey=True)
    assert colour.mode == "RGB" and grey.mode == "L" and grey.size == colour.size
    # the JPEG's own luma and PIL's conversion of its RGB differ by rounding only
    assert _mean_abs_diff(grey, colour.convert("L")) < (1.0 if kind == "jpeg" else 1e-9)
    if kind == "jpeg":  # reduced in the DCT as the colour decode is
        small = decode(data, max_pixels=CFG.max_pixels, draft=64, grey=True)
        assert small.mode == "L" and small.size == decode(data, max_pixels=CFG.max_pixels, draft=64).size


def test_phash_is_computed_only_when_a_search_uses_it() -> None:
    from dedup.config import RunConfig, SearchConfig, load_config

    # off in every preset and in the library's default: no time spent on it, the column is null
    for preset in ("default", "strict", "aggressive", "ci"):
        assert load_config(preset).features().phash is False
    assert RunConfig().features().phash is False
    # a search that uses it turns it on, whatever the preset's [fingerprint] says
    on = RunConfig(search=SearchConfig(phash_distance=4))
    assert on.features().phash is True and on.stage_key() != RunConfig().stage_key()
    assert load_config("default").with_overrides({"search.phash_distance": 0}).features().phash is True
    assert fingerprint(_encode(natural_image(4), "JPEG"), RunConfig().features())[0].phash is None
