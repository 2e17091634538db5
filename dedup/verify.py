"""A second look at uncertain links: re-read the few images involved and check them properly.

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
(:func:`dedup.report.thumbs.stream_images`: only the shards that hold a candidate, each once and
only until its last wanted sample), decoded a chunk of rows at a time while the next is read. A
candidate whose image can no longer be read (the source moved or changed) is not linked: a
second look that cannot look does not confirm. Local features of the candidate rows stay in memory until the pairs are checked:
about 120 KB a row (1,000 ORB descriptors and a 320 px grey copy for the pixel check).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import batched
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from dedup._progress import ProgressFactory, silent
from dedup._types import Shard
from dedup.cluster import components
from dedup.config import RunConfig, SearchConfig, Verifier
from dedup.embed import Embedder, build_embedder
from dedup.errors import MissingDependencyError, SampleError
from dedup.fingerprint import decode, trim_borders
from dedup.rows import FeatureRows, as_rows
from dedup.search import Candidates, Edges, Signal, below, best_per_pair, embedding_edges, region_candidates

__all__ = [
    "LocalFeatures",
    "aligned_agreement",
    "geometric_inliers",
    "geometric_match",
    "load_regions",
    "load_trims",
    "local_features",
    "second_look",
    "verify",
]

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
    from dedup.report.thumbs import stream_images  # the reader the report uses for thumbnails

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
            img = decode(data, max_pixels=cfg.fingerprint.max_pixels, draft=_LOCAL_SIDE, grey=grey)
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
    with ThreadPoolExecutor(max_workers=workers, initializer=_one_thread_each) as pool:
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


@dataclass(frozen=True, slots=True)
class LocalFeatures:
    """ORB keypoint positions ``(n, 2)`` and binary descriptors ``(n, 32)`` of one image, and
    the image itself, grey and small (``grey``: ``scale`` of the keypoints' pixel size), for
    comparing pixels once two images are aligned."""

    points: np.ndarray
    descriptors: np.ndarray
    grey: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    scale: float = 1.0

    def __bool__(self) -> bool:
        return self.points.shape[0] >= _MIN_MATCHES


_LOCAL_SIDE = 512  # images are fitted to this (longest side) before detecting keypoints
_FAST_THRESHOLD = 10  # ORB's corner contrast (OpenCV's default 20 finds too few in clip art)
_MIN_MATCHES = 8
_GREY_SIDE = 320  # aligned pixels are compared at this size (blurred: small shifts do not count)
_AGREE = 0.1  # two aligned pixels agree within this share of the grey range
_OPENING = np.ones((3, 3), np.uint8)  # see aligned_agreement()
_CHECK_BLOCK = 256  # pairs checked between two updates of what is joined (see verify())
# A whole-image pair tries a homography only when the rotation + scale + shift fit kept this
# many inliers: on the bench that skips 42 % of the homography fits and changes no link.
_HOMOGRAPHY_AFTER = 8
_PARTIAL_AGREEMENT = 0.5  # see confirms()
# RANSAC's cap (OpenCV's default 2,000): a pair that 500 samples cannot fit is no copy, and the
# cap bounds the time the many unrelated pairs of a band take
_RANSAC_ITERATIONS = 500


def local_features(img: Image.Image, *, n: int = 1000) -> LocalFeatures:
    """ORB features of ``img`` (grey, its longest side scaled to 512 px, small drawings enlarged)
    and its 320 px grey copy: what :func:`confirms` and :func:`geometric_inliers` match.

    ORB, not SIFT: measured on the bench's partial-copy candidates, ORB at 30 inliers found as
    many pasted pictures as SIFT at 15 with fewer false links, in a quarter of the time.
    """
    cv2 = _cv2()
    grey = img if img.mode == "L" else img.convert("L")
    fit = _LOCAL_SIDE / max(grey.size)  # small drawings are enlarged: ORB finds few corners in them
    if fit != 1:
        grey = grey.resize((max(1, round(grey.width * fit)), max(1, round(grey.height * fit))), Image.Resampling.BILINEAR)
    arr = np.asarray(grey)
    scale = min(1.0, _GREY_SIDE / max(arr.shape))
    # Linear, not area, sampling: the copy is blurred before pixels are compared, and at 512 ->
    # 320 px the two gave the same links on the bench for a fifth of the cost (0.40 -> 0.09 ms)
    small = cv2.resize(arr, (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale))), interpolation=cv2.INTER_LINEAR)
    keypoints, descriptors = cv2.ORB_create(nfeatures=n, fastThreshold=_FAST_THRESHOLD).detectAndCompute(arr, None)
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), small, scale)
    # KeyPoint_convert: the (n, 2) positions in one call (0.015 ms, not 0.7 ms a loop over them)
    return LocalFeatures(cv2.KeyPoint_convert(keypoints).reshape(-1, 2).astype(np.float32), descriptors, small, scale)


def _matches(query: LocalFeatures, target: LocalFeatures, ratio: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Points of ``query``'s features whose nearest ``target`` descriptor (Hamming) passes Lowe's
    ratio test against the second nearest, and of those nearest ones; None under 8 matches.

    The two nearest come from faiss's binary flat index (hardware popcount): the same neighbours
    and distances as OpenCV's ``BFMatcher(NORM_HAMMING).knnMatch(k=2)``, a quarter of the time
    on the bench's pairs, and numpy arrays instead of a thousand ``DMatch`` objects. A tie for
    the nearest fails the ratio test either way, so which of the tied is named cannot matter.
    """
    if not query or not target:
        return None
    import faiss

    index = faiss.IndexBinaryFlat(8 * target.descriptors.shape[1])
    index.add(np.ascontiguousarray(target.descriptors))
    dist, nearest = index.search(np.ascontiguousarray(query.descriptors), 2)
    good = np.flatnonzero(dist[:, 0] < ratio * dist[:, 1])
    if good.size < _MIN_MATCHES:
        return None
    return query.points[good], target.points[nearest[good, 0]]


def _fit(src: np.ndarray, dst: np.ndarray, *, similarity: bool) -> tuple[np.ndarray | None, int]:
    """The transform RANSAC (6 px) fits from ``src`` to ``dst`` as a 3x3 matrix, and its inliers:
    a homography, or with ``similarity`` a rotation, scale and shift only (which cannot fold a
    copy onto a line, as a homography fitted to a few clustered matches can)."""
    cv2 = _cv2()
    cv2.setRNGSeed(0)  # RANSAC samples at random: same pair, same answer (byte-identical runs)
    if similarity:
        h, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=6.0, maxIters=_RANSAC_ITERATIONS)
        h = np.vstack([h, [0.0, 0.0, 1.0]]) if h is not None else None
    else:
        # OpenCV's USAC (USAC_DEFAULT: RANSAC with local optimisation, its own fixed seed, so
        # runs stay byte-identical): on the bench a quarter of classic RANSAC's fitting time at
        # the same cap, and a few more partial copies confirmed (0.636 -> 0.642), P unchanged
        h, mask = cv2.findHomography(src, dst, cv2.USAC_DEFAULT, 6.0, maxIters=_RANSAC_ITERATIONS)
    if h is None or mask is None:
        return None, 0
    return h, int(mask.sum())


def geometric_inliers(query: LocalFeatures, target: LocalFeatures, *, ratio: float = 0.75) -> int:
    """How many of ``query``'s features land in ``target`` under one homography.

    Each query descriptor's two nearest target descriptors (Hamming) must pass Lowe's ratio
    test; RANSAC (6 px) then fits a homography to the survivors. A picture pasted into a scene,
    warped, framed or partly covered, keeps dozens of inliers; a different picture on the same
    kind of background keeps almost none.
    """
    found = _matches(query, target, ratio)
    return _fit(*found, similarity=False)[1] if found is not None else 0


def geometric_match(query: LocalFeatures, target: LocalFeatures, *, ratio: float = 0.75, similarity: bool = False) -> tuple[int, float]:
    """``query``'s inliers in ``target`` under one homography (with ``similarity``, one
    rotation + scale + shift), and how well the two agree once aligned by it
    (:func:`aligned_agreement`; 0 without one)."""
    found = _matches(query, target, ratio)
    return _aligned(query, target, found, similarity=similarity) if found is not None else (0, 0.0)


def _aligned(query: LocalFeatures, target: LocalFeatures, found: tuple[np.ndarray, np.ndarray], *, similarity: bool) -> tuple[int, float]:
    h, inliers = _fit(*found, similarity=similarity)
    if h is None:
        return 0, 0.0
    return inliers, _agreement_both_ways(_Blurred(query, target), h)


class _Blurred:
    """The blurred grey copies of one pair, made on first use and shared by every alignment of
    the pair (both directions, both transforms): the blur does not depend on the alignment."""

    __slots__ = ("query", "target", "_q", "_t")

    def __init__(self, query: LocalFeatures, target: LocalFeatures) -> None:
        self.query, self.target = query, target
        self._q: np.ndarray | None = None
        self._t: np.ndarray | None = None

    def of(self, which: LocalFeatures) -> np.ndarray:
        if which is self.query:
            if self._q is None:
                self._q = _blur(which.grey)
            return self._q
        if self._t is None:
            self._t = _blur(which.grey)
        return self._t


def _blur(grey: np.ndarray) -> np.ndarray:
    blurred: np.ndarray = _cv2().GaussianBlur(grey.astype(np.float32), (3, 3), 0)
    return blurred


def _agreement_both_ways(pair: _Blurred, homography: np.ndarray, *, enough: float = 2.0) -> float:
    """The better of ``query`` warped onto ``target`` and ``target`` warped back onto ``query``:
    either image may be the crop of the other, so the smaller overlap is judged both ways. The
    way back is not computed once the first reaches ``enough`` (the answer is then known)."""
    agreement = _agreement(pair, pair.query, pair.target, homography)
    if agreement >= enough:
        return agreement
    try:
        back = np.linalg.inv(homography)
    except np.linalg.LinAlgError:
        return agreement
    return max(agreement, _agreement(pair, pair.target, pair.query, back))


def aligned_agreement(query: LocalFeatures, target: LocalFeatures, homography: np.ndarray) -> float:
    """The share of the overlap where ``query``, warped onto ``target`` by ``homography`` (from
    keypoint to keypoint pixels), has the brightness of ``target`` within 10 % of the grey range,
    once the best gain and offset (least squares) maps one onto the other.

    Keypoints say two images share corners; this says they share their pixels. A crop, a
    padded or captioned copy agrees almost everywhere (a caption bar is outside the overlap,
    thin text over the picture is forgiven, bold text costs its area); two puzzle pieces or
    road signs of one family share their outline's corners but not the pixels between them.
    A negative gain (an inverted image) or an overlap under 64 pixels agrees nowhere.
    """
    return _agreement(_Blurred(query, target), query, target, homography)


def _agreement(pair: _Blurred, query: LocalFeatures, target: LocalFeatures, homography: np.ndarray) -> float:
    """:func:`aligned_agreement`, with the pair's blurred copies made once (``pair``).

    Computed over whole arrays (the part outside the overlap zeroed) rather than on the
    overlap's pixels picked out one by one, without BLAS (whose threads spin against the check
    pool's), and an affine transform (the rotation + scale + shift fit, and its inverse) warped
    as one, at half a perspective warp's cost. Replaying the bench's 7,702 checks on one
    thread: 29.1 -> 25.7 s, the same 729 confirmed.
    """
    cv2 = _cv2()
    q, t = query.grey, target.grey
    if q.size == 0 or t.size == 0:
        return 0.0
    to_small = np.diag([target.scale, target.scale, 1.0]) @ homography @ np.diag([1 / query.scale, 1 / query.scale, 1.0])
    qb, tb = pair.of(query), pair.of(target)
    size = (t.shape[1], t.shape[0])
    border = {"flags": cv2.INTER_LINEAR, "borderMode": cv2.BORDER_CONSTANT, "borderValue": -1.0}
    if np.allclose(to_small[2], (0.0, 0.0, 1.0), rtol=0.0, atol=1e-12):
        warped = cv2.warpAffine(qb, to_small[:2], size, **border)
    else:
        warped = cv2.warpPerspective(qb, to_small, size, **border)
    overlap = warped >= 0
    n = int(np.count_nonzero(overlap))
    if n < 64:
        return 0.0
    x = np.maximum(warped, 0.0)  # grey levels 0-255, and 0 outside the overlap
    y = tb * overlap
    sx, sy = float(x.sum(dtype=np.float64)), float(y.sum(dtype=np.float64))
    var = float(np.einsum("ij,ij->", x, x, dtype=np.float64)) - sx * sx / n
    cov = float(np.einsum("ij,ij->", x, y, dtype=np.float64)) - sx * sy / n
    # Least squares y ~ gain * x + offset. A flat overlap (under a hundredth of a grey level
    # apart, on average) fits a constant as well as anything: no gain to speak of.
    if var <= n * 1e-4:
        return 0.0
    gain = cov / var
    if gain <= 0.2:  # flat or inverted
        return 0.0
    # Disagreement thinner than the opening's 3 px (at the comparison size) is forgiven: the
    # strokes of overlaid text and watermarks, edges shifted by a pixel. A different pictogram
    # or a missing puzzle knob is a blob, which stays.
    differs = np.abs(gain * (x - sx / n) - (y - sy / n)) >= _AGREE * 255
    np.logical_and(differs, overlap, out=differs)
    opened = cv2.morphologyEx(differs.view(np.uint8), cv2.MORPH_OPEN, _OPENING).view(bool)
    return 1.0 - int(np.count_nonzero(np.logical_and(opened, overlap, out=opened))) / n


def confirms(query: LocalFeatures, target: LocalFeatures, search: SearchConfig, *, partial: bool) -> bool:
    """Whether geometry confirms that ``query`` and ``target`` show one picture.

    A copy of the whole image (a crop, pad, caption, rotation, recolouring) is one rotation,
    scale and shift away from its original; a picture in a scene (``partial``) or a warped
    print is a full homography away, which is tried when the simpler model fails. Either way
    ``search.verify_inliers`` matches must fit the transform and ``search.verify_agreement`` of
    the aligned overlap must agree (:func:`aligned_agreement`). A partial candidate also passes
    on ``search.partial_inliers`` matches when half its overlap agrees: a mock-up's shading
    and perspective disturb its pixels more than a copy's.
    """
    found = _matches(query, target, 0.75)
    if found is None or found[0].shape[0] < min(search.verify_inliers, search.partial_inliers if partial else 1 << 30):
        return False  # fewer matches than the inliers asked for
    pair = _Blurred(query, target)
    for similarity in (False,) if partial else (True, False):
        h, inliers = _fit(*found, similarity=similarity)
        # The agreement each inlier count allows (the lower when both apply); none: no need to
        # compare pixels at all, which is most rejected transforms on the bench.
        needs = [search.verify_agreement] if inliers >= search.verify_inliers else []
        if partial and inliers >= search.partial_inliers:
            needs.append(_PARTIAL_AGREEMENT)
        if h is not None and needs and _agreement_both_ways(pair, h, enough=min(needs)) >= min(needs):
            return True
        if similarity and inliers < _HOMOGRAPHY_AFTER:
            return False  # a warped print still has a part the simpler model explains
    return False


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError(
            "the second look (partial copies, geometric verification) needs OpenCV, which is not installed; "
            "install it with: pip install opencv-python-headless"
        ) from None
    if cv2.getNumThreads() != 1:
        # Pairs are checked on a thread per core already; OpenCV's own threads inside each
        # small call only add contention (measured: a fifth more CPU time, no less wall time).
        cv2.setNumThreads(1)
    return cv2


def _one_thread_each() -> None:
    """A pool thread's faiss searches stay on that thread: pairs are checked a thread per core
    already (OpenMP's thread count is per calling thread, so the rest of the run keeps its own)."""
    import faiss

    faiss.omp_set_num_threads(1)


def _best_per_pair(i: np.ndarray, j: np.ndarray, score: np.ndarray, partial: np.ndarray) -> Edges:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = best_per_pair(lo, hi, score)
    signal = np.where(partial[keep], int(Signal.PARTIAL), int(Signal.VERIFIED)).astype(np.int8)
    return Edges(lo[keep], hi[keep], score[keep].astype(np.float32), signal)


def load_regions(paths: Sequence[Path]) -> np.ndarray | None:
    """The region descriptors of a run's shards, in row order (float16), or None when any
    shard has none (regions off, or features made before they were)."""
    return _load_per_row(paths)


def load_trims(paths: Sequence[Path]) -> np.ndarray | None:
    """The trim boxes of a run's embedded rows (``FeatureStep.trims_path``), in row order, or
    None when any shard has none (features made before they were kept): the second look then
    measures the margins of the re-read images itself."""
    return _load_per_row(paths)


def _load_per_row(paths: Sequence[Path]) -> np.ndarray | None:
    """One side array per embedded row over a run's shards (memory-mapped parts, joined), or None
    when a shard lacks its file or the parts disagree in shape."""
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
        band_cands = _fresh(band_cands, labels)
        parts.append(_top_per_image(band_cands, search.verify_per_image))
    if search.partial and regions is not None and regions.shape[0] == embedded_rows.size:
        with progress("partial copies: propose", int(rows.size), "img") as bar:
            found = region_candidates(
                vecs, regions[use], propose=search.partial_propose, top_k=search.partial_top_k, rows=rows, progress=bar.update
            )
        parts.append(_best_proposals(found, vecs, rows, margin=search.partial_margin, per_image=search.partial_per_image))
    cands = Candidates.concat(parts)
    cands = _fresh(cands, labels)  # pairs the direct links already join need no second look
    if not len(cands):
        return Edges.empty(), stats
    with progress("second look: verify", int(np.unique(np.concatenate([cands.i, cands.j])).size), "img") as bar:
        boxes = None
        if trims is not None and trims.shape == (embedded_rows.size, 4):
            boxes = np.full((rows_of.num_rows, 4), np.nan, np.float32)
            boxes[embedded_rows] = trims
        return verify(rows_of, cands, cfg, shards=shards, progress=bar.update, joined=labels, trims=boxes)


def _fresh(cands: Candidates, labels: np.ndarray) -> Candidates:
    """The candidates whose two rows are not yet in one component."""
    return cands.take(labels[cands.i] != labels[cands.j])


def _rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """For sorted ``keys``, each element's position within its run of equal keys (0, 1, ...)."""
    if not keys.size:
        return np.zeros(0, np.int64)
    start = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1]
    return np.arange(keys.size) - np.repeat(start, np.diff(np.r_[start, keys.size]))


def _top_per_image(cands: Candidates, per_image: int) -> Candidates:
    """Each pair that is among the ``per_image`` best of either of its two images (all with
    ``per_image`` <= 0). A copy's own original is nearly always among its first few band
    neighbours; the rest of a look-alike crowd (a family of clip art) need not be looked at."""
    if per_image <= 0 or not len(cands):
        return cands
    order = np.argsort(-cands.score, kind="stable")
    ends = np.concatenate([cands.i[order], cands.j[order]])
    # rank of each pair among the pairs of each of its ends, best first
    by_end = np.lexsort((np.tile(np.arange(order.size), 2), ends))
    rank = np.empty(ends.size, np.int64)
    rank[by_end] = _rank_in_runs(ends[by_end])
    best = np.minimum(rank[: order.size], rank[order.size :]) < per_image
    return cands.take(np.sort(order[best]))


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
    kept = cands.take(cands.score - whole >= margin)
    kept = kept.take(np.lexsort((-kept.score, kept.i)))
    return kept.take(_rank_in_runs(kept.i) < per_image)
