"""The second look's faster paths give the decisions of the plain ones (issue 25, fourth session).

The per-pair check (:func:`dedup.second_look.geometry.confirms`) computes some measures only
when the verdict needs them and some more cheaply than it did; these tests hold each shortcut
to the plain computation it replaces, on generated pairs and at thresholds on both sides of
the values they measure.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from test_regions import _picture

from dedup.second_look import geometry as g


def _plain_edges(grey: np.ndarray) -> np.ndarray:
    """The edge test as written before: the Sobel magnitude by hypot, at the threshold."""
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
    return np.asarray(np.hypot(gx, gy) >= g._EDGE)


@pytest.mark.parametrize("contrast", [0.3, 1.0, 3.0])
def test_edges_are_the_hypot_test(contrast: float) -> None:
    """Blurred noise whose Sobel magnitudes spread across the threshold."""
    rng = np.random.default_rng(int(contrast * 10))
    for _ in range(5):
        grey = cv2.GaussianBlur((rng.random((240, 320)) * 255 * contrast).astype(np.float32), (3, 3), 0)
        assert np.array_equal(g._edges(grey), _plain_edges(grey))


def test_edges_at_the_threshold_itself() -> None:
    """Steps whose Sobel magnitude lands on the threshold, an ulp either side and in between:
    the squared magnitude cannot tell these apart, hypot decides (the band is hit)."""
    target = np.float32(g._EDGE) / 4  # a vertical step of v gives a horizontal Sobel of 4 v
    steps = [np.nextafter(target, np.float32(0), dtype=np.float32), target, np.nextafter(target, np.float32(100), dtype=np.float32)]
    steps += [target * np.float32(1 + d) for d in (-3e-6, -1e-6, 1e-6, 3e-6)]
    for v in steps:
        grey = np.zeros((40, 40), np.float32)
        grey[:, 20:] = v
        grey[10:30, 5:15] = v * np.float32(0.75)  # oblique magnitudes near it too, at the corners
        assert np.array_equal(g._edges(grey), _plain_edges(grey)), v
    grey = np.zeros((40, 40), np.float32)
    grey[:, 20:] = target
    squared = cv2.Sobel(grey, cv2.CV_32F, 1, 0) ** 2
    assert ((squared > g._EDGE_MAYBE) & (squared < g._EDGE_SURE)).any()  # the hypot fallback ran


def _pairs() -> list[tuple[Image.Image, Image.Image]]:
    """Copies (crop, rotation, caption, recolouring, scale), family look-alikes (one frame,
    other pictures), icons on one white page, and unrelated pictures."""
    out: list[tuple[Image.Image, Image.Image]] = []
    for seed in (31, 32):
        p = _picture(seed)
        w, h = p.size
        captioned = ImageOps.expand(p, border=(0, 0, 0, h // 5), fill=(255, 255, 255))
        ImageDraw.Draw(captioned).text((10, h + 10), "CANVAS PRINT", fill=(0, 0, 0))
        out += [
            (p.crop((int(w * 0.15), int(h * 0.1), int(w * 0.9), int(h * 0.95))), p),
            (p.rotate(8, resample=Image.Resampling.BILINEAR, expand=True), p),
            (captioned, p),
            (Image.eval(p, lambda v: int(v * 0.7 + 40)), p),
            (p.resize((w * 2 // 3, h * 2 // 3)), p),
            (_picture(seed + 100), p),
        ]
        frame = _picture(seed + 40)
        a, b = frame.copy(), frame.copy()
        a.paste(_picture(seed + 50, (200, 150)), (60, 45))
        b.paste(_picture(seed + 51, (200, 150)), (60, 45))
        out.append((a, b))
    for other in (100, 101):
        icons = []
        for k in (other, other + 100):
            img = Image.new("RGB", (320, 240), (255, 255, 255))
            draw = ImageDraw.Draw(img)
            draw.rectangle((8, 8, 311, 231), outline=(0, 0, 0), width=2)
            cells = np.random.default_rng(k).integers(0, 2, (9, 12)).astype(np.uint8) * 255
            img.paste(Image.fromarray(cells).resize((78, 60), Image.Resampling.NEAREST).convert("RGB"), (121, 90))
            icons.append(img)
        out.append((icons[0], icons[1]))
    return out


def _eager(fwd: tuple[float, float], back: tuple[float, float], agreement: float, edges: float) -> bool:
    """The verdict as written before, from both ways' measures computed in full: the first way
    both measures, then the way back."""
    if fwd[0] >= agreement and fwd[1] >= edges:
        return True
    return max(fwd[0], back[0]) >= agreement and max(fwd[1], back[1]) >= edges


def test_lazy_edge_agreement_gives_the_eager_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agreement near edges is computed only when the verdict needs it; at thresholds below,
    at and above the measured values, the verdict is the one computing everything gives (with
    the edges by hypot)."""
    fitted = 0
    for a, b in _pairs():
        fa, fb = g.local_features(a), g.local_features(b)
        for query, target in ((fa, fb), (fb, fa)):
            found = g._matches(query, target, 0.75)
            if found is None:
                continue
            for similarity in (True, False):
                h, inliers = g._fit(*found, similarity=similarity)
                if h is None or inliers < 8:
                    continue
                fitted += 1
                pair = g._Blurred(query, target)
                with monkeypatch.context() as m:
                    m.setattr(g, "_edges", _plain_edges)
                    fwd = g._agreement(pair, query, target, h, edges=True)
                    back = g._agreement(pair, target, query, np.linalg.inv(h), edges=True)
                for agreement in sorted({0.5, 0.94, fwd[0], back[0]}):
                    for edge in sorted({0.85, fwd[1], back[1]} - {0.0}):
                        want = _eager(fwd, back, agreement, edge)
                        assert g._agrees_both_ways(pair, h, agreement, edge) == want, (agreement, edge, fwd, back)
    assert fitted >= 20  # copies and look-alikes alike reach the pixel check
