"""A second look at uncertain links: re-read the few images involved and check them properly.

Two kinds of candidates reach this stage (both proposed by :mod:`dedup.search`):

- **global** pairs whose fast embedding (the distilled SSCD) scored in the band
  ``[search.verify_from, search.threshold)``: both images are embedded again with
  ``search.verify_model`` (full SSCD) and the pair is kept at ``search.verify_threshold`` (the
  cascade the SSCD student was made for). Measured on the bench, the full model separates
  copies from look-alikes no better than the student does, so no preset turns it on.
- **partial** pairs: a region descriptor of image *i* (a window of its feature map, see
  :mod:`dedup.embed.regions`) came close to image *j*'s whole-image embedding. Region scores
  propose but never decide — they lift unrelated pairs too (on the bench, deciding on them cost
  more precision than any recall they bought, and re-embedding the window's crop with full SSCD
  separated no better at 10x the cost). What decides is geometry: *j*'s ORB features must land
  in *i* under one homography (``search.partial_inliers``), which a pasted, framed, warped
  picture passes and a different picture on the same kind of background does not.

The pipeline keeps no image bytes, so the images are read back from their shards
(:func:`dedup.report.thumbs.fetch_images`: only the shards that hold a candidate, each only until
its last wanted sample), a chunk of rows at a time. A candidate whose image can no longer be
read (the source moved or changed) is not linked: a second look that cannot look does not
confirm. Local features of the candidate rows stay in memory (about 40 KB a row) until the
pairs are checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from dedup._progress import ProgressFactory, silent
from dedup._types import Shard
from dedup.cluster import components
from dedup.config import RunConfig
from dedup.embed import Embedder, build_embedder
from dedup.errors import MissingDependencyError, SampleError
from dedup.fingerprint import decode, trim_borders
from dedup.rows import FeatureRows, as_rows
from dedup.search import Candidates, Edges, Signal, below, best_per_pair, embedding_edges, region_candidates

__all__ = ["LocalFeatures", "geometric_inliers", "load_regions", "local_features", "second_look", "verify"]

CHUNK_ROWS = 256  # images read (encoded bytes held) at once while verifying


def verify(
    table: pa.Table | FeatureRows,
    candidates: Candidates,
    cfg: RunConfig,
    *,
    shards: Sequence[Shard],
    progress: Callable[[int], object] | None = None,
    embedder: Embedder | None = None,
) -> tuple[Edges, dict[str, int]]:
    """The candidates a second look confirms, as edges, and counts for the report.

    Global candidates (``window < 0``) are re-embedded with ``search.verify_model`` and become
    :attr:`Signal.VERIFIED` links at ``search.verify_threshold``, scored by that model. Partial
    ones must show ``search.partial_inliers`` local-feature matches that one homography explains
    (:func:`geometric_inliers`) and become :attr:`Signal.PARTIAL` links, scored by their
    proposing region similarity.
    """
    stats = {"candidates": len(candidates), "global": 0, "partial": 0, "confirmed": 0, "unreadable": 0}
    if not len(candidates):
        return Edges.empty(), stats
    search = cfg.search
    is_partial = candidates.window >= 0
    stats["partial"] = int(is_partial.sum())
    stats["global"] = len(candidates) - stats["partial"]
    model: Embedder | None = None
    if stats["global"]:
        model = embedder or build_embedder(
            replace(cfg.embed, model=search.verify_model, regions=False, model_path=None)
            if cfg.embed.model != search.verify_model
            else replace(cfg.embed, regions=False),
            threads=None,
        )
    embed_rows = set(np.concatenate([candidates.i[~is_partial], candidates.j[~is_partial]]).tolist()) if model else set()
    local_rows = set(np.concatenate([candidates.i[is_partial], candidates.j[is_partial]]).tolist())
    rows = np.array(sorted(embed_rows | local_rows), np.int64)

    ids = as_rows(table).take(["sample_id", "shard"], rows)
    sample_of = dict(zip(rows.tolist(), ids.column("sample_id").to_pylist(), strict=True))
    shard_of = dict(zip(rows.tolist(), ids.column("shard").to_pylist(), strict=True))
    whole: dict[int, np.ndarray] = {}
    local: dict[int, LocalFeatures] = {}
    from dedup.report.thumbs import fetch_images  # the reader the report uses for thumbnails

    def look(r: int, data: bytes | None) -> tuple[int, np.ndarray | None, LocalFeatures | None]:
        """Decode one image and take what its pairs need; the image itself is dropped."""
        if data is None:
            return r, None, None
        try:
            # Local features look at 640 px at most, the model at its input size: a JPEG can
            # decode at a reduced scale. Trimming then measures that image, as it measured the
            # full one to within a pixel.
            img = decode(data, max_pixels=cfg.fingerprint.max_pixels, draft=_LOCAL_SIDE)
        except SampleError:
            return r, None, None
        if cfg.fingerprint.trim:  # what the embedding saw, so a trimmed copy compares as it did
            img = trim_borders(img)
        model_input = model.preprocess(img) if model is not None and r in embed_rows else None
        feats = local_features(img) if r in local_rows else None
        return r, model_input, feats

    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and OpenCV release the GIL
        for start in range(0, rows.size, CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS].tolist()
            found = fetch_images(shards, {sample_of[r]: shard_of[r] for r in chunk})
            looked = list(pool.map(look, chunk, [found.get(sample_of[r]) for r in chunk]))
            del found
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
            if progress is not None:
                progress(len(chunk))

    score = np.zeros(len(candidates), np.float32)
    accept = np.zeros(len(candidates), bool)
    glob = np.flatnonzero(~is_partial)
    for k in glob.tolist():
        a, b = whole.get(int(candidates.i[k])), whole.get(int(candidates.j[k]))
        if a is not None and b is not None:
            score[k] = float(np.dot(a, b))
            accept[k] = score[k] >= search.verify_threshold
    part = np.flatnonzero(is_partial)
    pairs = [(local.get(int(candidates.j[k])), local.get(int(candidates.i[k]))) for k in part.tolist()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        inliers = list(pool.map(lambda p: geometric_inliers(*p) if p[0] and p[1] else 0, pairs))
    for k, n_in in zip(part.tolist(), inliers, strict=True):
        score[k] = candidates.score[k]
        accept[k] = n_in >= search.partial_inliers
    # Several windows of one container may propose the same pair: keep the best.
    edges = _best_per_pair(candidates.i[accept], candidates.j[accept], score[accept], is_partial[accept])
    stats["confirmed"] = len(edges)
    return edges, stats


@dataclass(frozen=True, slots=True)
class LocalFeatures:
    """ORB keypoint positions ``(n, 2)`` and binary descriptors ``(n, 32)`` of one image."""

    points: np.ndarray
    descriptors: np.ndarray

    def __bool__(self) -> bool:
        return self.points.shape[0] >= _MIN_MATCHES


_LOCAL_SIDE = 640  # images are fitted within this before detecting keypoints
_MIN_MATCHES = 8


def local_features(img: Image.Image, *, n: int = 1000) -> LocalFeatures:
    """ORB features of ``img`` (grey, fitted within 640 px): what :func:`geometric_inliers` matches.

    ORB, not SIFT: measured on the bench's partial-copy candidates, ORB at 30 inliers found as
    many pasted pictures as SIFT at 15 with fewer false links, in a quarter of the time.
    """
    cv2 = _cv2()
    grey = img.convert("L")
    grey.thumbnail((_LOCAL_SIDE, _LOCAL_SIDE), Image.Resampling.BILINEAR)
    arr = np.asarray(grey)
    keypoints, descriptors = cv2.ORB_create(nfeatures=n).detectAndCompute(arr, None)
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
    return LocalFeatures(np.float32([k.pt for k in keypoints]), descriptors)


def geometric_inliers(query: LocalFeatures, target: LocalFeatures, *, ratio: float = 0.75) -> int:
    """How many of ``query``'s features land in ``target`` under one homography.

    Each query descriptor's two nearest target descriptors (Hamming) must pass Lowe's ratio
    test; RANSAC (6 px) then fits a homography to the survivors. A picture pasted into a scene,
    warped, framed or partly covered, keeps dozens of inliers; a different picture on the same
    kind of background keeps almost none.
    """
    cv2 = _cv2()
    if not query or not target:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(query.descriptors, target.descriptors, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < ratio * m[1].distance]
    if len(good) < _MIN_MATCHES:
        return 0
    src = query.points[[m.queryIdx for m in good]]
    dst = target.points[[m.trainIdx for m in good]]
    cv2.setRNGSeed(0)  # RANSAC samples at random: same pair, same answer (byte-identical runs)
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, 6.0)
    return int(mask.sum()) if mask is not None else 0


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError(
            "finding partial copies needs OpenCV, which is not installed; "
            "install it with: pip install opencv-python-headless"
        ) from None
    return cv2


def _best_per_pair(i: np.ndarray, j: np.ndarray, score: np.ndarray, partial: np.ndarray) -> Edges:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = best_per_pair(lo, hi, score)
    signal = np.where(partial[keep], int(Signal.PARTIAL), int(Signal.VERIFIED)).astype(np.int8)
    return Edges(lo[keep], hi[keep], score[keep].astype(np.float32), signal)


def load_regions(paths: Sequence[Path]) -> np.ndarray | None:
    """The region descriptors of a run's shards, in row order (float16), or None when any
    shard has none (regions off, or features made before they were)."""
    parts: list[np.ndarray] = []
    for path in paths:
        if not path.is_file():
            return None
        parts.append(np.load(path, mmap_mode="r"))
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return None
    if len({p.shape[1:] for p in parts}) != 1:
        return None
    return np.concatenate(parts)


def second_look(
    table: pa.Table | FeatureRows,
    vectors: np.ndarray,
    direct: Edges,
    cfg: RunConfig,
    *,
    shards: Sequence[Shard],
    regions: np.ndarray | None = None,
    progress: ProgressFactory = silent,
) -> tuple[Edges, dict[str, int]]:
    """Confirmed links beyond ``direct`` (the links every signal made at its own threshold).

    Proposes the band candidates (``search.verify_from``) and, with ``regions``, the partial
    ones (``search.partial``); drops those already joined by ``direct`` links; verifies the rest
    (:func:`verify`). Only rows with an image and an embedding take part.
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
    if 0 <= search.verify_from < search.threshold:
        with progress("second look: propose", int(rows.size), "vec") as bar:
            band, _ = embedding_edges(vecs, threshold=search.verify_from, rows=rows, block_size=search.block_size, progress=bar.update)
        parts.append(below(band, search.threshold))
    if search.partial and regions is not None and regions.shape[0] == embedded_rows.size:
        with progress("partial copies: propose", int(rows.size), "img") as bar:
            found = region_candidates(
                vecs, regions[use], propose=search.partial_propose, top_k=search.partial_top_k, rows=rows, progress=bar.update
            )
        parts.append(_best_proposals(found, vecs, rows, margin=search.partial_margin, per_image=search.partial_per_image))
    cands = Candidates.concat(parts)
    if len(cands):
        # pairs the direct links already join need no second look
        labels = components(rows_of.num_rows, direct)
        fresh = labels[cands.i] != labels[cands.j]
        cands = Candidates(cands.i[fresh], cands.j[fresh], cands.score[fresh], cands.window[fresh])
    if not len(cands):
        return Edges.empty(), stats
    with progress("second look: verify", int(np.unique(np.concatenate([cands.i, cands.j])).size), "img") as bar:
        return verify(rows_of, cands, cfg, shards=shards, progress=bar.update)


def _best_proposals(cands: Candidates, vecs: np.ndarray, rows: np.ndarray, *, margin: float, per_image: int) -> Candidates:
    """Partial-copy proposals worth a second look: the region must beat the two whole images'
    own similarity by ``margin`` (a region of a plain background matches many whole images
    about as well as the whole does), and each containing image keeps its ``per_image`` best.
    Measured on the bench: margin 0.1 and 2 per image keep 96 % of the true pairs proposed at
    0.5 and a fifth of the false ones."""
    if not len(cands):
        return cands
    pos = np.searchsorted(rows, cands.i), np.searchsorted(rows, cands.j)
    whole = np.einsum("nd,nd->n", vecs[pos[0]], vecs[pos[1]])
    keep = cands.score - whole >= margin
    i, j, score, window = cands.i[keep], cands.j[keep], cands.score[keep], cands.window[keep]
    order = np.lexsort((-score, i))
    i, j, score, window = i[order], j[order], score[order], window[order]
    start = np.r_[0, np.flatnonzero(i[1:] != i[:-1]) + 1] if i.size else np.zeros(0, np.int64)
    rank = np.arange(i.size) - np.repeat(start, np.diff(np.r_[start, i.size]))
    top = rank < per_image
    return Candidates(i[top], j[top], score[top], window[top])
