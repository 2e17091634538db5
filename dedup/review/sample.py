"""A stratified sample of a run's accepted links, for measuring precision (``--sample N``).

Strata are (signal, similarity band): bands are ``BAND_WIDTH`` wide (the top one closed at
1.0). ``N`` is shared evenly among the strata, a stratum that holds fewer links giving its
spare share to the others, and each stratum's links are drawn with a generator seeded by the
seed and the stratum's name: the same run and N give the same sample.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup._io import atomic_path
from dedup.decisions import SAMPLE_FILE, SAMPLE_SCHEMA, pair_key
from dedup.errors import ConfigError
from dedup.review.queue import RunView

BAND_WIDTH = 0.05
_NOT_SAMPLED = frozenset({"reviewed"})  # the curator's own links measure nothing


def band_of(similarity: float) -> tuple[float, float]:
    """The band ``[lo, hi)`` that holds ``similarity`` (the top band holds 1.0)."""
    top = 1.0 - BAND_WIDTH
    lo = min(math.floor(round(similarity / BAND_WIDTH, 6)) * BAND_WIDTH, top)
    return round(lo, 4), round(lo + BAND_WIDTH, 4)


def allocate(sizes: list[int], n: int) -> list[int]:
    """``n`` shared evenly among strata of ``sizes`` (none given more than it holds)."""
    take = [0] * len(sizes)
    left = n
    while left > 0:
        open_ = [k for k, s in enumerate(sizes) if take[k] < s]
        if not open_:
            break
        share = max(1, left // len(open_))
        for k in open_:
            if left == 0:
                break
            give = min(share, sizes[k] - take[k], left)
            take[k] += give
            left -= give
    return take


def draw_sample(out: Path, n: int, *, seed: int = 0, view: RunView | None = None) -> pa.Table:
    """Draw ``n`` accepted links of the run in ``out`` and write ``OUT/review-sample.parquet``
    (replacing an earlier sample; decisions already made on its pairs still count)."""
    if n < 1:
        raise ConfigError(f"--sample must be at least 1, not {n}")
    view = view or RunView.open(out)
    links = view.links()
    ids = view.manifest.column("sample_id").to_pylist()
    strata: dict[tuple[str, float], list[tuple[tuple[str, str], int, int, float]]] = {}
    for row, keeper, signal, sim in zip(
        links.column("row").to_pylist(), links.column("keeper").to_pylist(),
        links.column("signal").to_pylist(), links.column("similarity").to_pylist(), strict=True,
    ):  # fmt: skip
        if signal is None or sim is None or signal in _NOT_SAMPLED:
            continue
        strata.setdefault((signal, band_of(float(sim))[0]), []).append((pair_key(ids[keeper], ids[row]), keeper, row, float(sim)))
    names = sorted(strata)
    counts = allocate([len(strata[k]) for k in names], n)
    records = []
    for name, count in zip(names, counts, strict=True):
        pool = sorted(strata[name])
        rng = np.random.default_rng([seed, zlib.crc32(f"{name[0]}|{name[1]:.4f}".encode())])
        for k in sorted(rng.permutation(len(pool))[:count].tolist()):
            (a_id, b_id), keeper, row, sim = pool[k]
            a, b = (keeper, row) if ids[keeper] == a_id else (row, keeper)
            lo, hi = band_of(sim)
            records.append({
                "a_id": a_id, "b_id": b_id, "a_sha256": view.sha256[a], "b_sha256": view.sha256[b],
                "signal": name[0], "similarity": sim, "band": f"{lo:.2f}-{hi:.2f}", "band_lo": lo, "band_hi": hi,
            })  # fmt: skip
    table = pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA)
    with atomic_path(out / SAMPLE_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table
