"""The hash path's PDQ input, measured: the size and decode PDQ hashes from, its cost and its links.

Usage::

    python bench/profile_pdq.py [--data bench/data/quality] [--limit N]

For each way of making PDQ's input (the current one: the full RGB decode, its luma fitted within
``fingerprint.pdq_side`` px; and cheaper ones: a JPEG decoded by libjpeg's DCT scaling to the
smallest size at or above a side, luma only, then fitted), prints the CPU ms per image (decode +
input + the 8 orientations, one thread) and what the hash path (``dedup run --model none``: exact
bytes, PDQ <= 31 bits in any orientation) would link on the labelled bench: pairwise precision,
recall and F1 of the union of those links (bench/quality.py's ``score``). Exact pixel links are
left out on both sides (they need the full decode; PDQ links every pixel-identical pair at
distance 0 anyway), so the rows compare like with like.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]


def _luma_draft(data: bytes, side: int, max_pixels: int) -> np.ndarray:
    """A JPEG's luma decoded at the smallest DCT scale whose sides stay >= ``side``, then fitted
    within ``side`` as the current path fits; other formats through the current decode."""
    from dedup import fingerprint as fp

    img = fp.decode(data, max_pixels=max_pixels, draft=side, grey=True)
    return fp._pdq_input(img, side)


def variants(max_pixels: int) -> dict[str, Callable[[bytes], np.ndarray]]:
    from dedup import fingerprint as fp

    return {
        "now: RGB decode, luma within 384": lambda b: fp._pdq_input(fp.decode(b, max_pixels=max_pixels), 384),
        "RGB decode, luma within 128": lambda b: fp._pdq_input(fp.decode(b, max_pixels=max_pixels), 128),
        "RGB decode, luma within 64": lambda b: fp._pdq_input(fp.decode(b, max_pixels=max_pixels), 64),
        "luma draft >= 384, within 384": lambda b: _luma_draft(b, 384, max_pixels),
        "luma draft >= 256, within 256": lambda b: _luma_draft(b, 256, max_pixels),
        "luma draft >= 128, within 128": lambda b: _luma_draft(b, 128, max_pixels),
        "luma draft >= 64, within 64": lambda b: _luma_draft(b, 64, max_pixels),
    }


def links(files: Sequence[str], sha: Sequence[bytes], pdq: np.ndarray, var: np.ndarray) -> dict[str, int]:
    """``file -> cluster``: exact bytes and PDQ <= 31 bits in any orientation, united."""
    import faiss
    import quality

    index = faiss.IndexBinaryFlat(256)
    index.add(pdq)
    pairs: list[tuple[str, str]] = []
    for k in range(8):
        query = pdq if k == 0 else np.ascontiguousarray(var[:, k - 1])
        lims, _, found = index.range_search(query, 32)
        for i in range(len(files)):
            pairs += [(files[i], files[int(j)]) for j in found[lims[i] : lims[i + 1]] if int(j) != i]
    by_sha: dict[bytes, list[str]] = {}
    for f, h in zip(files, sha, strict=True):
        by_sha.setdefault(h, []).append(f)
    return quality._union(list(files), [*pairs, *by_sha.values()])


def main(argv: Sequence[str] | None = None) -> int:
    import pyarrow.parquet as pq
    import quality

    from dedup import fingerprint as fp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "bench" / "data" / "quality")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--only", default=None, help="the variants whose name contains this")
    args = ap.parse_args(argv)
    labels = pq.read_table(args.data / "labels.parquet")
    files = sorted(str(f) for f in labels.column("file").to_pylist())[: args.limit]
    blobs = [(args.data / "images" / f).read_bytes() for f in files]
    sha = [hashlib.sha256(b).digest() for b in blobs]
    max_pixels = 178_956_970
    print(f"{len(files)} images; CPU ms per image, one thread; links: exact bytes + PDQ <= 31 in 8 orientations\n")
    print("| PDQ input | decode + input ms | PDQ ms | P | R | F1 | hashes equal to now |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base: np.ndarray | None = None
    for name, make in variants(max_pixels).items():
        if args.only and args.only not in name and not name.startswith("now"):
            continue
        t0 = time.process_time()
        lumas = [make(b) for b in blobs]
        t1 = time.process_time()
        hashes = [fp._pdq_hashes(x, dihedral=True)[0] for x in lumas]
        t2 = time.process_time()
        codes = np.frombuffer(b"".join(hashes), np.uint8).reshape(-1, 8, 32)
        pdq, var = np.ascontiguousarray(codes[:, 0]), codes[:, 1:]
        if base is None:
            base = pdq
        same = float((pdq == base).all(axis=1).mean())
        s = quality.score(labels, links(files, sha, pdq, var))
        n = len(files)
        print(f"| {name} | {1000 * (t1 - t0) / n:.2f} | {1000 * (t2 - t1) / n:.2f} | {s['precision']:.3f} | "
              f"{s['recall']:.3f} | {s['f1']:.3f} | {same:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
