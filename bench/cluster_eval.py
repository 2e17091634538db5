"""Cluster variants scored on a run's own links, without rerunning the model (issue 24).

1. A dedup run that also saves its links (``OUT/_links.npz``: i, j, score, signal, pixels in
   the manifest's row order), e.g. through ``bench/quality.py``::

       python bench/quality.py --data bench/data/quality-v2/dev --method dedup:default \\
           --dedup ".venv/bin/python bench/cluster_eval.py dump" --out bench/out/v2-dev

2. Every clustering variant over those links, scored against the labels::

       python bench/cluster_eval.py score --data bench/data/quality-v2/dev \\
           --run bench/out/v2-dev/dedup-default/dedup

Prints P / R / F1 / partial recall / hard-negative merges for plain components and for the
guard (``[cluster] guard = true``) at each ``--hops``, with template links merged or not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def pa_array(values: Sequence[str]):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.array(list(values), pa.string())


def dump(argv: Sequence[str]) -> int:
    """Run the dedup CLI with ``argv``, saving the links the cluster step sees."""
    import dedup.pipeline as pipeline

    out = Path(argv[list(argv).index("--out") + 1])
    original = pipeline._cluster

    def saving(n, edges, pixels, cfg, shard_stats):  # type: ignore[no-untyped-def]
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "_links.npz", n=n, i=edges.i, j=edges.j, score=edges.score, signal=edges.signal, pixels=pixels)
        return original(n, edges, pixels, cfg, shard_stats)

    pipeline._cluster = saving
    from dedup.cli import main

    sys.argv = ["dedup", *argv]
    return main() or 0


def score_variants(data: Path, run: Path, hops: Sequence[int], skip: Sequence[str] = (), bridge: Sequence[int] = ()) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    from quality import load_labels, score

    from dedup.cluster import WEAK_SIGNALS, bridged_components, components, guarded_components
    from dedup.search import Edges, Signal

    z = np.load(run / "_links.npz")
    n = int(z["n"])
    edges = Edges(z["i"], z["j"], z["score"], z["signal"])
    man = pq.read_table(run / "manifest.parquet", columns=["key", "status"]).to_pydict()
    assert len(man["key"]) == n, "the manifest and the links disagree on the rows"
    ok = [s == "ok" for s in man["status"]]
    labels_table = load_labels(data)
    if skip:  # leave distractors of these kinds out of the scoring (distractors/order.json)
        import json

        import pyarrow.compute as pc

        kinds = json.loads((data.parent / "distractors" / "order.json").read_text())
        drop = [nm for nm, key in kinds if key.split("/")[0] in skip]
        labels_table = labels_table.filter(pc.invert(pc.is_in(labels_table.column("file"), value_set=pa_array(drop))))

    def assign(labels: np.ndarray) -> dict[str, int]:
        return {str(k): int(c) for k, c, o in zip(man["key"], labels, ok, strict=True) if o}

    out = [("components", score(labels_table, assign(components(n, edges))))]
    for side in bridge:
        for weak, tag in ((WEAK_SIGNALS, ""), ((*WEAK_SIGNALS, Signal.PDQ), " +pdq weak")):
            b = bridged_components(n, edges, max_side=side, weak=weak)
            s = score(labels_table, assign(b.labels))
            s["refused"] = int(b.refused.sum())
            out.append((f"bridge max_side={side}{tag}", s))
    for h in hops:
        for merge in (False, True):
            g = guarded_components(n, edges, pixels=z["pixels"], hops=h, merge_templates=merge)
            s = score(labels_table, assign(g.labels))
            s["template_links"] = int(g.template.sum())
            s["detached"] = g.detached
            out.append((f"guard hops={h}{' +templates' if merge else ''}", s))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dump"]:
        return dump(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["score"])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True, help="the dedup output folder holding _links.npz")
    ap.add_argument("--hops", default="0,1,2,3")
    ap.add_argument("--bridge", default="1,2,3", help="max_side values of the bridge rule to score ('' for none)")
    ap.add_argument("--skip-distractors", default="", help="comma-separated distractor kinds left out of the scores (e.g. crop)")
    a = ap.parse_args(argv)
    skip = [k for k in a.skip_distractors.split(",") if k]
    rows = score_variants(a.data, a.run, [int(x) for x in a.hops.split(",") if x], skip, [int(x) for x in a.bridge.split(",") if x])
    print("| clustering | P | R | F1 | partial | hard-neg merges | template links | detached / refused |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        pr = s.get("partial_recall")
        print(f"| {name} | {s['precision']:.4f} | {s['recall']:.4f} | {s['f1']:.4f} | {pr if pr is None else f'{pr:.3f}'} | "
              f"{s['hard_negatives']['merged']} | {s.get('template_links', '–')} | {s.get('detached', s.get('refused', '–'))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
