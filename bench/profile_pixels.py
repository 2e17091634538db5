"""What the lazy pixel hash costs in the global stage: candidates, re-reads, CPU seconds.

Usage::

    python bench/profile_pixels.py --data /work/bdata/quality-v2/test [--work DIR] [--preset default] [--model none]

Featurizes ``DATA/images`` as ``dedup run`` does (checkpoints under ``--work``, reused when they
are there; the per-shard step leaves ``pixel_sha256`` null when PDQ is on), then times
:func:`dedup.pixels.resolve_within` over the rows: the rows whose ``(width, height, pdq)`` key an
image of other bytes shares, re-read and pixel-hashed in this process (threads). Prints the
counts and the CPU seconds (``time.process_time``, this process and its threads), per image of
the whole set: to set beside the ``SHA-256 of the pixels`` line of ``bench/profile_stage.py``,
what the per-shard step paid for every image before.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench" / "data" / "quality")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints (default: a temporary folder)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--model", default="none", help="embed.model (none: the hash path, the default here)")
    ap.add_argument("--rounds", type=int, default=2, help="passes; the fastest is kept")
    args = ap.parse_args(argv)

    from dedup import pipeline
    from dedup.config import load_config
    from dedup.pixels import resolve_within
    from dedup.sources import discover

    cfg = load_config(args.preset).with_overrides({"embed.model": args.model})
    images = args.data / "images"
    with tempfile.TemporaryDirectory(prefix="profile-pixels-") as tmp:
        work = (args.work or Path(tmp)) / cfg.stage_key()
        shards = discover([str(images)], folder_batch=cfg.folder_batch)
        rows, _, _ = pipeline.featurize(shards, work, cfg, lazy=True)
        n = rows.num_rows
        best, stats = float("inf"), {}
        for _ in range(max(1, args.rounds)):
            t0 = time.process_time()
            _, stats = resolve_within(rows, shards, max_pixels=cfg.fingerprint.max_pixels, workers=1)
            best = min(best, time.process_time() - t0)
    print(f"{images}: {n} rows, {stats['pixel_candidates']} re-read ({stats['pixel_candidates'] / max(n, 1):.1%}), "
          f"{stats['pixel_hashed']} pixel-hashed")
    print(f"resolve_within: {best:.2f} CPU s, {1000 * best / max(n, 1):.3f} CPU ms per image of the set (fastest of {args.rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
