"""Replay a run's second-look checks offline, one row of measures per candidate pair (issue 24).

The second look's verdict (:func:`dedup.second_look.geometry.confirms`) is a rule over a few
measures of a pair: ORB matches, the inliers of a rotation + scale + shift and of a homography,
and the aligned pixels' agreement. This script measures them all for every candidate pair a
run proposed (read back from the run's work folder), labels each pair from the split's groups,
and writes them to ``OUT/checks.parquet``: a rule can then be tried on the dev split in seconds
instead of a pipeline run::

    python bench/quality_checks.py measure --data bench/data/quality-v2/dev --run bench/out/miss-dev
    python bench/quality_checks.py rules --checks bench/out/miss-dev/checks.parquet \
        --data bench/data/quality-v2/dev --run bench/out/miss-dev   # with the clusters it gives

A pair is "true" when its two images are in one group (a copy and its original, or two copies).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


_MEASURES = (
    "agree",
    "agree5",
    "agree_fwd",
    "agree_back",
    "gain_fwd",
    "gain_back",
    "cover_q",
    "cover_t",
    "hull_q",
    "hull_t",
    "edge_fwd",
    "edge_back",
    "blob_fwd",
    "blob_back",
)


def _stats(pair: Any, query: Any, target: Any, homography: np.ndarray, opening: int = 3) -> dict[str, float]:
    """:func:`dedup.second_look.geometry._agreement` one way, with what it saw: the agreement,
    the gain, the overlap's share of the target, the agreement over the pixels near an edge of
    either image (flat areas agree trivially) and the largest disagreeing blob's share of the
    overlap."""
    import cv2

    q, t = query.grey, target.grey
    zero = {"agree": 0.0, "gain": 0.0, "cover": 0.0, "edge": 0.0, "blob": 1.0}
    if q.size == 0 or t.size == 0:
        return zero
    to_small = np.diag([target.scale, target.scale, 1.0]) @ homography @ np.diag([1 / query.scale, 1 / query.scale, 1.0])
    qb, tb = pair.of(query), pair.of(target)
    size = (t.shape[1], t.shape[0])
    border = {"flags": cv2.INTER_LINEAR, "borderMode": cv2.BORDER_CONSTANT, "borderValue": -1.0}
    warped = cv2.warpPerspective(qb, to_small, size, **border)
    overlap = warped >= 0
    n = int(np.count_nonzero(overlap))
    if n < 64:
        return zero
    x = np.maximum(warped, 0.0)
    y = tb * overlap
    sx, sy = float(x.sum(dtype=np.float64)), float(y.sum(dtype=np.float64))
    var = float(np.einsum("ij,ij->", x, x, dtype=np.float64)) - sx * sx / n
    cov = float(np.einsum("ij,ij->", x, y, dtype=np.float64)) - sx * sy / n
    if var <= n * 1e-4:
        return {**zero, "cover": n / t.size}
    gain = cov / var
    if gain <= 0.2:
        return {**zero, "gain": gain, "cover": n / t.size}
    differs = np.abs(gain * (x - sx / n) - (y - sy / n)) >= g_agree() * 255
    np.logical_and(differs, overlap, out=differs)
    opened = cv2.morphologyEx(differs.view(np.uint8), cv2.MORPH_OPEN, np.ones((opening, opening), np.uint8)).view(bool)
    opened &= overlap
    agree = 1.0 - int(np.count_nonzero(opened)) / n

    # edges of either image (Sobel magnitude over 8 % of the range), dilated by 2 px, in the overlap
    def edges(a: np.ndarray) -> np.ndarray:
        gx, gy = cv2.Sobel(a, cv2.CV_32F, 1, 0), cv2.Sobel(a, cv2.CV_32F, 0, 1)
        return np.hypot(gx, gy) >= 0.08 * 255 * 4

    e = (edges(x) | edges(y)) & overlap
    e = cv2.dilate(e.view(np.uint8), np.ones((5, 5), np.uint8)).view(bool) & overlap
    ne = int(np.count_nonzero(e))
    edge = 1.0 - int(np.count_nonzero(opened & e)) / ne if ne else 0.0
    count, lab, stats, _ = cv2.connectedComponentsWithStats(opened.view(np.uint8), connectivity=8)
    blob = float(stats[1:, cv2.CC_STAT_AREA].max()) / n if count > 1 else 0.0
    return {"agree": agree, "gain": gain, "cover": n / t.size, "edge": edge, "blob": blob}


def g_agree() -> float:
    from dedup.second_look import geometry as g

    return g._AGREE


def _hull(points: np.ndarray, side: tuple[int, int]) -> float:
    import cv2

    if points.shape[0] < 3:
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(points.astype(np.float32)))) / float(side[0] * side[1])


def pair_measures(pair: Any, h: np.ndarray, found: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Every measure of one fitted pair (query = ``pair.query`` onto ``pair.target`` by ``h``)."""
    from dedup.second_look import geometry as g

    q, t = pair.query, pair.target
    fwd = _stats(pair, q, t, h)
    try:
        back = _stats(pair, t, q, np.linalg.inv(h))
    except np.linalg.LinAlgError:
        back = {"agree": 0.0, "gain": 0.0, "cover": 0.0, "edge": 0.0, "blob": 1.0}
    # inliers: the matches h maps within RANSAC's 6 px
    src, dst = found
    pr = np.c_[src, np.ones(len(src))] @ h.T
    with np.errstate(divide="ignore", invalid="ignore"):
        pr = pr[:, :2] / pr[:, 2:]
    inl = np.linalg.norm(pr - dst, axis=1) < 6.0
    side_q = (q.grey.shape[1] / q.scale, q.grey.shape[0] / q.scale)
    side_t = (t.grey.shape[1] / t.scale, t.grey.shape[0] / t.scale)
    return {
        "agree": max(fwd["agree"], back["agree"]),
        "agree5": g._agreement_both_ways(pair, h, opening=5),
        "agree_fwd": fwd["agree"],
        "agree_back": back["agree"],
        "gain_fwd": fwd["gain"],
        "gain_back": back["gain"],
        "cover_q": back["cover"],
        "cover_t": fwd["cover"],
        "hull_q": _hull(src[inl], side_q),
        "hull_t": _hull(dst[inl], side_t),
        "edge_fwd": fwd["edge"],
        "edge_back": back["edge"],
        "blob_fwd": fwd["blob"],
        "blob_back": back["blob"],
    }


def measure(data: Path, run_dir: Path, work: Path | None, out: Path, limit: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from quality_misses import load_run

    import json

    from dedup.config import RunConfig, from_dict
    from dedup.second_look import geometry as g
    from dedup.second_look.tasks import look

    r = load_run(data, run_dir)
    root = work if work is not None else run_dir / ".work"
    files = sorted(root.glob("*/second_look/candidates/*.npy"))
    if not files:
        raise SystemExit(f"no candidates under {root}/*/second_look/candidates")
    c = np.concatenate([np.load(f) for f in files])
    if limit and c.size > limit:
        c = c[np.sort(np.random.default_rng(0).choice(c.size, limit, replace=False))]
    cfg_path = run_dir / "config.json"
    cfg = from_dict(RunConfig, json.loads(cfg_path.read_text())) if cfg_path.exists() else RunConfig()
    keys = r["man"]["key"]
    grp = {x["file"]: x["group"] for x in r["labels"]}
    edit = {x["file"]: x["edit"] for x in r["labels"]}
    rows = np.unique(np.concatenate([c["i"], c["j"]]))
    images = data / "images"

    def feats(row: int) -> tuple[int, Any]:
        return row, look((images / keys[row]).read_bytes(), None, cfg)

    g.one_thread_each()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, initializer=g.one_thread_each) as pool:
        local = dict(pool.map(feats, rows.tolist()))
    print(f"{rows.size} images' features", flush=True)

    def one(k: int) -> dict[str, Any]:
        i, j, w = int(c["i"][k]), int(c["j"][k]), int(c["window"][k])
        q, t = local[j], local[i]
        rec: dict[str, Any] = {
            "i": i,
            "j": j,
            "score": float(c["score"][k]),
            "partial": w >= 0,
            "matches": 0,
            "kp_q": int(q.points.shape[0]) if q else 0,
            "kp_t": int(t.points.shape[0]) if t else 0,
        }
        for tag in ("sim", "h"):
            rec[f"inl_{tag}"] = 0
            for m in _MEASURES:
                rec[f"{m}_{tag}"] = 0.0
        if not q or not t:
            return rec
        found = g._matches(q, t, 0.75)
        if found is None:
            return rec
        rec["matches"] = int(found[0].shape[0])
        pair = g._Blurred(q, t)
        for sim, tag in ((True, "sim"), (False, "h")):
            h, inl = g._fit(*found, similarity=sim)
            rec[f"inl_{tag}"] = inl
            if h is not None and inl >= 8:
                rec.update({f"{m}_{tag}": v for m, v in pair_measures(pair, h, found).items()})
        return rec

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, initializer=g.one_thread_each) as pool:
        recs = list(pool.map(one, range(c.size)))
    t = pa.Table.from_pylist(recs)
    fi, fj = [keys[x] for x in t.column("i").to_pylist()], [keys[x] for x in t.column("j").to_pylist()]
    t = t.append_column("true", pa.array([grp.get(a, -1) == grp.get(b, -2) for a, b in zip(fi, fj)]))
    t = t.append_column("edit_i", pa.array([edit.get(a, "") for a in fi])).append_column("edit_j", pa.array([edit.get(b, "") for b in fj]))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, out)
    print(f"{t.num_rows} pairs -> {out}")
    return 0


def current_rule(
    a: dict[str, np.ndarray],
    agreement: float = 0.94,
    inliers: int = 12,
    partial_inliers: int = 40,
    partial_agreement: float = 0.5,
    edges: float = 0.85,
) -> np.ndarray:
    """The default verdict (:func:`dedup.second_look.geometry.confirms`) over replayed measures;
    ``edges``: ``search.verify_edge_agreement`` (band pairs only)."""
    part = a["partial"].astype(bool)

    def near(t: str) -> np.ndarray:
        return np.maximum(a[f"edge_fwd_{t}"], a[f"edge_back_{t}"]) >= edges

    glob = ~part & (
        ((a["inl_sim"] >= inliers) & (a["agree_sim"] >= agreement) & near("sim"))
        | ((a["inl_sim"] >= 8) & (a["inl_h"] >= inliers) & (a["agree_h"] >= agreement) & near("h"))
    )
    prt = part & (
        ((a["inl_h"] >= inliers) & (a["agree_h"] >= agreement)) | ((a["inl_h"] >= partial_inliers) & (a["agree_h"] >= partial_agreement))
    )
    return glob | prt


def load_checks(checks: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    return {k: np.asarray(v) for k, v in pq.read_table(checks).to_pydict().items()}


def simulate(data: Path, run_dir: Path, a: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, Any]:
    """The run's clusters had its second look confirmed exactly the pairs ``ok`` (over the replayed
    checks ``a``): its direct links (exact, embedding, PDQ) and those pairs, as components, scored.
    The pipeline skips pairs an earlier confirmation joined, which cannot change a component."""
    import pyarrow.parquet as pq
    from quality import load_labels, score

    from dedup.cluster import components
    from dedup.search import Edges

    z = np.load(run_dir / "_links.npz")
    n = int(z["n"])
    direct = ~np.isin(z["signal"], (7, 8))
    i = np.concatenate([z["i"][direct], a["i"][ok]]).astype(np.int64)
    j = np.concatenate([z["j"][direct], a["j"][ok]]).astype(np.int64)
    edges = Edges(
        i, j, np.ones(i.size, np.float32), np.concatenate([z["signal"][direct], np.where(a["partial"][ok], 8, 7)]).astype(z["signal"].dtype)
    )
    man = pq.read_table(run_dir / "manifest.parquet", columns=["key", "status"]).to_pydict()
    labels = components(n, edges)
    asg = {str(k): int(c) for k, c, s in zip(man["key"], labels, man["status"], strict=True) if s == "ok"}
    return score(load_labels(data), asg)


def line(name: str, a: dict[str, np.ndarray], ok: np.ndarray, s: dict[str, Any] | None = None) -> None:
    truth, part = a["true"].astype(bool), a["partial"].astype(bool)
    bits = []
    for sel, tag in ((~part, "band"), (part, "partial")):
        bits.append(f"{tag} {int((ok & sel & truth).sum())}/{int((sel & truth).sum())} true, {int((ok & sel & ~truth).sum())} false")
    if s is not None:
        bits.append(
            f"P {s['precision']:.4f} R {s['recall']:.4f} F1 {s['f1']:.4f} partial {s['partial_recall']:.3f} "
            f"hard-neg {s['hard_negatives']['merged']}"
        )
    print(f"{name:44s} " + "; ".join(bits), flush=True)


def rules(checks: Path, data: Path | None, run_dir: Path | None) -> int:
    a = load_checks(checks)

    def show(name: str, ok: np.ndarray) -> None:
        line(name, a, ok, simulate(data, run_dir, a, ok) if data is not None and run_dir is not None else None)

    show("default (0.94, edges 0.85)", current_rule(a))
    show("without the edge agreement", current_rule(a, edges=0.0))
    for e in (0.8, 0.9):
        show(f"edge agreement {e}", current_rule(a, edges=e))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--data", type=Path, required=True)
    m.add_argument("--run", type=Path, required=True)
    m.add_argument("--work", type=Path, default=None)
    m.add_argument("--out", type=Path, default=None, help="default RUN/checks.parquet")
    m.add_argument("--limit", type=int, default=0, help="a random sample of this many pairs (0: all)")
    r = sub.add_parser("rules")
    r.add_argument("--checks", type=Path, required=True)
    r.add_argument("--data", type=Path, default=None, help="with --run: score the clusters each rule gives")
    r.add_argument("--run", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        return measure(a.data, a.run, a.work, a.out or a.run / "checks.parquet", a.limit)
    return rules(a.checks, a.data, a.run)


if __name__ == "__main__":
    raise SystemExit(main())
