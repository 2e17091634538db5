"""Region descriptors (dedup.embed.regions), the second look (dedup.second_look) and PDQ variants."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _configs import PLAIN, plain_embed, plain_fingerprint
from _data import natural_image
from PIL import Image, ImageDraw, ImageOps

from dedup.config import EmbedModel, RunConfig
from dedup.embed.onnx import build_onnx_sscd
from dedup.embed.regions import HEADS, pool_regions, windows, with_outputs
from dedup.fingerprint import fingerprint
from dedup.pipeline import run
from dedup.search import Signal, pdq_variant_edges, region_candidates
from dedup.search import Candidates
from dedup.second_look.geometry import aligned_agreement, confirms, geometric_inliers, geometric_match, local_features
from dedup.second_look.propose import top_per_image

MODELS = [EmbedModel.SSCD_DISTILLED, EmbedModel.SSCD]


def _picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A 1/f-noise image with drawn shapes on it: corners for local features to lock onto."""
    img = natural_image(seed, size)
    rng = np.random.default_rng(seed)
    draw = ImageDraw.Draw(img)
    for _ in range(14):
        x, y = rng.integers(0, size[0] - 30), rng.integers(0, size[1] - 30)
        w, h = rng.integers(10, 60, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x, y), (x + w, y + h // 3), (x + w // 2, y + h)], fill=colour)
    return img


def _scene(picture: Image.Image, seed: int, share: float = 0.3) -> Image.Image:
    """``picture`` framed on a larger unrelated background, covering ``share`` of its area."""
    bg = natural_image(seed, (720, 540))
    side = (share * 720 * 540 / (picture.width * picture.height)) ** 0.5
    inner = picture.resize((int(picture.width * side), int(picture.height * side)))
    framed = ImageOps.expand(inner, border=10, fill=(60, 40, 20))
    bg.paste(framed, (380 - framed.width // 2, 250 - framed.height // 2))
    return bg


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.value)
def test_global_rebuilt_from_the_feature_map(model: EmbedModel) -> None:
    """The tensor names and GeM settings in HEADS are the packaged models' own: pooling the whole
    feature map through the projection gives back the model's embedding."""
    emb = build_onnx_sscd(plain_embed(model=model, regions=True), threads=1)
    batch = np.stack([emb.preprocess(natural_image(s)) for s in range(3)])
    head = HEADS[model.value]
    vectors, fmap, weight, bias = emb._session.run([emb._output, head.feature_map, head.weight, head.bias], {emb._input: batch})
    fm = np.asarray(fmap, np.float64).reshape(3, fmap.shape[1], -1)
    gem = np.cbrt((np.maximum(fm, head.eps) ** 3).mean(axis=2))
    rebuilt = gem @ weight.T + bias
    rebuilt /= np.linalg.norm(rebuilt, axis=1, keepdims=True)
    assert np.abs(rebuilt - vectors).max() < 1e-4
    # and each region is GeM over its window, through the same projection
    glob, regions = emb.embed_regions(batch)
    assert np.allclose(glob, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), atol=1e-6)
    side = int(round(fm.shape[2] ** 0.5))
    y, x, kh, kw = windows(side, side)[7]
    win = fm.reshape(3, -1, side, side)[:, :, y : y + kh, x : x + kw].reshape(3, fm.shape[1], -1)
    manual = np.cbrt((np.maximum(win, head.eps) ** 3).mean(axis=2)) @ weight.T + bias
    manual /= np.linalg.norm(manual, axis=1, keepdims=True)
    assert regions.shape == (3, len(windows(side, side)), emb.dim)
    assert np.abs(manual - regions[:, 7]).max() < 1e-4


def test_regions_off_or_unknown_model() -> None:
    assert not build_onnx_sscd(plain_embed(model=EmbedModel.SSCD_DISTILLED), threads=1).regions
    assert build_onnx_sscd(plain_embed(model=EmbedModel.SSCD_DISTILLED, regions=True), threads=1).regions


def test_with_outputs_appends_graph_outputs() -> None:
    # ModelProto{graph(7){output(12){name(1)="a"}}}: tag 0x3a, then 0x62 (field 12), then 0x0a
    assert with_outputs(b"M", ["a"]) == b"M" + bytes([0x3A, 5, 0x62, 3, 0x0A, 1]) + b"a"


def test_windows_per_scale() -> None:
    wins = windows(9, 9)  # the default scales, 5/9 and 7/9
    assert len(wins) == 13 and {kh for _, _, kh, _ in wins} == {5, 7}
    three = windows(9, 9, (1 / 3, 5 / 9, 7 / 9))
    assert len(three) == 29 and {kh for _, _, kh, _ in three} == {3, 5, 7}
    assert all(y + kh <= 9 and x + kw <= 9 for y, x, kh, kw in three)
    assert {kh for _, _, kh, _ in windows(7, 7)} == {4, 5}  # 224 px: a 7 x 7 map


def test_pool_regions_of_a_constant_map_equal_the_global() -> None:
    head = HEADS["sscd"]
    rng = np.random.default_rng(0)
    fmap = np.ones((2, 4, 9, 9), np.float32) * rng.uniform(0.5, 2, (2, 4, 1, 1)).astype(np.float32)
    weight, bias = rng.normal(size=(3, 4)).astype(np.float32), np.zeros(3, np.float32)
    regions = pool_regions(fmap, weight, bias, head)
    glob = fmap.mean(axis=(2, 3)) @ weight.T
    glob /= np.linalg.norm(glob, axis=1, keepdims=True)
    assert np.allclose(regions, glob[:, None, :], atol=1e-5)


def test_a_region_finds_the_picture_inside_a_mock_up() -> None:
    emb = build_onnx_sscd(plain_embed(model=EmbedModel.SSCD_DISTILLED, regions=True), threads=1)
    pictures = [natural_image(100 + s, (300, 240)) for s in range(4)]
    scenes = [_scene(p, 200 + s) for s, p in enumerate(pictures)]
    glob, regions = emb.embed_regions(np.stack([emb.preprocess(i) for i in pictures + scenes]))
    whole_scores = (glob[:4] * glob[4:]).sum(1)
    cands = region_candidates(glob, regions, propose=0.45, top_k=2)
    found = {(int(i), int(j)) for i, j in zip(cands.i, cands.j, strict=True)}
    for s in range(4):
        assert (4 + s, s) in found, f"scene {s} not proposed (whole-image score {whole_scores[s]:.2f})"
    # the best window of scene s against picture s beats the whole scene against it
    best = {(int(i), int(j)): float(v) for i, j, v in zip(cands.i, cands.j, cands.score, strict=True)}
    assert all(best[(4 + s, s)] > whole_scores[s] + 0.05 for s in range(4))


def test_pdq_variants_find_rotated_and_mirrored_copies() -> None:
    img = natural_image(7, (320, 240))
    copies = [img, img.rotate(90, expand=True), ImageOps.mirror(img), ImageOps.flip(img), natural_image(8, (320, 240))]
    cfg = plain_fingerprint(pdq_dihedral=True)
    feats = [fingerprint(_jpeg(c), cfg)[0] for c in copies]
    codes = np.frombuffer(b"".join(f.pdq for f in feats), np.uint8).reshape(-1, 32)
    variants = np.frombuffer(b"".join(f.pdq_variants for f in feats), np.uint8).reshape(-1, 224)
    edges = pdq_variant_edges(codes, variants, max_distance=31)
    pairs = {(int(i), int(j)) for i, j in zip(edges.i, edges.j, strict=True)}
    assert {(0, 1), (0, 2), (0, 3)} <= pairs
    assert not any(4 in p for p in pairs)
    assert set(edges.signal.tolist()) == {int(Signal.PDQ)}
    assert len(pairs) == len(edges)  # one edge per pair
    plain = fingerprint(_jpeg(img), plain_fingerprint())[0]
    assert plain.pdq == feats[0].pdq and plain.pdq_variants is None


def _jpeg(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_second_look_links_partial_copies_end_to_end(tmp_path: Path) -> None:
    """A folder with pictures, their mock-ups, and unrelated scenes on the same backgrounds:
    each mock-up is linked to its picture as a "partial" link, nothing else is."""
    src = tmp_path / "images"
    src.mkdir()
    pictures = [_picture(300 + s) for s in range(3)]
    for s, p in enumerate(pictures):
        p.save(src / f"picture{s}.jpg", quality=92)
        _scene(p, 400 + s).save(src / f"mockup{s}.jpg", quality=88)
        # another picture on the same wall: must not join either
        _scene(_picture(600 + s), 400 + s).save(src / f"other{s}.jpg", quality=88)
    cfg = PLAIN.with_overrides(
        {
            "embed.model": "sscd_distilled",
            "embed.regions": True,
            "search.partial": True,
            "search.threshold": 0.95,
            # 1/f-noise pictures all look alike to SSCD (0.3-0.5): propose more pairs and let
            # the geometric check decide, which is what this test is about
            "search.partial_margin": 0.0,
            "search.partial_propose": 0.4,
        }
    )
    result = run([str(src)], tmp_path / "out", config=cfg)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    for s in range(3):
        assert rows[f"mockup{s}.jpg"]["cluster_id"] == rows[f"picture{s}.jpg"]["cluster_id"]
        assert rows[f"other{s}.jpg"]["cluster_size"] == 1
    assert {rows[f"picture{s}.jpg"]["signal"] for s in range(3)} == {"partial"}  # the dropped side says why
    assert result.report["summary"]["duplicate_clusters"] == 3


def test_geometric_inliers_find_a_pasted_picture_not_a_neighbour() -> None:
    picture = _picture(12)
    scene = _scene(picture, 12)
    other = _scene(_picture(20), 12)  # same wall, another picture
    pic, sc, ot = (local_features(i) for i in (picture, scene, other))
    assert geometric_inliers(pic, sc) >= 30
    assert geometric_inliers(pic, ot) < 15


def test_band_pairs_are_confirmed_by_the_verify_model(tmp_path: Path) -> None:
    """The cascade: distilled scores in [verify_from, threshold) are re-embedded with full SSCD
    and linked as "verified" only at verify_threshold."""
    src = tmp_path / "images"
    src.mkdir()
    picture = _picture(900)
    picture.save(src / "a.jpg", quality=95)
    picture.resize((200, 150)).save(src / "b.jpg", quality=40)  # a resized, recompressed copy
    _picture(901).save(src / "c.jpg", quality=95)
    base = {
        "embed.model": "sscd_distilled",
        "search.threshold": 0.999,
        "search.pdq_distance": -1,
        "search.verify_from": 0.5,
        "search.verify_by": "model",
    }
    linked = run([str(src)], tmp_path / "on", config=PLAIN.with_overrides({**base, "search.verify_threshold": 0.7}))
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "on" / "manifest.parquet").to_pylist()}
    assert rows["a.jpg"]["cluster_id"] == rows["b.jpg"]["cluster_id"] != rows["c.jpg"]["cluster_id"]
    assert rows["b.jpg"]["signal"] == "verified" and rows["b.jpg"]["similarity"] >= 0.7  # full SSCD: 0.75
    assert linked.report["shards"]["second_look"]["confirmed"] == 1
    refused = run([str(src)], tmp_path / "off", config=PLAIN.with_overrides({**base, "search.verify_threshold": 1.01}))
    assert refused.report["summary"]["duplicate_clusters"] == 0


def _copies(picture: Image.Image) -> dict[str, Image.Image]:
    """Whole-image copies a curator meets, each one rotation / scale / shift from ``picture``."""
    w, h = picture.size
    captioned = ImageOps.expand(picture, border=(0, 0, 0, h // 5), fill=(255, 255, 255))  # a caption bar
    draw = ImageDraw.Draw(captioned)
    draw.text((10, h + 10), "ORIGINAL CANVAS PRINT", fill=(0, 0, 0))
    draw.text((w // 3, h // 10), "meme", fill=(255, 255, 255))  # and a word over the picture
    return {
        "crop": picture.crop((int(w * 0.15), int(h * 0.1), int(w * 0.9), int(h * 0.95))),
        "rotated": picture.rotate(8, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(0, 0, 0)),
        "captioned": captioned,
        "recoloured": Image.eval(picture, lambda v: int(v * 0.7 + 40)),
        "resized": picture.resize((w * 2 // 3, h * 2 // 3)),
    }


def _lookalike(seed: int, other: int) -> tuple[Image.Image, Image.Image]:
    """Two members of one family: the same frame around different pictures (a road sign with
    another pictogram). They share every corner of the frame, and none of the inside."""
    frame = _picture(seed, (320, 240))
    a, b = frame.copy(), frame.copy()
    a.paste(_picture(other, (200, 150)), (60, 45))
    b.paste(_picture(other + 1, (200, 150)), (60, 45))
    return a, b


@pytest.mark.parametrize("edit", ["crop", "rotated", "captioned", "recoloured", "resized"])
def test_geometry_confirms_whole_image_copies(edit: str) -> None:
    search = PLAIN.search
    picture = _picture(31)
    copy = _copies(picture)[edit]
    assert confirms(local_features(copy), local_features(picture), search, partial=False)
    assert confirms(local_features(picture), local_features(copy), search, partial=False)


def test_geometry_refuses_a_family_lookalike_that_shares_corners() -> None:
    """The frame alone gives the pair enough matched corners; the pixels inside disagree."""
    search = PLAIN.search
    a, b = _lookalike(40, 41)
    fa, fb = local_features(a), local_features(b)
    inliers, agreement = geometric_match(fa, fb)
    assert inliers >= search.verify_inliers  # what inliers alone would have accepted
    assert agreement < search.verify_agreement
    assert not confirms(fa, fb, search, partial=False)


def _icon(other: int) -> Image.Image:
    """A drawing of one family: the family's thin frame and marks on a white page (flat, so it
    agrees whatever the pictures) and a small pictogram of its own (a pattern of blocks)."""
    img = Image.new("RGB", (320, 240), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, 311, 231), outline=(0, 0, 0), width=2)
    for k in range(4):
        draw.rectangle((20 + 48 * k, 20, 44 + 48 * k, 40), outline=(0, 0, 0), width=2)
    cells = np.random.default_rng(other).integers(0, 2, (9, 12)).astype(np.uint8) * 255
    img.paste(Image.fromarray(cells).resize((78, 60), Image.Resampling.NEAREST).convert("RGB"), (121, 90))
    return img


@pytest.mark.parametrize("other", [100, 101, 102])
def test_edge_agreement_refuses_icons_that_agree_on_their_flat_page(other: int) -> None:
    """Two icons of one family agree on 94 % of their pixels (the white page) but not near their
    edges (the pictogram's are a large share of them): search.verify_edge_agreement (0.85, the
    default) refuses them; copies of one icon still pass."""
    edges = PLAIN.search
    assert edges.verify_edge_agreement == 0.85
    search = replace(edges, verify_edge_agreement=0.0)
    a, b = local_features(_icon(other)), local_features(_icon(other + 100))
    assert confirms(a, b, search, partial=False)  # what the agreement alone accepted
    assert not confirms(a, b, edges, partial=False)
    icon = _icon(other)
    for copy in (icon.crop((20, 15, 300, 225)), icon.resize((200, 150)), icon.rotate(3, fillcolor=(255, 255, 255))):
        assert confirms(local_features(copy), a, edges, partial=False)
        assert confirms(a, local_features(copy), edges, partial=False)


def test_aligned_agreement_on_itself_inverted_and_flat() -> None:
    picture = local_features(_picture(50))
    assert aligned_agreement(picture, picture, np.eye(3)) > 0.99
    inverted = local_features(ImageOps.invert(_picture(50)))
    assert aligned_agreement(inverted, picture, np.eye(3)) == 0.0  # a negative gain agrees nowhere
    flat = local_features(Image.new("RGB", (320, 240), (128, 128, 128)))
    assert not flat  # no corners: nothing to match
    assert aligned_agreement(flat, picture, np.eye(3)) == 0.0  # a constant fits nothing


def test_band_candidates_keep_each_images_best() -> None:
    # image 0 has four band neighbours; 5-6 is a pair of its own
    c = Candidates(
        np.array([0, 0, 0, 0, 5]),
        np.array([1, 2, 3, 4, 6]),
        np.array([0.6, 0.8, 0.7, 0.55, 0.5], np.float32),
        np.full(5, -1, np.int16),
    )
    kept = top_per_image(c, 2)
    # 0-2 and 0-3 are 0's best two; 0-1 and 0-4 are still the best of 1 and of 4; 5-6 stays
    assert sorted(zip(kept.j.tolist(), kept.score.tolist())) == sorted(zip([1, 2, 3, 4, 6], c.score.tolist()))
    crowd = Candidates(np.zeros(4, np.int64), np.array([1, 2, 3, 4]), np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.full(4, -1, np.int16))
    crowd = Candidates.concat([crowd, Candidates(np.array([1, 1, 1]), np.array([2, 3, 4]), np.array([0.95, 0.94, 0.93], np.float32), np.full(3, -1, np.int16))])
    kept = top_per_image(crowd, 1)
    # 1-2 is the best of 1 and 2; 0-1 the best of 0; 1-3 / 1-4 the best of 3 and of 4
    assert sorted(zip(kept.i.tolist(), kept.j.tolist())) == [(0, 1), (1, 2), (1, 3), (1, 4)]
    assert len(top_per_image(crowd, 0)) == len(crowd)


def test_band_pairs_are_confirmed_by_geometry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default second look: a crop and a rotated copy below the threshold are linked as
    "verified"; a look-alike of the same family scoring as high is not."""
    src = tmp_path / "images"
    src.mkdir()
    picture = _picture(700)
    picture.save(src / "a.jpg", quality=95)
    copies = _copies(picture)
    copies["crop"].save(src / "crop.jpg", quality=80)
    copies["rotated"].save(src / "rotated.jpg", quality=80)
    one, two = _lookalike(710, 711)
    one.save(src / "family1.jpg", quality=95)
    two.save(src / "family2.jpg", quality=95)
    cfg = PLAIN.with_overrides(
        {"embed.model": "sscd_distilled", "search.threshold": 0.999, "search.pdq_distance": -1, "search.exact": False, "search.verify_from": 0.0}
    )
    result = run([str(src)], tmp_path / "out", config=cfg)
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert rows["crop.jpg"]["cluster_id"] == rows["rotated.jpg"]["cluster_id"] == rows["a.jpg"]["cluster_id"]
    assert rows["crop.jpg"]["signal"] == rows["rotated.jpg"]["signal"] == "verified"
    assert rows["family1.jpg"]["cluster_id"] != rows["family2.jpg"]["cluster_id"]
    assert rows["family1.jpg"]["cluster_size"] == 1 and rows["family2.jpg"]["cluster_size"] == 1
    # a-crop, a-rotated and crop-rotated: all ten pairs were candidates (verify_from 0)
    assert result.report["shards"]["second_look"]["confirmed"] == 3
    assert result.report["shards"]["second_look"]["checked"] == 10

    # One pair a block: once a-crop and a-rotated are confirmed, crop-rotated is not checked,
    # and the clusters come out the same.
    import dedup.second_look.tasks

    monkeypatch.setattr(dedup.second_look.tasks, "CHECK_BLOCK", 1)
    again = run([str(src)], tmp_path / "again", config=cfg)
    assert again.report["shards"]["second_look"]["checked"] < 10
    assert again.report["shards"]["second_look"]["confirmed"] == 2
    rows_again = {r["key"]: r["cluster_id"] for r in pq.read_table(tmp_path / "again" / "manifest.parquet").to_pylist()}
    assert rows_again == {k: r["cluster_id"] for k, r in rows.items()}


def test_second_look_reads_each_shard_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The images of a second look are read in one pass, each shard once however many chunks
    its candidates fill (reading a chunk at a time used to start a shard again per chunk), and
    the links come out as they do with one chunk for all."""
    import sys

    import dedup.second_look.tasks
    import dedup.sources.readback

    src = tmp_path / "images"
    src.mkdir()
    picture = _picture(700)
    picture.save(src / "a.jpg", quality=95)
    for name, copy in _copies(picture).items():
        copy.save(src / f"b-{name}.jpg", quality=80)
    one, two = _lookalike(710, 711)
    one.save(src / "c-family1.jpg", quality=95)
    two.save(src / "c-family2.jpg", quality=95)
    cfg = PLAIN.with_overrides(
        {"embed.model": "sscd_distilled", "search.threshold": 0.999, "search.pdq_distance": -1, "search.exact": False,
         "search.verify_from": 0.0, "folder_batch": 3, "workers": 1}
    )
    whole = run([str(src)], tmp_path / "whole", config=cfg)
    reads: list[str] = []
    real = dedup.sources.readback.read_samples

    def counting(shard, ids):  # type: ignore[no-untyped-def]
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "arrivals":  # the read task's

            frame = frame.f_back
        if frame is not None:  # a read of the second look, not of the report's thumbnails
            reads.append(shard.shard_id)
        return real(shard, ids)

    monkeypatch.setattr(dedup.sources.readback, "read_samples", counting)
    monkeypatch.setattr(dedup.second_look.tasks, "CHUNK_ROWS", 2)
    chunked = run([str(src)], tmp_path / "chunked", config=cfg)
    assert len(reads) >= 3  # the candidates span several shards of three images, chunks of two
    assert len(reads) == len(set(reads))
    assert chunked.report["shards"]["second_look"] == whole.report["shards"]["second_look"]
    assert whole.report["shards"]["second_look"]["confirmed"] >= 3
    manifest = lambda out: {r["key"]: r["cluster_id"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}  # noqa: E731
    assert manifest(tmp_path / "chunked") == manifest(tmp_path / "whole")


def test_second_look_is_deterministic(tmp_path: Path) -> None:
    """The default preset's threaded geometric checks give byte-identical manifests run after run."""
    from dedup.config import load_config

    src = tmp_path / "images"
    src.mkdir()
    for s in range(3):
        picture = _picture(800 + s)
        picture.save(src / f"p{s}.jpg", quality=95)
        for name, copy in _copies(picture).items():
            copy.save(src / f"p{s}-{name}.jpg", quality=85)
        _scene(picture, 820 + s).save(src / f"p{s}-mockup.jpg", quality=88)
    one, two = _lookalike(830, 831)
    one.save(src / "family1.jpg", quality=95)
    two.save(src / "family2.jpg", quality=95)
    cfg = load_config("default").with_overrides({"workers": 1})
    first = run([str(src)], tmp_path / "a", config=cfg)
    run([str(src)], tmp_path / "b", config=cfg)
    assert first.report["shards"]["second_look"]["checked"] > 0  # the band was looked at
    assert (tmp_path / "a" / "manifest.parquet").read_bytes() == (tmp_path / "b" / "manifest.parquet").read_bytes()


def test_second_look_crops_to_the_recorded_trim_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint stage keeps the box each model input was cut to (a ``.trim.npy`` beside the
    shard's embeddings); the second look crops its re-read images to it instead of measuring the
    margins again, and measures them only for features made before boxes were kept."""
    import dedup.second_look.tasks
    from dedup.second_look.tasks import crop_to as _crop_to

    src = tmp_path / "images"
    src.mkdir()
    picture = _picture(900)
    picture.save(src / "a.png")
    ImageOps.expand(picture, border=(60, 20, 60, 20), fill=(255, 255, 255)).save(src / "padded.png")
    _copies(picture)["crop"].save(src / "crop.jpg", quality=85)
    cfg = PLAIN.with_overrides(
        {"embed.model": "sscd_distilled", "fingerprint.trim": True, "search.threshold": 0.999, "search.pdq_distance": -1,
         "search.exact": False, "search.verify_from": 0.0, "search.verify_by": "geometry"}
    )
    measured: list[tuple[int, int]] = []
    real_trim = dedup.second_look.tasks.trim_borders

    def counting_trim(img: Image.Image, **kw: object) -> Image.Image:
        measured.append(img.size)
        return real_trim(img)

    monkeypatch.setattr(dedup.second_look.tasks, "trim_borders", counting_trim)
    first = run([str(src)], tmp_path / "out", config=cfg)
    trims = sorted((tmp_path / "out").glob(".work/*/shards/*.trim.npy"))
    assert len(trims) == 1
    boxes = np.load(trims[0])
    assert boxes.shape == (3, 4)
    assert np.allclose(boxes[0], [0, 0, 1, 1]) and np.allclose(boxes[1], [0, 0, 1, 1])
    assert abs(boxes[2][0] * 440 - 60) <= 3 and abs(boxes[2][1] * 280 - 20) <= 3  # the padding, found
    assert measured == []  # re-read images were cut to the boxes, not measured again
    assert first.report["shards"]["second_look"]["confirmed"] >= 2

    for path in trims:  # features from before boxes were kept: the margins are measured again
        path.unlink()
    again = run([str(src)], tmp_path / "out", config=cfg)
    assert len(measured) == 3
    assert again.report["shards"]["second_look"]["confirmed"] == first.report["shards"]["second_look"]["confirmed"]

    img = Image.new("RGB", (200, 100))
    assert _crop_to(img, np.array([0.25, 0.5, 0.75, 1.0], np.float32)).size == (100, 50)
    assert _crop_to(img, np.array([0, 0, 1, 1], np.float32)) is img


def _second_look_folder(src: Path) -> None:
    """Three pictures with their copies and mock-ups, and two look-alikes of one family."""
    src.mkdir()
    for s in range(3):
        picture = _picture(800 + s)
        picture.save(src / f"p{s}.jpg", quality=95)
        for name, copy in _copies(picture).items():
            copy.save(src / f"p{s}-{name}.jpg", quality=85)
        _scene(picture, 820 + s).save(src / f"p{s}-mockup.jpg", quality=88)
    one, two = _lookalike(830, 831)
    one.save(src / "family1.jpg", quality=95)
    two.save(src / "family2.jpg", quality=95)


def _links(out: Path) -> dict[str, tuple[object, ...]]:
    return {
        r["sample_id"]: (r["cluster_id"], r["duplicate_of"], r["signal"], r["keep"], round(r["similarity"] or 0.0, 4))
        for r in pq.read_table(out / "manifest.parquet").to_pylist()
    }


@pytest.mark.slow
def test_second_look_above_partition_above_and_resumed_after_a_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above search.partition_above (lowered here) the second look proposes from the
    partitioned search and the region files a shard at a time, and confirms the same links as
    below it. Killed in the middle of its check tasks, a rerun keeps the finished tasks (no
    image is read again) and writes the bytes an uninterrupted run writes."""
    import dedup.second_look.look
    import dedup.second_look.tasks
    from dedup.config import load_config

    src = tmp_path / "images"
    _second_look_folder(src)
    cfg = load_config("default").with_overrides({"workers": 1, "folder_batch": 4})  # pairs across shards
    below = run([str(src)], tmp_path / "below", config=cfg)
    small = cfg.with_overrides({"search.partition_above": 4})
    above = run([str(src)], tmp_path / "above", config=small)
    assert below.report["shards"]["second_look"]["confirmed"] >= 6  # copies and mock-ups, across shards
    assert above.report["shards"]["second_look"]["confirmed"] == below.report["shards"]["second_look"]["confirmed"]
    assert _links(tmp_path / "above") == _links(tmp_path / "below")
    candidates = sorted((tmp_path / "above").glob(".work/*/second_look/candidates/*.npy"))
    assert len(candidates) >= 2  # spilled by shard

    real_check, real_read = dedup.second_look.tasks.CheckStep.__call__, dedup.second_look.tasks.ReadStep.__call__
    checks: list[str] = []
    reads: list[str] = []

    def killed(self, shard, progress=None):  # type: ignore[no-untyped-def]
        if checks:
            raise KeyboardInterrupt  # the process dies in its second check task
        checks.append(shard.shard_id)
        return real_check(self, shard, progress)

    monkeypatch.setattr(dedup.second_look.tasks.CheckStep, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        run([str(src)], tmp_path / "killed", config=small)
    assert not (tmp_path / "killed" / "manifest.parquet").exists()

    def counting_read(self, shard, progress=None):  # type: ignore[no-untyped-def]
        reads.append(shard.shard_id)
        return real_read(self, shard, progress)

    def counting_check(self, shard, progress=None):  # type: ignore[no-untyped-def]
        checks.append(shard.shard_id)
        return real_check(self, shard, progress)

    real_propose = dedup.second_look.look._propose
    proposed: list[int] = []

    def counting_propose(*args, **kwargs):  # type: ignore[no-untyped-def]
        proposed.append(1)
        return real_propose(*args, **kwargs)

    monkeypatch.setattr(dedup.second_look.tasks.ReadStep, "__call__", counting_read)
    monkeypatch.setattr(dedup.second_look.tasks.CheckStep, "__call__", counting_check)
    monkeypatch.setattr(dedup.second_look.look, "_propose", counting_propose)
    run([str(src)], tmp_path / "killed", config=small)
    assert proposed == []  # the proposals were kept before the kill: not made again
    assert reads == []  # every read task had finished before the kill
    assert len(checks) == len(candidates)  # the first check task, then all but it once more
    assert len(set(checks)) == len(checks)
    assert (tmp_path / "killed" / "manifest.parquet").read_bytes() == (tmp_path / "above" / "manifest.parquet").read_bytes()
    # other search settings: proposed again (the kept ones belong to the old settings)
    run([str(src)], tmp_path / "killed", config=small.with_overrides({"search.partial_margin": 0.2}))
    assert proposed == [1]


def test_partial_proposals_from_region_files_and_an_inverted_file(tmp_path: Path) -> None:
    """The partial proposals read the region files a shard at a time; with the whole images in
    an inverted file (above partition_above) visiting every cell they are the exact ones, and
    visiting a few they keep nearly all of them (here: 95 %)."""
    from dedup.partition import VectorFiles
    from dedup.search import region_candidates
    from dedup.second_look.propose import RegionFiles, best_proposals, partial_candidates

    rng = np.random.default_rng(5)
    n, dim, windows = 3000, 64, 3
    centres = rng.standard_normal((40, dim))
    vecs = centres[rng.integers(0, 40, n)] + 0.8 * rng.standard_normal((n, dim))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    regions = rng.standard_normal((n, windows, dim)).astype(np.float32)
    hosts = rng.choice(n, 300, replace=False)  # these images hold a window close to another's whole
    regions[hosts, 0] = vecs[(hosts + 7) % n] + 0.3 * rng.standard_normal((300, dim))
    regions /= np.linalg.norm(regions, axis=2, keepdims=True)
    regions = regions.astype(np.float16)
    paths = []
    for k, (a, b) in enumerate([(0, 1000), (1000, 2500), (2500, n)]):
        np.save(tmp_path / f"{k}.npy", vecs[a:b])
        np.save(tmp_path / f"{k}.regions.npy", regions[a:b])
        paths.append(tmp_path / f"{k}.regions.npy")
    rows = np.arange(n, dtype=np.int64) * 2  # embedded rows need not be consecutive
    use = np.ones(n, bool)
    use[::50] = False  # rows without an image take no part
    files = RegionFiles.of(paths)
    assert files is not None and len(files) == n
    kw = {"propose": 0.5, "top_k": 4, "margin": 0.1, "per_image": 2}
    expected = best_proposals(
        region_candidates(vecs[use], regions[use], propose=0.5, top_k=4, rows=rows[use]),
        vecs[use], rows[use], margin=0.1, per_image=2,
    )  # fmt: skip
    assert len(expected) >= 250

    def pairs(c: object) -> set[tuple[int, int]]:
        return set(zip(c.i.tolist(), c.j.tolist(), strict=True))  # type: ignore[attr-defined]

    flat = partial_candidates(vecs, files, rows, use, **kw)
    assert pairs(flat) == pairs(expected)
    on_disk = VectorFiles([tmp_path / f"{k}.npy" for k in range(3)])
    every_cell = partial_candidates(on_disk, files, rows, use, lists=16, probe=16, **kw)
    assert pairs(every_cell) == pairs(expected)
    few_cells = partial_candidates(on_disk, files, rows, use, lists=16, probe=4, **kw)
    assert len(pairs(few_cells) & pairs(expected)) >= 0.95 * len(expected)
    assert partial_candidates(on_disk, files, rows, use, lists=16, probe=4, **kw).score.tobytes() == few_cells.score.tobytes()


def test_default_partial_proposals_reach_every_picture_of_a_collage(tmp_path: Path) -> None:
    """Bench v2 (issue 24): a collage holds up to five pictures, and a small one's window beats
    the two whole images' own similarity by less than 0.1. The defaults propose each picture
    of a four-picture collage whose windows beat the wholes by 0.08 (per image 4, margin
    0.075); the previous ones (2, 0.1) proposed none of them, and cut a collage to two."""
    from dedup.second_look.propose import RegionFiles, partial_candidates

    rng = np.random.default_rng(11)
    n, dim = 200, 256
    vecs = rng.standard_normal((n, dim))
    regions = rng.standard_normal((n, 13, dim))
    collage, pictures = 0, [11, 22, 33, 44]
    basis = np.linalg.qr(rng.standard_normal((dim, 9)))[0].T  # orthonormal directions
    vecs[pictures] = basis[:4]
    # the collage's whole image resembles each picture a little (0.3); one window of it, each
    # picture a little more (0.38)
    vecs[collage] = 0.3 * basis[:4].sum(axis=0) + 0.8 * basis[4]
    for w in range(4):
        regions[collage, w] = 0.38 * basis[w] + np.sqrt(1 - 0.38**2) * basis[5 + w]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    regions /= np.linalg.norm(regions, axis=2, keepdims=True)
    cos = vecs[pictures] @ vecs[collage]
    best = np.array([regions[collage, w] @ vecs[p] for w, p in enumerate(pictures)])
    assert np.allclose(best - cos, 0.08)
    np.save(tmp_path / "0.regions.npy", regions.astype(np.float16))
    files = RegionFiles.of([tmp_path / "0.regions.npy"])
    assert files is not None
    rows, use = np.arange(n, dtype=np.int64), np.ones(n, bool)
    s = RunConfig().search

    def proposed(**kw: float) -> set[int]:
        c = partial_candidates(vecs.astype(np.float32), files, rows, use, propose=s.partial_propose, **kw)  # type: ignore[arg-type]
        return {int(j) for i, j in zip(c.i.tolist(), c.j.tolist(), strict=True) if i == collage}

    now = proposed(top_k=s.partial_top_k, margin=s.partial_margin, per_image=s.partial_per_image)
    assert now == set(pictures)
    assert proposed(top_k=4, margin=0.1, per_image=2) == set()
    assert len(proposed(top_k=4, margin=0.05, per_image=2)) == 2


def test_band_from_nearest_neighbours_is_each_images_best_fresh_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The band proposed a block of images at a time from their nearest neighbours (memory
    bounded by the block, not by the pairs in the band) is the band's every pair cut to each
    image's best fresh ones; from a file of vectors through an inverted file visiting every cell
    too; and asks further for an image whose nearest are a joined group of copies."""
    from dedup.partition import VectorFiles
    from dedup.second_look.propose import band_candidates, fresh, top_per_image, whole_index

    rng = np.random.default_rng(11)
    n, dim = 1500, 32
    centres = rng.standard_normal((12, dim))
    vecs = centres[rng.integers(0, 12, n)] + 0.9 * rng.standard_normal((n, dim))
    vecs[:40] = vecs[0] + 0.01 * rng.standard_normal((40, dim))  # 40 copies of one image, joined below
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    rows = np.arange(n, dtype=np.int64) * 3 + 1
    use = np.ones(n, bool)
    use[::37] = False
    labels = np.arange(3 * n + 1, dtype=np.int64)
    labels[rows[:40]] = rows[0]  # the copies are one component already
    kw = {"low": 0.5, "high": 0.95, "block_size": 256}
    every = band_candidates(vecs, rows, use, **kw)
    assert len(every) > 20 * n  # a crowd: many more band pairs than are looked at
    expected = top_per_image(fresh(every, labels), 5)

    def pairs(c: Candidates) -> list[tuple[int, int, float]]:
        return sorted(zip(c.i.tolist(), c.j.tolist(), np.round(c.score, 4).tolist(), strict=True))

    nearest = band_candidates(vecs, rows, use, labels=labels, per_image=5, **kw)
    assert pairs(nearest) == pairs(expected)
    assert (nearest.i < nearest.j).all() and (nearest.window == -1).all()
    np.save(tmp_path / "v.npy", vecs)
    on_disk = VectorFiles([tmp_path / "v.npy"])
    ivf = whole_index(on_disk, use, lists=16, probe=16)
    assert pairs(band_candidates(on_disk, rows, use, labels=labels, per_image=5, index=ivf, **kw)) == pairs(expected)
    import dedup.second_look.propose

    monkeypatch.setattr(dedup.second_look.propose, "_RESULTS", 500)  # a few rows a search: the same pairs
    assert pairs(band_candidates(vecs, rows, use, labels=labels, per_image=5, **kw)) == pairs(expected)
