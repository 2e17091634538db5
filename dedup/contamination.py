"""Decontamination: training samples that copy an image of an evaluation set.

DataComp's practice, with this tool's signals: every training sample with a direct link (any
signal of the table in :mod:`dedup.signals`: exact bytes or pixels, the embedding, PDQ in its
eight orientations) to a sample of an evaluation set's index is dropped, whatever the keep
policy would do, with the reason ``contaminates:<eval>``. So are the members of its cluster:
they are copies of a copy (a sample the run judged a duplicate of a contaminating one).

The evaluation sets are indexes (``dedup run EVAL --out EVAL_OUT``), opened by the caller and
searched with the run's own thresholds; their vectors must come from the run's model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from dedup._types import Shard
from dedup.config import RunConfig
from dedup.errors import ConfigError
from dedup.pixels import resolve_against
from dedup.rows import FeatureRows, as_rows
from dedup.search import Signal
from dedup.signals import BASE_COLUMNS, cross_links

__all__ = ["EVAL_COLUMNS", "Contamination", "EvalSet", "find_contamination"]

# The index columns an evaluation set is opened with.
EVAL_COLUMNS = tuple(dict.fromkeys(("sample_id", *BASE_COLUMNS)))


@dataclass(frozen=True, slots=True)
class EvalSet:
    """An evaluation set: its name (in reasons and the report) and its opened index
    (:class:`dedup.store.Index`, with :data:`EVAL_COLUMNS` and its faiss files)."""

    name: str
    index: Any


@dataclass(frozen=True, slots=True)
class Contamination:
    """Per contaminated training row (sorted ``rows``): which evaluation set, which of its
    samples, and the link (signal, similarity); ``direct`` is False for the cluster mates of a
    directly contaminating row, which carry their cluster's best direct link."""

    names: tuple[str, ...]
    rows: np.ndarray  # int64, sorted
    which: np.ndarray  # int16: position in ``names``
    eval_ids: pa.Array  # string: the evaluation sample
    score: np.ndarray  # float32
    signal: np.ndarray  # int8 Signal codes
    direct: np.ndarray  # bool

    @classmethod
    def none(cls, names: Sequence[str] = ()) -> Contamination:
        return cls(
            tuple(names), np.zeros(0, np.int64), np.zeros(0, np.int16), pa.array([], pa.string()),
            np.zeros(0, np.float32), np.zeros(0, np.int8), np.zeros(0, bool),
        )  # fmt: skip

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def mask(self, n: int) -> np.ndarray:
        out = np.zeros(n, bool)
        out[self.rows] = True
        return out

    def positions(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global rows ``idx``: whether each is contaminated, and its position in ``rows``."""
        if not len(self):
            return np.zeros(idx.shape[0], bool), np.zeros(idx.shape[0], np.int64)
        pos = np.minimum(np.searchsorted(self.rows, idx), self.rows.shape[0] - 1)
        return self.rows[pos] == idx, pos


def check_compatible(cfg: RunConfig, eval_set: EvalSet) -> None:
    """The evaluation index must hold vectors of the run's model at its input size: a score
    between two models' vectors means nothing.

    Raises:
        ConfigError: another model or input size.
    """
    theirs = eval_set.index.config.embed
    meta = eval_set.index.meta
    if not int(meta.get("embedded") or 0):
        return
    model = str(meta.get("model", theirs.model.value))
    if model != cfg.embed.model.value or theirs.size != cfg.embed.size:
        raise ConfigError(
            f"the evaluation index {eval_set.name!r} ({eval_set.index.directory}) holds {model} embeddings at "
            f"{theirs.size} px and this run makes {cfg.embed.model.value} ones at {cfg.embed.size} px: they cannot be "
            "compared; hint: build the evaluation index with the run's preset (dedup run EVAL --out EVAL_OUT "
            "--preset ...), or run with its model"
        )


def find_contamination(
    table: pa.Table | FeatureRows,
    vectors: Any,
    labels: np.ndarray,
    cfg: RunConfig,
    evals: Sequence[EvalSet],
    *,
    shards: Sequence[Shard] | None = None,
) -> Contamination:
    """The training rows that copy an evaluation image, directly or through their cluster.

    ``shards``: where the training rows are read back from when a pixel hash must label a link
    (:func:`dedup.pixels.resolve_against`; None: from nowhere, such links get PDQ's label).

    Per training row the strongest direct link wins: exact before embedding before hashes
    (:class:`Signal` order), then the highest similarity, then the earlier evaluation set.
    """
    rows_of = as_rows(table)
    n = rows_of.num_rows
    names = tuple(e.name for e in evals)
    if not evals or not n:
        return Contamination.none(names)
    best = {
        "which": np.full(n, -1, np.int16),
        "base": np.full(n, -1, np.int64),
        "score": np.full(n, np.nan, np.float32),
        "signal": np.full(n, -1, np.int8),
    }
    eval_ids: list[pa.ChunkedArray] = []
    for k, ev in enumerate(evals):
        check_compatible(cfg, ev)
        mine, base = rows_of, ev.index
        if cfg.search.exact:
            mine, samples, _ = resolve_against(
                rows_of, shards or (), ev.index.samples, [e.shard for e in ev.index.catalog.shards],
                max_pixels=cfg.fingerprint.max_pixels, workers=cfg.workers or os.cpu_count() or 1,
            )  # fmt: skip
            base = replace(ev.index, samples=samples)
        links = cross_links(mine, _in_memory(vectors), base, cfg)
        eval_ids.append(ev.index.samples.column("sample_id"))
        if not len(links):
            continue
        # per training row its strongest link to this set: signal first (smaller is stronger),
        # then the higher score, then the lower base row
        order = np.lexsort((links.base, -links.score, links.signal, links.drop))
        d = links.drop[order]
        first = np.ones(d.shape[0], bool)
        first[1:] = d[1:] != d[:-1]
        take = order[first]
        d = links.drop[take]
        # stronger than what an earlier set gave (an equal link keeps the earlier set)
        sig, score = links.signal[take], links.score[take]
        held = best["which"][d] >= 0
        better = ~held | (sig < best["signal"][d]) | ((sig == best["signal"][d]) & (score > best["score"][d]))
        d, take = d[better], take[better]
        best["which"][d] = k
        best["base"][d] = links.base[take]
        best["score"][d] = links.score[take]
        best["signal"][d] = links.signal[take]
    direct_rows = np.flatnonzero(best["which"] >= 0)
    if not direct_rows.size:
        return Contamination.none(names)
    # Cluster mates carry their cluster's strongest direct link (signal, score, set; ties: first row).
    by_cluster: dict[int, int] = {}
    strongest = np.lexsort((direct_rows, best["which"][direct_rows], -best["score"][direct_rows], best["signal"][direct_rows]))
    for r in direct_rows[strongest].tolist():
        by_cluster.setdefault(int(labels[r]), r)
    touched = np.fromiter(by_cluster, np.int64)
    rows = np.flatnonzero(np.isin(labels, touched))
    source = np.array([by_cluster[int(c)] for c in labels[rows].tolist()], np.int64)
    is_direct = np.isin(rows, direct_rows)
    source[is_direct] = rows[is_direct]
    which = best["which"][source]
    base = best["base"][source]
    ids = [
        eval_ids[int(w)].take(pa.array([int(b)], pa.int64()))[0].as_py() for w, b in zip(which.tolist(), base.tolist(), strict=True)
    ]
    return Contamination(
        names, rows, which, pa.array(ids, pa.string()), best["score"][source], best["signal"][source], is_direct
    )


def _in_memory(vectors: Any) -> np.ndarray:
    """The run's vectors as an array: evaluation sets are searched with the training rows as
    queries (a VectorFiles past search.partition_above is materialised here; see the note in
    docs/architecture.md)."""
    if isinstance(vectors, np.ndarray):
        return vectors
    return np.asarray(vectors, np.float32)


def report_section(contamination: Contamination, sample_ids: pa.Array, *, examples: int = 10) -> dict[str, Any]:
    """report.json's ``contamination``: per evaluation set, the training samples dropped (direct
    links and their cluster mates), links per signal, the similarity histogram of the direct
    links (0.5 to 1 by 0.05) and the strongest examples."""
    out: dict[str, Any] = {}
    edges = np.round(np.arange(0.5, 1.0001, 0.05), 2)
    for k, name in enumerate(contamination.names):
        mine = contamination.which == k
        direct = mine & contamination.direct
        scores = contamination.score[direct]
        hist, _ = np.histogram(np.clip(scores, 0.5, 1.0), bins=edges)
        signals: dict[str, int] = {}
        for code in contamination.signal[direct].tolist():
            label = Signal(int(code)).label
            signals[label] = signals.get(label, 0) + 1
        order = np.flatnonzero(direct)
        order = order[np.lexsort((contamination.rows[order], -contamination.score[order], contamination.signal[order]))][:examples]
        out[name] = {
            "dropped": int(mine.sum()),
            "direct": int(direct.sum()),
            "via_cluster": int((mine & ~contamination.direct).sum()),
            "by_signal": dict(sorted(signals.items())),
            "similarity_histogram": {"edges": edges.tolist(), "counts": hist.astype(int).tolist()},
            "examples": [
                {
                    "sample_id": sample_ids[int(p)].as_py(),
                    "eval_sample_id": contamination.eval_ids[int(p)].as_py(),
                    "similarity": round(float(contamination.score[int(p)]), 6),
                    "signal": Signal(int(contamination.signal[int(p)])).label,
                }
                for p in order.tolist()
            ],
        }
    return out
