"""Measured precision on the quality bench: ``dedup review --sample N`` with the bench's ground
truth standing in for the curator.

Usage::

    python bench/quality_data.py --out bench/data/quality       # once (builds the labelled set)
    python bench/review_precision.py --data bench/data/quality --sample 200 [--preset default]

Runs ``dedup run`` over the bench's images (resumed when ``--out`` already holds the run),
draws the stratified sample of accepted links (per signal and similarity band, seeded), marks
each sampled pair *same* when the two files share a ``group`` in ``labels.parquet`` and
*different* otherwise (a curator that never errs), and prints the precision per band with its
Wilson 95% interval and the threshold each signal's bands support. The decisions land in
``OUT/decisions.parquet`` and report.json/html show the same table, as after a real review.
The numbers are a sample's: the interval says how far to trust each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from dedup.config import load_config
from dedup.decisions import DECISIONS_FILE, read_decisions, record_decisions
from dedup.pipeline import run
from dedup.review import draw_sample, refresh_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("bench/data/quality"))
    ap.add_argument("--out", type=Path, default=Path("bench/out/review-precision"))
    ap.add_argument("--preset", default="default")
    ap.add_argument("--sample", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    labels = pq.read_table(args.data / "labels.parquet", columns=["file", "group"]).to_pylist()
    group = {r["file"]: r["group"] for r in labels}
    started = time.perf_counter()
    result = run([str(args.data / "images")], args.out, config=load_config(args.preset))
    ran = time.perf_counter() - started
    print(f"run ({args.preset}): {result.samples} samples, {result.clusters} clusters, {result.dropped} dropped, {ran:.0f} s", file=sys.stderr)

    sample = draw_sample(args.out, args.sample, seed=args.seed)
    (args.out / DECISIONS_FILE).unlink(missing_ok=True)  # the stand-in curator starts afresh
    decisions = []
    for s in sample.to_pylist():
        a, b = group.get(_file(s["a_id"])), group.get(_file(s["b_id"]))
        if a is None or b is None:
            continue
        decisions.append({**{k: s[k] for k in ("a_id", "b_id", "a_sha256", "b_sha256", "signal", "similarity")},
                          "decision": "same" if a == b else "different", "why": "bench ground truth"})  # fmt: skip
    record_decisions(args.out / DECISIONS_FILE, decisions)
    section = refresh_report(args.out)
    assert section is not None and read_decisions(args.out / DECISIONS_FILE).num_rows == len(decisions)
    table = section["precision"]
    print(f"precision per band: {len(decisions)} of {sample.num_rows} sampled links judged by the bench's labels "
          f"(preset {args.preset}, seed {args.seed}); target {table['target']:.0%}")  # fmt: skip
    print("| signal | band | sampled | same | different | precision | Wilson 95% |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for b in table["bands"]:
        p = "–" if b["precision"] is None else f"{b['precision']:.3f}"
        ci = "–" if b["ci_low"] is None else f"{b['ci_low']:.3f}–{b['ci_high']:.3f}"
        print(f"| {b['signal']} | {b['band']} | {b['sampled']} | {b['same']} | {b['different']} | {p} | {ci} |")
    print()
    print("| signal | supported threshold (estimate ≥ target) | proven threshold (lower bound ≥ target) |")
    print("| --- | ---: | ---: |")
    for sig, v in table["signals"].items():
        print(f"| {sig} | {v['supported_threshold']} | {v['confident_threshold']} |")
    print(json.dumps({"preset": args.preset, "sample": args.sample, "seed": args.seed, "precision": table}), file=sys.stderr)
    return 0


def _file(sample_id: str) -> str:
    return sample_id.rsplit("/", 1)[-1]


if __name__ == "__main__":
    raise SystemExit(main())
