"""The geometry kernel of the second look: does one image align onto the other?

ORB features of each image (:func:`local_features`), matched with Lowe's ratio test, a
rotation + scale + shift or a homography fitted by RANSAC, then the aligned pixels compared
(:func:`aligned_agreement`). :func:`confirms` is the verdict for one pair. Pure functions of two
images' :class:`LocalFeatures`: no I/O, no knowledge of rows, shards or runs, so the
orchestration (:mod:`dedup.second_look.look`) may run them anywhere.

Global pairs (a crop, pad, caption, rotation, recolouring) must fit ``search.verify_inliers``
ORB matches to one transform and agree on ``search.verify_agreement`` of the aligned overlap;
partial pairs (a picture pasted into a scene) must land under one homography. Drawings of one
family (puzzle pieces, road signs) share keypoints but not their pixels, and flat images find
no keypoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
from PIL import Image

from dedup.config import SearchConfig
from dedup.errors import MissingDependencyError

__all__ = ["LocalFeatures", "aligned_agreement", "confirms", "geometric_inliers", "geometric_match", "local_features", "matched_region"]


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


LOCAL_SIDE = 512  # images are fitted to this (longest side) before detecting keypoints
_FAST_THRESHOLD = 10  # ORB's corner contrast (OpenCV's default 20 finds too few in clip art)
_MIN_MATCHES = 8
_GREY_SIDE = 320  # aligned pixels are compared at this size (blurred: small shifts do not count)
_AGREE = 0.1  # two aligned pixels agree within this share of the grey range
_OPENING = np.ones((3, 3), np.uint8)  # see aligned_agreement()
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
    fit = LOCAL_SIDE / max(grey.size)  # small drawings are enlarged: ORB finds few corners in them
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


def matched_region(query: LocalFeatures, target: LocalFeatures, query_size: tuple[int, int], *, ratio: float = 0.75) -> tuple[np.ndarray, int] | None:
    """Where ``query`` (an image of ``query_size``, width x height, as given to
    :func:`local_features`) lies in ``target``: its four corners mapped by the homography
    (``(4, 2)``, in the keypoint pixels of ``target``: its longest side 512), and the inliers;
    None without a fit. For showing a partial copy's region (``dedup review``), not deciding."""
    found = _matches(query, target, ratio)
    if found is None:
        return None
    h, inliers = _fit(*found, similarity=False)
    if h is None:
        return None
    fit = LOCAL_SIDE / max(query_size)
    w, hgt = query_size[0] * fit, query_size[1] * fit
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, hgt, 1], [0, hgt, 1]], np.float64) @ h.T
    if np.any(np.abs(corners[:, 2]) < 1e-9):
        return None
    return corners[:, :2] / corners[:, 2:], inliers


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


def _agreement_both_ways(pair: _Blurred, homography: np.ndarray, *, enough: float = 2.0, opening: int = 3) -> float:
    """The better of ``query`` warped onto ``target`` and ``target`` warped back onto ``query``:
    either image may be the crop of the other, so the smaller overlap is judged both ways. The
    way back is not computed once the first reaches ``enough`` (the answer is then known)."""
    agreement = _agreement(pair, pair.query, pair.target, homography, opening=opening)
    if agreement >= enough:
        return agreement
    try:
        back = np.linalg.inv(homography)
    except np.linalg.LinAlgError:
        return agreement
    return max(agreement, _agreement(pair, pair.target, pair.query, back, opening=opening))


def _agrees_both_ways(pair: _Blurred, homography: np.ndarray, agreement: float, edges: float) -> bool:
    """Whether the pair agrees on ``agreement`` of the overlap and on ``edges`` of its pixels
    near an edge (:func:`_agreement` with ``edges``), each the better of the two ways (as
    :func:`_agreement_both_ways`); the way back only when the first falls short.

    A way's agreement near edges (two Sobel maps, a dilation) is computed only when the verdict
    needs it: not when neither way agrees on ``agreement`` of the overlap, which is most pairs
    that get this far (the verdict is the rule's, over the same numbers)."""
    if edges <= 0:
        return _agreement_both_ways(pair, homography, enough=agreement) >= agreement
    best = _align(pair, pair.query, pair.target, homography)
    if best.agreement >= agreement and best.edges() >= edges:
        return True
    try:
        back = np.linalg.inv(homography)
    except np.linalg.LinAlgError:
        return False
    other = _align(pair, pair.target, pair.query, back)
    if not max(best.agreement, other.agreement) >= agreement:
        return False
    return max(best.edges(), other.edges()) >= edges


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


@overload
def _agreement(pair: _Blurred, query: LocalFeatures, target: LocalFeatures, homography: np.ndarray, *, opening: int = 3) -> float: ...
@overload
def _agreement(
    pair: _Blurred, query: LocalFeatures, target: LocalFeatures, homography: np.ndarray, *, opening: int = 3, edges: Literal[True]
) -> tuple[float, float]: ...
def _agreement(
    pair: _Blurred, query: LocalFeatures, target: LocalFeatures, homography: np.ndarray, *, opening: int = 3, edges: bool = False
) -> float | tuple[float, float]:
    """:func:`aligned_agreement`, with the pair's blurred copies made once (``pair``); with
    ``edges``, also the agreement over the overlap's pixels within 2 px of an edge of either
    image (Sobel magnitude over 8 % of the grey range): flat areas agree whatever the pictures,
    so two icons of one family on one backdrop, or two mock-ups of one template, agree on most
    of their pixels and on few of their edges. (The overlap's own border counts as an edge of
    the warped image; measured so, bench/quality_checks.py.)

    Computed over whole arrays (the part outside the overlap zeroed) rather than on the
    overlap's pixels picked out one by one, without BLAS (whose threads spin against the check
    pool's), and an affine transform (the rotation + scale + shift fit, and its inverse) warped
    as one, at half a perspective warp's cost. Replaying the bench's 7,702 checks on one
    thread: 29.1 -> 25.7 s, the same 729 confirmed.
    """
    aligned = _align(pair, query, target, homography, opening=opening)
    return (aligned.agreement, aligned.edges()) if edges else aligned.agreement


class _Aligned:
    """One way of one alignment: the share of the overlap that agrees, and (:meth:`edges`, on
    demand) the share of its pixels near an edge that agree; both 0 where nothing compares."""

    __slots__ = ("agreement", "_x", "_y", "_overlap", "_opened", "_edges")

    def __init__(self, agreement: float = 0.0, arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        self.agreement = agreement
        self._x, self._y, self._overlap, self._opened = arrays if arrays is not None else (None, None, None, None)
        self._edges: float | None = None if arrays is not None else 0.0

    def edges(self) -> float:
        if self._edges is None:
            cv2 = _cv2()
            assert self._x is not None and self._y is not None and self._overlap is not None and self._opened is not None
            overlap = self._overlap
            near = np.logical_or(_edges(self._x), _edges(self._y))
            np.logical_and(near, overlap, out=near)
            near = cv2.dilate(near.view(np.uint8), _NEAR).view(bool)
            np.logical_and(near, overlap, out=near)
            m = int(np.count_nonzero(near))
            self._edges = 1.0 - int(np.count_nonzero(np.logical_and(self._opened, near))) / m if m else 0.0
            self._x = self._y = self._overlap = self._opened = None
        return self._edges


_NOTHING = _Aligned()


def _align(pair: _Blurred, query: LocalFeatures, target: LocalFeatures, homography: np.ndarray, *, opening: int = 3) -> _Aligned:
    """:func:`_agreement`'s work: ``query`` warped onto ``target``, their agreement, and what
    the agreement near edges needs, kept for :meth:`_Aligned.edges`."""
    cv2 = _cv2()
    q, t = query.grey, target.grey
    if q.size == 0 or t.size == 0:
        return _NOTHING
    to_small = np.diag([target.scale, target.scale, 1.0]) @ homography @ np.diag([1 / query.scale, 1 / query.scale, 1.0])
    qb, tb = pair.of(query), pair.of(target)
    size = (t.shape[1], t.shape[0])
    border = {"flags": cv2.INTER_LINEAR, "borderMode": cv2.BORDER_CONSTANT, "borderValue": -1.0}
    # np.allclose(to_small[2], (0, 0, 1), rtol=0, atol=1e-12), as three float comparisons (a
    # tenth of allclose's time; NaN is close to nothing either way)
    a, b, c = (float(v) for v in to_small[2])
    if abs(a) <= 1e-12 and abs(b) <= 1e-12 and abs(c - 1.0) <= 1e-12:
        warped = cv2.warpAffine(qb, to_small[:2], size, **border)
    else:
        warped = cv2.warpPerspective(qb, to_small, size, **border)
    overlap = warped >= 0
    n = int(np.count_nonzero(overlap))
    if n < 64:
        return _NOTHING
    x = np.maximum(warped, 0.0)  # grey levels 0-255, and 0 outside the overlap
    y = tb * overlap
    sx, sy = float(x.sum(dtype=np.float64)), float(y.sum(dtype=np.float64))
    var = float(np.einsum("ij,ij->", x, x, dtype=np.float64)) - sx * sx / n
    cov = float(np.einsum("ij,ij->", x, y, dtype=np.float64)) - sx * sy / n
    # Least squares y ~ gain * x + offset. A flat overlap (under a hundredth of a grey level
    # apart, on average) fits a constant as well as anything: no gain to speak of.
    if var <= n * 1e-4:
        return _NOTHING
    gain = cov / var
    if gain <= 0.2:  # flat or inverted
        return _NOTHING
    # Disagreement thinner than the opening's 3 px (at the comparison size) is forgiven: the
    # strokes of overlaid text and watermarks, edges shifted by a pixel. A different pictogram
    # or a missing puzzle knob is a blob, which stays.
    differs = np.abs(gain * (x - sx / n) - (y - sy / n)) >= _AGREE * 255
    np.logical_and(differs, overlap, out=differs)
    kernel = _OPENING if opening == 3 else np.ones((opening, opening), np.uint8)
    opened = cv2.morphologyEx(differs.view(np.uint8), cv2.MORPH_OPEN, kernel).view(bool)
    np.logical_and(opened, overlap, out=opened)
    return _Aligned(1.0 - int(np.count_nonzero(opened)) / n, (x, y, overlap, opened))


_EDGE = 0.08 * 255 * 4  # a 3x3 Sobel's magnitude of a step of 8 % of the grey range
_NEAR = np.ones((5, 5), np.uint8)
# The squared magnitude decides where it is clearly off the threshold: float32 squares and a sum
# stay within 2e-7 of the exact value, hypot within an ulp (1.2e-7), so beyond 2^-16 (1.5e-5)
# of _EDGE squared both sides agree; inside that band hypot itself decides.
_EDGE_SURE = float(np.float32(_EDGE)) ** 2 * (1 + 2.0**-16)
_EDGE_MAYBE = float(np.float32(_EDGE)) ** 2 * (1 - 2.0**-16)


def _edges(grey: np.ndarray) -> np.ndarray:
    """Where the Sobel magnitude ``hypot(gx, gy) >= _EDGE``: the same pixels as that test, at
    a seventh of its time (hypot costs 0.5 ms on a 320 px copy, the squares 0.07)."""
    cv2 = _cv2()
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    squared = gx * gx
    squared += gy * gy
    edge = squared >= _EDGE_SURE
    maybe = squared > _EDGE_MAYBE
    if np.count_nonzero(maybe) != np.count_nonzero(edge):  # some lie within rounding of the threshold
        unsure = np.flatnonzero(np.logical_and(maybe, ~edge))
        edge.flat[unsure] = np.hypot(gx.flat[unsure], gy.flat[unsure]) >= _EDGE
    return edge


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
        if h is not None and needs and _agrees_both_ways(pair, h, min(needs), 0.0 if partial else search.verify_edge_agreement):
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


def one_thread_each() -> None:
    """A pool thread's faiss searches stay on that thread: pairs are checked a thread per core
    already (OpenMP's thread count is per calling thread, so the rest of the run keeps its own)."""
    import faiss

    faiss.omp_set_num_threads(1)
