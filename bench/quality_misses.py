"""Where a dedup run on a labelled split loses recall and precision, by edit class (issue 24).

A run that saved its links (``bench/cluster_eval.py dump``, as ``bench/quality_v2.py report``
runs dedup), with its work folder kept (``--work``: the second look's candidates are read back
from it)::

    python bench/quality_misses.py run --data bench/data/quality-v2/dev --out bench/out/miss-dev \\
        [--config FILE] [--work DIR]
    python bench/quality_misses.py show --data bench/data/quality-v2/dev --run bench/out/miss-dev

``show`` prints, for every copy not clustered with its original (a false negative), its edit,
the whole-image cosine of the two and what the second look did with the pair (proposed in the
band, proposed as a partial copy, or never proposed), counted by edit and by score bin; and for
the false merges, the links that join two different groups, by link type and by collection.
Nothing here is tuned: it says which lever could move which number.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SIGNALS = {0: "exact-bytes", 1: "exact-pixels", 2: "embedding", 3: "pdq", 4: "phash", 7: "verified", 8: "partial"}
BINS = (0.0, 0.35, 0.45, 0.55, 0.7, 0.8, 0.9, 1.01)


def run(data: Path, out: Path, work: Path, config: Path | None, extra: Sequence[str]) -> int:
    """dedup on ``data/images`` through cluster_eval's link-saving wrapper; features cached in ``work``."""
    cmd = [sys.executable, str(HERE / "cluster_eval.py"), "dump", "run", str(data / "images"), "--out", str(out),
           "--work", str(work), "--quiet"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(extra)
    from e2e import run_measured

    print("$", " ".join(cmd), flush=True)
    stats = run_measured(cmd, out.parent / f"{out.name}.log")
    measured = {"rc": stats.returncode, "wall_s": round(stats.wall_seconds, 1), "cpu_s": round(stats.cpu_seconds, 1),
                "tree_peak_mib": round(stats.tree_peak_rss_mib), "max_rss_mib": round(stats.max_rss_mib)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "_measured.json").write_text(json.dumps(measured, default=str) + "\n")
    print(f"dedup exit {stats.returncode}: {measured}", flush=True)
    return stats.returncode


def _bin(x: float) -> str:
    for lo, hi in zip(BINS, BINS[1:]):
        if lo <= x < hi:
            return f"{lo:.2f}-{min(hi, 1.0):.2f}"
    return "nan"


def load_run(data: Path, run_dir: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    from quality import load_labels, score

    from dedup.store import open_index

    labels = load_labels(data).to_pylist()
    man = pq.read_table(run_dir / "manifest.parquet", columns=["key", "status", "cluster_id"]).to_pydict()
    row_of = {str(k): r for r, k in enumerate(man["key"])}
    idx = open_index(run_dir, columns=[], vectors=True)
    z = np.load(run_dir / "_links.npz")
    asg = {str(k): int(c) for k, s, c in zip(man["key"], man["status"], man["cluster_id"], strict=True) if s == "ok" and c is not None}
    s = score(load_labels(data), asg)
    return {"labels": labels, "man": man, "row_of": row_of, "vectors": idx.vectors, "links": z, "score": s, "asg": asg}


def candidates_of(run_dir: Path, work: Path | None) -> dict[tuple[int, int], str]:
    """The second look's candidate pairs (lower row, higher row) -> "band" / "partial", from the
    run's work folder (its ``candidates/*.npy`` outlive the run)."""
    roots = [work] if work is not None else [run_dir / ".work"]
    out: dict[tuple[int, int], str] = {}
    for root in roots:
        for f in sorted(root.glob("*/second_look/candidates/*.npy")):
            c = np.load(f)
            for i, j, w in zip(c["i"].tolist(), c["j"].tolist(), c["window"].tolist(), strict=True):
                key = (min(i, j), max(i, j))
                kind = "partial" if w >= 0 else "band"
                if out.get(key) != "band":
                    out[key] = kind if key not in out else "band+partial"
    return out


def show(data: Path, run_dir: Path, work: Path | None, examples: int) -> int:
    r = load_run(data, run_dir)
    labels, row_of, vec, asg = r["labels"], r["row_of"], r["vectors"], r["asg"]
    s = r["score"]
    print(f"P {s['precision']:.4f}  R {s['recall']:.4f}  F1 {s['f1']:.4f}  partial {s['partial_recall']}  "
          f"hard-neg merged {s['hard_negatives']['merged']}/{s['hard_negatives']['total']}")
    cands = candidates_of(run_dir, work)
    orig = {x["group"]: x for x in labels if x["edit"] == "original"}
    # false negatives
    by_edit: dict[str, Counter[str]] = defaultdict(Counter)
    ex: dict[str, list[str]] = defaultdict(list)
    for x in labels:
        if x["edit"] == "original":
            continue
        o = orig[x["group"]]
        a, b = asg.get(x["file"]), asg.get(o["file"])
        if a is not None and a == b:
            by_edit[x["edit"]]["found"] += 1
            continue
        ra, rb = row_of.get(x["file"]), row_of.get(o["file"])
        if ra is None or rb is None:
            by_edit[x["edit"]]["failed"] += 1
            continue
        cos = float(vec[ra] @ vec[rb])
        how = cands.get((min(ra, rb), max(ra, rb)), "none")
        by_edit[x["edit"]][f"{how} {_bin(cos)}"] += 1
        by_edit[x["edit"]]["missed"] += 1
        if len(ex[x["edit"]]) < examples:
            ex[x["edit"]].append(f"{x['file']} <- {o['file']} cos {cos:.2f} {how} [{x['collection']}] {x['edit_detail'][:80]}")
    print("\n## Copies not joined to their original, by edit: found / missed; missed by (proposed as, cosine bin)\n")
    for e, c in sorted(by_edit.items(), key=lambda kv: -kv[1]["missed"]):
        rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("found", "missed"))
        print(f"- {e}: found {c['found']} missed {c['missed']}: {rest}")
        for line in ex[e]:
            print(f"    {line}")
    # false merges: links joining two groups
    z = r["links"]
    grp = np.full(len(r["man"]["key"]), -1, np.int64)
    coll = [""] * len(grp)
    edit = [""] * len(grp)
    for x in labels:
        k = row_of.get(x["file"])
        if k is not None:
            grp[k], coll[k], edit[k] = x["group"], x["collection"], x["edit"]
    i, j, sig, sc = z["i"], z["j"], z["signal"], z["score"]
    bad = (grp[i] != grp[j]) & (grp[i] >= 0) & (grp[j] >= 0)
    good = (grp[i] == grp[j]) & (grp[i] >= 0)
    print(f"\n## Links: {len(i)} in all, {int(bad.sum())} join two groups\n")
    print("| signal | true links | false links | false: score bins |")
    print("|---|---|---|---|")
    for code in sorted(set(sig.tolist())):
        m = sig == code
        bins = Counter(_bin(float(v)) for v in sc[m & bad])
        print(f"| {SIGNALS.get(int(code), code)} | {int((m & good).sum())} | {int((m & bad).sum())} | "
              + ", ".join(f"{k}: {v}" for k, v in sorted(bins.items())) + " |")
    pairs = Counter(f"{SIGNALS.get(int(g), g)} {'/'.join(sorted((coll[a], coll[b])))}" for a, b, g in zip(i[bad], j[bad], sig[bad]))
    print("\nfalse links by signal and collections: " + ", ".join(f"{k} {v}" for k, v in pairs.most_common(20)))
    kinds = Counter(f"{SIGNALS.get(int(g), g)} {'/'.join(sorted((edit[a], edit[b])))}" for a, b, g in zip(i[bad], j[bad], sig[bad]))
    print("\nfalse links by signal and edits: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common(20)))
    lines = []
    keys = r["man"]["key"]
    for a, b, g, v in list(zip(i[bad], j[bad], sig[bad], sc[bad]))[: examples * 4]:
        lines.append(f"    {SIGNALS.get(int(g), g)} {v:.2f}: {keys[a]} [{edit[a]} {coll[a]}] -- {keys[b]} [{edit[b]} {coll[b]}]")
    print("\n".join(lines))
    json.dump({"by_edit": {k: dict(v) for k, v in by_edit.items()}}, open(run_dir / "misses.json", "w"), indent=1)  # noqa: SIM115
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("run")
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--work", type=Path, default=None, help="scratch folder (default OUT/.work; keep one per split to reuse the features)")
    a.add_argument("--config", type=Path, default=None)
    b = sub.add_parser("show")
    b.add_argument("--data", type=Path, required=True)
    b.add_argument("--run", type=Path, required=True)
    b.add_argument("--work", type=Path, default=None)
    b.add_argument("--examples", type=int, default=4)
    args, extra = ap.parse_known_args(argv)
    if args.cmd == "run":
        return run(args.data, args.out, args.work or args.out / ".work", args.config, extra)
    return show(args.data, args.run, args.work, args.examples)


if __name__ == "__main__":
    raise SystemExit(main())
