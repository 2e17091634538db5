"""The second look, orchestrated: propose, re-read the few images involved, check them properly.

Two kinds of candidates reach this stage (both proposed by :mod:`dedup.search`):

- **global** pairs whose fast embedding (the distilled SSCD) scored in the band
  ``[search.verify_from, search.threshold)``. With ``search.verify_by = "geometry"`` (the
  default) the pair must align: ``search.verify_inliers`` ORB matches must fit one rotation,
  scale and shift (or failing that one homography), and once one image is warped onto the
  other, ``search.verify_agreement`` of the overlap's pixels must agree after the best gain and
  offset (:func:`confirms`). Crops, pads, captions, rotations and recolourings pass; drawings
  of one family (puzzle pieces, road signs) share keypoints but not their pixels, and flat
  images find no keypoints. Each image's ``search.verify_per_image`` best band pairs are
  looked at. With
  ``"model"`` both images are embedded again with ``search.verify_model`` (full SSCD) and the
  pair is kept at ``search.verify_threshold`` (the cascade the SSCD student was made for);
  measured on the bench, the full model separates copies from look-alikes no better than the
  student does.
- **partial** pairs: a region descriptor of image *i* (a window of its feature map, see
  :mod:`dedup.embed.regions`) came close to image *j*'s whole-image embedding. Region scores
  propose but never decide — they lift unrelated pairs too (on the bench, deciding on them cost
  more precision than any recall they bought, and re-embedding the window's crop with full SSCD
  separated no better at 10x the cost). What decides is geometry: *j*'s ORB features must land
  in *i* under one homography (``search.partial_inliers`` of them with half the aligned
  pixels agreeing, or as many as a global pair needs with as many agreeing), which a pasted,
  framed, warped picture passes and a different picture on the same kind of background does not.

The pipeline keeps no image bytes, so the images are read back from their shards
(:func:`dedup.sources.readback.stream_images`: only the shards that hold a candidate, each once and
only until its last wanted sample), decoded a chunk of rows at a time while the next is read. A
candidate whose image can no longer be read (the source moved or changed) is not linked: a
second look that cannot look does not confirm. Local features of the candidate rows stay in memory until the pairs are checked:
about 120 KB a row (1,000 ORB descriptors and a 320 px grey copy for the pixel check).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from itertools import batched

import numpy as np
import pyarrow as pa
from PIL import Image

from dedup._progress import ProgressFactory, silent
from dedup._types import Shard
from dedup.cluster import components
from dedup.config import RunConfig, Verifier
from dedup.embed import Embedder, build_embedder
from dedup.errors import SampleError
from dedup.fingerprint import decode, trim_borders
from dedup.rows import FeatureRows, as_rows
from dedup.search import Candidates, Edges, Signal, below, best_per_pair, embedding_edges, region_candidates
from dedup.second_look.geometry import LOCAL_SIDE, LocalFeatures, confirms, local_features, one_thread_each
from dedup.second_look.propose import best_proposals, fresh, top_per_image
from dedup.sources.readback import stream_images

__all__ = ["second_look", "verify"]

_CHECK_BLOCK = 256  # pairs checked between two updates of what is joined (see verify())


CHUNK_ROWS = 256  # images read (encoded bytes held) at once while verifying


def verify(
    table: pa.Table | FeatureRows,
    candidates: Candidates,
    cfg: RunConfig,
    *,
    shards: Sequence[Shard],
    progress: Callable[[int], object] | None = None,
    embedder: Embedder | None = None,
    joined: np.ndarray | None = None,
    trims: np.ndarray | None = None,
) -> tuple[Edges, dict[str, int]]:
    """The candidates a second look confirms, as edges, and counts for the report.

    ``joined`` (a component label per row, from the links already made) lets the geometric
    checks run best score first, a block at a time, skipping the pairs that earlier
    confirmations have already joined: the components come out the same, for a fifth fewer
    checks on the bench (a large group's copies are joined long before its last pairs).
    ``trims`` (a box per row, shares of the image; NaN where unknown) crops each re-read image
    as its model input was cut, instead of measuring its margins again.

    Global candidates (``window < 0``) become :attr:`Signal.VERIFIED` links, scored by their
    proposing similarity when geometry confirms them (``search.verify_by = "geometry"``:
    :func:`confirms`), or re-embedded with ``search.verify_model`` and scored by it at
    ``search.verify_threshold`` (``"model"``). Partial ones must pass :func:`confirms` too and
    become :attr:`Signal.PARTIAL` links, scored by their proposing region similarity.
    """
    stats = {"candidates": len(candidates), "global": 0, "partial": 0, "confirmed": 0, "unreadable": 0}
    if not len(candidates):
        return Edges.empty(), stats
    search = cfg.search
    is_partial = candidates.window >= 0
    stats["partial"] = int(is_partial.sum())
    stats["global"] = len(candidates) - stats["partial"]
    model: Embedder | None = None
    by_model = search.verify_by == Verifier.MODEL
    if stats["global"] and by_model:
        model = embedder or build_embedder(
            replace(cfg.embed, model=search.verify_model, regions=False, model_path=None)
            if cfg.embed.model != search.verify_model
            else replace(cfg.embed, regions=False),
            threads=None,
        )
    embed_rows = set(np.concatenate([candidates.i[~is_partial], candidates.j[~is_partial]]).tolist()) if model else set()
    by_geometry = is_partial | (not by_model)
    local_rows = set(np.concatenate([candidates.i[by_geometry], candidates.j[by_geometry]]).tolist())
    rows = np.array(sorted(embed_rows | local_rows), np.int64)

    ids = as_rows(table).take(["sample_id", "shard"], rows)
    sample_of = dict(zip(rows.tolist(), ids.column("sample_id").to_pylist(), strict=True))
    shard_of = dict(zip(rows.tolist(), ids.column("shard").to_pylist(), strict=True))
    whole: dict[int, np.ndarray] = {}
    local: dict[int, LocalFeatures] = {}
    def look(r: int, data: bytes | None) -> tuple[int, np.ndarray | None, LocalFeatures | None]:
        """Decode one image and take what its pairs need; the image itself is dropped."""
        if data is None:
            return r, None, None
        # What the embedding saw, so a trimmed copy compares as it did: the box the fingerprint
        # stage cut, else (features from before boxes were kept) the margins measured again.
        box = trims[r] if trims is not None else None
        if box is not None and np.isnan(box).any():
            box = None
        # ORB and the pixel check see brightness only: the luma is all that is decoded, unless
        # the verifying model or a new measure of the margins (in colour) needs more.
        grey = (model is None or r not in embed_rows) and (box is not None or not cfg.fingerprint.trim)
        try:
            # Local features look at 512 px, the model at its input size: a JPEG can decode at
            # a reduced scale. Trimming then measures that image, as it measured the
            # full one to within a pixel.
            img = decode(data, max_pixels=cfg.fingerprint.max_pixels, draft=LOCAL_SIDE, grey=grey)
        except SampleError:
            return r, None, None
        if box is not None:
            img = _crop_to(img, box)
        elif cfg.fingerprint.trim:
            img = trim_borders(img)
        model_input = model.preprocess(img) if model is not None and r in embed_rows else None
        feats = local_features(img) if r in local_rows else None
        return r, model_input, feats

    def take(looked: Sequence[tuple[int, np.ndarray | None, LocalFeatures | None]]) -> None:
        inputs: list[tuple[int, np.ndarray]] = []
        for r, model_input, feats in looked:
            if model_input is None and feats is None:
                stats["unreadable"] += 1
            if model_input is not None:
                inputs.append((r, model_input))
            if feats is not None:
                local[r] = feats
        if model is not None:
            for b in range(0, len(inputs), 32):
                batch = inputs[b : b + 32]
                vecs = model.embed(np.stack([x for _, x in batch]))
                whole.update(zip([r for r, _ in batch], vecs, strict=True))
        if progress is not None and looked:
            progress(len(looked))

    def arrivals() -> Iterator[tuple[int, bytes | None]]:
        """``(row, bytes)`` as the shards are read, each once; then the rows never found."""
        row_of = {sample_of[r]: r for r in rows.tolist()}
        seen: set[int] = set()
        for sample_id, data in stream_images(shards, {sample_of[r]: shard_of[r] for r in rows.tolist()}):
            seen.add(row_of[sample_id])
            yield row_of[sample_id], data
        yield from ((r, None) for r in rows.tolist() if r not in seen)

    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and OpenCV release the GIL
        # The next chunk is read while the pool decodes this one: two chunks' bytes at most.
        pending: list[Future[tuple[int, np.ndarray | None, LocalFeatures | None]]] = []
        for chunk in batched(arrivals(), CHUNK_ROWS):
            submitted = [pool.submit(look, r, data) for r, data in chunk]
            take([f.result() for f in pending])
            pending = submitted
        take([f.result() for f in pending])

    score = np.zeros(len(candidates), np.float32)
    accept = np.zeros(len(candidates), bool)
    if by_model:
        for k in np.flatnonzero(~is_partial).tolist():
            a, b = whole.get(int(candidates.i[k])), whole.get(int(candidates.j[k]))
            if a is not None and b is not None:
                score[k] = float(np.dot(a, b))
                accept[k] = score[k] >= search.verify_threshold

    def check(pair: tuple[LocalFeatures | None, LocalFeatures | None, bool]) -> bool:
        query, target, partial = pair
        if not query or not target:
            return False
        return confirms(query, target, search, partial=partial)

    checks = np.flatnonzero(by_geometry)
    checks = checks[np.argsort(-candidates.score[checks], kind="stable")]  # best score first
    parent: dict[int, int] = {}  # union-find over ``joined``'s components, as checks confirm

    def root(x: int) -> int:
        while (up := parent.get(x, x)) != x:
            parent[x] = parent.get(up, up)  # path halving
            x = up
        return x

    def ends(k: int) -> tuple[int, int]:
        assert joined is not None
        return root(int(joined[candidates.i[k]])), root(int(joined[candidates.j[k]]))

    stats["checked"] = 0
    with ThreadPoolExecutor(max_workers=workers, initializer=one_thread_each) as pool:
        for start in range(0, checks.size, _CHECK_BLOCK):
            block = checks[start : start + _CHECK_BLOCK].tolist()
            if joined is not None:
                block = [k for k in block if len(set(ends(k))) == 2]  # not joined yet
            stats["checked"] += len(block)
            pairs = [(local.get(int(candidates.j[k])), local.get(int(candidates.i[k])), bool(is_partial[k])) for k in block]
            for k, ok in zip(block, pool.map(check, pairs), strict=True):
                score[k] = candidates.score[k]
                accept[k] = ok
                if ok and joined is not None:
                    ri, rj = ends(k)
                    if ri != rj:
                        parent[ri] = rj
    # Several windows of one container may propose the same pair: keep the best.
    edges = _best_per_pair(candidates.i[accept], candidates.j[accept], score[accept], is_partial[accept])
    stats["confirmed"] = len(edges)
    return edges, stats


def _crop_to(img: Image.Image, box: np.ndarray) -> Image.Image:
    """``img`` cut to ``box`` (left, top, right, bottom as shares of its size), the whole of it
    for the full box. A JPEG re-read at a reduced scale lands within a pixel of the full one."""
    w, h = img.size
    left, top = round(float(box[0]) * w), round(float(box[1]) * h)
    right, bottom = min(w, round(float(box[2]) * w)), min(h, round(float(box[3]) * h))
    if (left, top, right, bottom) == (0, 0, w, h) or right - left < 1 or bottom - top < 1:
        return img
    return img.crop((left, top, right, bottom))


def _best_per_pair(i: np.ndarray, j: np.ndarray, score: np.ndarray, partial: np.ndarray) -> Edges:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = best_per_pair(lo, hi, score)
    signal = np.where(partial[keep], int(Signal.PARTIAL), int(Signal.VERIFIED)).astype(np.int8)
    return Edges(lo[keep], hi[keep], score[keep].astype(np.float32), signal)


def second_look(
    table: pa.Table | FeatureRows,
    vectors: np.ndarray,
    direct: Edges,
    cfg: RunConfig,
    *,
    shards: Sequence[Shard],
    regions: np.ndarray | None = None,
    trims: np.ndarray | None = None,
    progress: ProgressFactory = silent,
) -> tuple[Edges, dict[str, int]]:
    """Confirmed links beyond ``direct`` (the links every signal made at its own threshold).

    Proposes the band candidates (``search.verify_from``) and, with ``regions``, the partial
    ones (``search.partial``); drops those already joined by ``direct`` links; verifies the rest
    (:func:`verify`). Only rows with an image and an embedding take part. ``trims`` (a box per
    embedded row, :func:`load_trims`) says where each model input was cut from its image.
    """
    search = cfg.search
    rows_of = as_rows(table)
    embedded_rows = np.flatnonzero(rows_of.flags("embedded"))
    has_image = rows_of.flags("has_image") & rows_of.equals("status", "ok")
    use = has_image[embedded_rows] if embedded_rows.size else np.zeros(0, bool)
    stats = {"candidates": 0, "confirmed": 0}
    if embedded_rows.size < 2 or not use.any():
        return Edges.empty(), stats
    if embedded_rows.size > search.partition_above:
        # Exact flat searches here; past this size the second look would dominate the run.
        return Edges.empty(), {"candidates": 0, "confirmed": 0, "skipped_above": int(search.partition_above)}
    rows = embedded_rows[use]
    vecs = np.asarray(vectors, np.float32)[use]
    parts: list[Candidates] = []
    labels = components(rows_of.num_rows, direct)
    if 0 <= search.verify_from < search.threshold:
        with progress("second look: propose", int(rows.size), "vec") as bar:
            band, _ = embedding_edges(vecs, threshold=search.verify_from, rows=rows, block_size=search.block_size, progress=bar.update)
        band_cands = below(band, search.threshold)
        band_cands = fresh(band_cands, labels)
        parts.append(top_per_image(band_cands, search.verify_per_image))
    if search.partial and regions is not None and regions.shape[0] == embedded_rows.size:
        with progress("partial copies: propose", int(rows.size), "img") as bar:
            found = region_candidates(
                vecs, regions[use], propose=search.partial_propose, top_k=search.partial_top_k, rows=rows, progress=bar.update
            )
        parts.append(best_proposals(found, vecs, rows, margin=search.partial_margin, per_image=search.partial_per_image))
    cands = Candidates.concat(parts)
    cands = fresh(cands, labels)  # pairs the direct links already join need no second look
    if not len(cands):
        return Edges.empty(), stats
    with progress("second look: verify", int(np.unique(np.concatenate([cands.i, cands.j])).size), "img") as bar:
        boxes = None
        if trims is not None and trims.shape == (embedded_rows.size, 4):
            boxes = np.full((rows_of.num_rows, 4), np.nan, np.float32)
            boxes[embedded_rows] = trims
        return verify(rows_of, cands, cfg, shards=shards, progress=bar.update, joined=labels, trims=boxes)
