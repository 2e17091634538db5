"""Replay a run's second-look checks offline, one row of measures per candidate pair (issue 24).

The second look's verdict (:func:`dedup.second_look.geometry.confirms`) is a rule over a few
measures of a pair: ORB matches, the inliers of a rotation + scale + shift and of a homography,
and the aligned pixels' agreement. This script measures them all for every candidate pair a
run proposed (read back from the run's work folder), labels each pair from the split's groups,
and writes them to ``OUT/checks.parquet``: a rule can then be tried on the dev split in seconds
instead of a pipeline run::

    python bench/quality_checks.py measure --data bench/data/quality-v2/dev --run bench/out/miss-dev
    python bench/quality_checks.py rules --checks bench/out/miss-dev/checks.parquet

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
        rec = {"i": i, "j": j, "score": float(c["score"][k]), "partial": w >= 0, "matches": 0,
               "inl_sim": 0, "agree_sim": 0.0, "agree_sim5": 0.0, "inl_h": 0, "agree_h": 0.0, "agree_h5": 0.0}
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
                rec[f"agree_{tag}"] = g._agreement_both_ways(pair, h)
                rec[f"agree_{tag}5"] = g._agreement_both_ways(pair, h, opening=5)
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


def rules(checks: Path) -> int:
    import pyarrow.parquet as pq

    d = pq.read_table(checks).to_pydict()
    n = len(d["i"])
    a = {k: np.asarray(v) for k, v in d.items()}
    truth = a["true"].astype(bool)
    part = a["partial"].astype(bool)

    def current(agree_key: str = "", agreement: float = 0.94, inliers: int = 12) -> np.ndarray:
        ok = np.zeros(n, bool)
        s_key, h_key = ("agree_sim" + agree_key), ("agree_h" + agree_key)
        glob = ~part & (((a["inl_sim"] >= inliers) & (a[s_key] >= agreement))
                        | ((a["inl_sim"] >= 8) & (a["inl_h"] >= inliers) & (a[h_key] >= agreement)))
        prt = part & (((a["inl_h"] >= inliers) & (a[h_key] >= agreement)) | ((a["inl_h"] >= 40) & (a[h_key] >= 0.5)))
        ok |= glob | prt
        return ok

    def line(name: str, ok: np.ndarray) -> None:
        for sel, tag in ((~part, "band"), (part, "partial")):
            tp, fp = int((ok & sel & truth).sum()), int((ok & sel & ~truth).sum())
            print(f"{name:40s} {tag:8s} true {tp:5d}/{int((sel & truth).sum()):5d}  false {fp:4d}/{int((sel & ~truth).sum()):5d}")

    line("current (3x3 opening, 0.94)", current())
    for agr in (0.9, 0.92, 0.94):
        line(f"5x5 opening, {agr}", current("5", agr))
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
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        return measure(a.data, a.run, a.work, a.out or a.run / "checks.parquet", a.limit)
    return rules(a.checks)


if __name__ == "__main__":
    raise SystemExit(main())
