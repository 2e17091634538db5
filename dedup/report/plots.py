"""The report's figures, drawn with matplotlib (Agg, no pyplot state) as SVG data URIs.

An SVG inside the page scales cleanly, needs no file beside the HTML and makes no request.
matplotlib is imported here only, when a report is rendered, so ``dedup --help`` stays fast.

The duplication counts are heavy-tailed (most images have no copy, a few have thousands), so
both figures use log-log axes. A sample's *duplicate count* is the number of other samples in
its cluster; the x axis shows ``duplicate count + 1`` (the copies of that image in the set,
itself included) so that the samples without a duplicate have a place on a log axis.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["duplication_figures"]

BLUE = "#2f6db5"
ORANGE = "#d9782d"
GREY = "#6b7280"
_RC = {
    "svg.hashsalt": "dedup",  # stable ids: the same report gives the same bytes
    "svg.fonttype": "path",  # glyphs as paths: renders the same without the font installed
    "font.size": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#9ca3af",
    "xtick.color": "#374151",
    "ytick.color": "#374151",
    "legend.frameon": False,
}
_MAX_BARS = 30  # above this many distinct counts, bars are logarithmic bins


def duplication_figures(report: dict[str, Any]) -> dict[str, str]:
    """``{"histogram": uri, "ccdf": uri}`` for ``report["duplicate_count_histogram"]``.

    Empty when the report has no such histogram (an older report, or no decoded sample).
    """
    pairs: Sequence[Sequence[int]] = report.get("duplicate_count_histogram") or []
    if not pairs:
        return {}
    counts = np.array([int(d) for d, _ in pairs], np.int64)
    samples = np.array([int(n) for _, n in pairs], np.float64)
    if samples.sum() <= 0:
        return {}
    dist = report.get("duplicate_count", {})
    mean_all = float(dist.get("all_samples", {}).get("mean", 0.0))
    mean_dup = float(dist.get("samples_with_duplicates", {}).get("mean", 0.0))

    import matplotlib

    with matplotlib.rc_context(_RC):
        return {
            "histogram": _svg(_histogram(counts + 1, samples)),
            "ccdf": _svg(_ccdf(counts + 1, samples, mean_all, mean_dup)),
        }


def _figure() -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(5.4, 3.5), layout="constrained")


def _count(v: float, _pos: object = None) -> str:
    """Tick labels as plain numbers (1, 20, 5k, 2M), not powers of ten."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale * 10 or (v >= scale and scale >= 1e6):
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _share(v: float, _pos: object = None) -> str:
    return f"{v * 100:.3g}%"


def _log_axis(axis: Any, lo: float, hi: float, fmt: Any) -> None:
    """Log ticks labelled as numbers; 1-2-5 steps when the range spans few decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    subs = (1.0, 2.0, 5.0) if hi / max(lo, 1e-12) <= 1e3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_formatter(NullFormatter())


def _log_axes(fig: Figure, xmax: float, title: str, ylabel: str) -> Any:
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, max(10.0, xmax * 1.6))
    _log_axis(ax.xaxis, 1.0, max(10.0, xmax * 1.6), _count)
    ax.set_title(title)
    ax.set_xlabel("copies in the set (duplicate count + 1)")
    ax.set_ylabel(ylabel)
    ax.set_axisbelow(True)
    return ax


def _histogram(x: np.ndarray, n: np.ndarray) -> Figure:
    """Samples per duplicate count: a bar per count, or per logarithmic bin when there are many."""
    fig = _figure()
    ax = _log_axes(fig, float(x.max()), "Samples by duplicate count", "samples")
    if x.size <= _MAX_BARS:
        left, right, height = x / 1.18, x * 1.18, n
    else:
        edges = np.unique(np.round(np.geomspace(1, x.max() + 1, _MAX_BARS + 1)))
        which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2)
        height = np.bincount(which, weights=n, minlength=edges.size - 1)
        used = height > 0
        left, right, height = edges[:-1][used], edges[1:][used], height[used]
        ax.set_ylabel("samples per bin")
    ax.bar(left, height, width=right - left, align="edge", color=BLUE, edgecolor="white", linewidth=0.5)
    top = max(10.0, float(height.max()) * 2.5)
    ax.set_ylim(0.7, top)
    _log_axis(ax.yaxis, 1.0, top, _count)
    if height.size <= 12:  # few bars: write the counts on them
        for centre, hi in zip(np.sqrt(left * right), height, strict=True):
            ax.annotate(f"{int(hi):,}", (centre, hi), textcoords="offset points", xytext=(0, 2),
                        ha="center", va="bottom", fontsize=8, color=GREY)
    return fig


def _ccdf(x: np.ndarray, n: np.ndarray, mean_all: float, mean_dup: float) -> Figure:
    """P(duplicate count >= d): how much of the set sits in the tail."""
    fig = _figure()
    ax = _log_axes(fig, float(x.max()), "Complementary CDF", "share of samples with at least that many")
    tail = np.cumsum(n[::-1])[::-1] / n.sum()
    ax.step(np.append(x, x[-1] * 1.5), np.append(tail, tail[-1]), where="post", color=BLUE, linewidth=1.8)
    if x.size <= 40:  # few counts: mark each one; many: the line says it
        ax.plot(x, tail, "o", color=BLUE, markersize=4)
    bottom = min(0.1, float(tail.min()) / 3)
    ax.set_ylim(bottom, 1.6)
    _log_axis(ax.yaxis, bottom, 1.0, _share)
    ax.axvline(mean_all + 1, color=GREY, linestyle="--", linewidth=1.1,
               label=f"mean duplicate count, all samples: {mean_all:.2f}")
    if mean_dup > 0:
        ax.axvline(mean_dup + 1, color=ORANGE, linestyle="--", linewidth=1.1,
                   label=f"mean, samples with duplicates: {mean_dup:.2f}")
    ax.legend(loc="lower left", fontsize=8)
    return fig


def _svg(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
