"""Where the second look's pairs come from, on a finished ``bench/scale_images.py`` run.

Reads a run's work folder (the checkpoints, and the second look's spilled candidates and
confirmed edges, ``OUT/.work/<stage>/second_look/``) and the quality labels, and prints: band
and partial pairs; each image's fan-out; how many pairs involve the rendered distractors; the
rank of each confirmed band pair among its ends' band pairs (how few per image would keep it);
and cheap stored signals (PDQ in 8 orientations, the embedding score, region-window scores)
on the refused and the confirmed pairs: what a cascade before the re-read could refuse.

    python bench/scale_proposals.py --out /work/bout/scale-images/local-20000 \\
        --src bench/data/scale_images/mixed-20000 --quality bench/data/quality
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from dedup.config import RunConfig
from dedup.featurize import FeatureStep
from dedup.pipeline import FEATURES, WORK_DIR, load_features
from dedup.rows import as_rows
from dedup.sources import discover

_POP = np.array([bin(b).count("1") for b in range(256)], np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distance between rows of packed codes."""
    return _POP[np.bitwise_xor(a, b)].sum(axis=1, dtype=np.int32)


def _concat(folder: Path) -> np.ndarray | None:
    parts = [np.load(p) for p in sorted(folder.glob("*.npy"))]
    return np.concatenate(parts) if parts else None


def ranks(i: np.ndarray, j: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Per pair, its rank (0 = best) among the pairs of its better-placed end."""
    n = i.size
    order = np.argsort(-score, kind="stable")
    ends = np.concatenate([i[order], j[order]])
    by_end = np.lexsort((np.tile(np.arange(n), 2), ends))
    rank = np.empty(2 * n, np.int64)
    sorted_ends = ends[by_end]
    start = np.r_[0, np.flatnonzero(sorted_ends[1:] != sorted_ends[:-1]) + 1]
    rank[by_end] = np.arange(2 * n) - np.repeat(start, np.diff(np.r_[start, 2 * n]))
    out = np.empty(n, np.int64)
    out[order] = np.minimum(rank[:n], rank[n:])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--quality", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None, help="write the per-pair table (parquet) here")
    args = ap.parse_args(argv)
    cfg = RunConfig()
    shards = discover([str(args.src)], folder_batch=cfg.folder_batch)
    work = args.out / WORK_DIR / cfg.stage_key()
    step = FeatureStep(config=cfg, out_dir=work / FEATURES)
    table, vectors = load_features(step, shards)
    rows = as_rows(table)
    keys = np.array(rows.column("key").to_pylist(), dtype=object)
    embedded = np.flatnonzero(rows.flags("embedded"))
    labels = pl.read_parquet(args.quality / "labels.parquet")
    group_of = dict(zip(labels["file"].to_list(), labels["group"].to_list(), strict=True))
    edit_of = dict(zip(labels["file"].to_list(), labels["edit"].to_list(), strict=True))
    group = np.array([group_of.get(str(k), -1) for k in keys], np.int64)
    planted = group >= 0
    sl = work / "second_look"
    cands = _concat(sl / "candidates")
    edges = _concat(sl / "edges")
    if cands is None:
        print("no candidates spilled", file=sys.stderr)
        return 1
    n = rows.num_rows
    print(f"rows {n:,} ({int(planted.sum()):,} planted), candidates {cands.size:,}")
    band = cands["window"] < 0
    lo, hi = np.minimum(cands["i"], cands["j"]), np.maximum(cands["i"], cands["j"])
    confirmed = np.zeros(cands.size, bool)
    if edges is not None and edges.size:
        key_e = edges["i"] * n + edges["j"]
        confirmed = np.isin(lo * n + hi, key_e)
    same = (group[cands["i"]] == group[cands["j"]]) & planted[cands["i"]]
    kinds = planted[cands["i"]].astype(int) + planted[cands["j"]].astype(int)
    out: dict[str, Any] = {}
    for name, sel in (("band", band), ("partial", ~band)):
        row = {
            "proposed": int(sel.sum()),
            "planted-planted": int((sel & (kinds == 2)).sum()),
            "planted-distractor": int((sel & (kinds == 1)).sum()),
            "distractor-distractor": int((sel & (kinds == 0)).sum()),
            "same group (true)": int((sel & same).sum()),
            "confirmed": int((sel & confirmed).sum()),
            "confirmed true": int((sel & confirmed & same).sum()),
            "confirmed with a distractor": int((sel & confirmed & (kinds < 2)).sum()),
        }
        out[name] = row
        print(f"\n## {name}\n" + "\n".join(f"  {k}: {v:,}" for k, v in row.items()))
    ends = np.concatenate([cands["i"], cands["j"]])
    fan = np.bincount(ends, minlength=n)
    for name, sel in (("planted", planted), ("distractor", ~planted)):
        f = fan[sel & (fan > 0)]
        if f.size:
            print(
                f"fan-out of {name} images with a pair: {f.size:,} images, mean {f.mean():.1f}, "
                f"p50 {np.percentile(f, 50):.0f}, p99 {np.percentile(f, 99):.0f}, max {f.max()}"
            )
    # the rank of each band pair among its ends' band pairs
    b = np.flatnonzero(band)
    r = ranks(cands["i"][b], cands["j"][b], cands["score"][b])
    for name, sel in (("confirmed", confirmed[b]), ("confirmed true", confirmed[b] & same[b]), ("refused", ~confirmed[b])):
        if sel.any():
            hist = np.bincount(r[sel], minlength=10)[:10]
            print(f"band {name}: min rank over ends, 0..9: {hist.tolist()}")
    # cheap stored signals
    pdq = np.frombuffer(b"".join(v or bytes(32) for v in rows.column("pdq").to_pylist()), np.uint8).reshape(n, 32)
    var = np.frombuffer(b"".join(v or bytes(224) for v in rows.column("pdq_variants").to_pylist()), np.uint8).reshape(n, 7, 32)
    ci, cj = cands["i"], cands["j"]
    d = hamming(pdq[ci], pdq[cj])
    for v in range(7):
        d = np.minimum(d, hamming(var[ci, v], pdq[cj]))
        d = np.minimum(d, hamming(var[cj, v], pdq[ci]))
    pos = np.searchsorted(embedded, np.concatenate([ci, cj]))
    vec = np.asarray(vectors, np.float32)
    whole = np.einsum("nd,nd->n", vec[pos[: ci.size]], vec[pos[ci.size :]])
    regs = [np.load(step.regions_path(s), mmap_mode="r") for s in shards]
    reg = np.concatenate([np.asarray(x, np.float32) for x in regs]) if regs else None
    cross = np.full(ci.size, np.nan, np.float32)
    wwin = np.full(ci.size, np.nan, np.float32)
    if reg is not None and reg.shape[0] == embedded.size:
        pi, pj = pos[: ci.size], pos[ci.size :]
        for s in range(0, ci.size, 4096):
            a, bb = pi[s : s + 4096], pj[s : s + 4096]
            ri, rj = reg[a], reg[bb]  # (m, w, d)
            c1 = np.einsum("mwd,md->mw", ri, vec[bb]).max(1)
            c2 = np.einsum("mwd,md->mw", rj, vec[a]).max(1)
            cross[s : s + 4096] = np.maximum(c1, c2)
            wwin[s : s + 4096] = np.einsum("mwd,mvd->mwv", ri, rj).reshape(a.size, -1).max(1)
    frame = pl.DataFrame(
        {
            "i": ci,
            "j": cj,
            "score": cands["score"],
            "window": cands["window"],
            "confirmed": confirmed,
            "same": same,
            "kinds": kinds,
            "pdq": d,
            "whole": whole,
            "cross": cross,
            "win_win": wwin,
            "edit": [edit_of.get(str(keys[x]), "distractor") if planted[x] else "distractor" for x in np.maximum(ci, cj).tolist()],
        }
    )
    for name, sel in (("band", band), ("partial", ~band)):
        for label, m in (("confirmed", confirmed), ("refused", ~confirmed)):
            f = frame.filter(pl.Series(sel & m))
            if f.height:
                q = {
                    c: [round(float(f[c].quantile(p)), 3) for p in (0.0, 0.01, 0.05, 0.5, 0.95, 1.0)]
                    for c in ("score", "pdq", "whole", "cross", "win_win")
                }
                print(f"{name} {label} ({f.height:,}): quantiles 0/1/5/50/95/100% " + json.dumps(q))
    if args.json:
        frame.write_parquet(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
