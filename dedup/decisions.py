"""A curator's decisions (``dedup review``) and what the global stage does with them.

``OUT/decisions.parquet`` holds one row per reviewed pair: the two sample ids (in sorted
order) with their SHA-256 where known, the decision (``same`` / ``different`` / ``skip``), the
link that was shown (signal, similarity), why it was shown, and when. Every decision is
written at once: read, merge and rewrite under an flock of ``OUT/decisions.lock``, through a
temp file and ``os.replace``, so two tabs (or two reviewers) never lose each other's work.

The next run into OUT applies them (:func:`apply_decisions`): *same* is a must-link, *different*
a cannot-link (:func:`dedup.cluster.constrained_components`). Pairs are found by sample id,
else by the id without its source prefix (``s0/``: `index add` of a new source renames the old
ids so), else (another layout of the same data) by the SHA-256 of its bytes, so a
decisions file can be carried to another run of the same data (``dedup run --decisions``).

``OUT/review-sample.parquet`` is a stratified sample of the accepted links (``dedup review
--sample N``); :func:`precision_table` turns the decisions on it into precision per signal
and similarity band, with Wilson 95% intervals, for report.json and report.html.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup._io import atomic_path
from dedup.cluster import components, constrained_components
from dedup.errors import ConfigError, SourceError
from dedup.rows import FeatureRows, as_rows
from dedup.search import Edges

__all__ = [
    "DECISIONS_FILE",
    "DECISION_SCHEMA",
    "SAMPLE_FILE",
    "SAMPLE_SCHEMA",
    "TARGET_PRECISION",
    "Applied",
    "Verdict",
    "apply_decisions",
    "constraints",
    "cross_constraints",
    "load_decisions",
    "precision_table",
    "read_decisions",
    "record_decisions",
    "review_section",
    "wilson",
]

DECISIONS_FILE = "decisions.parquet"
LOCK_FILE = "decisions.lock"
SAMPLE_FILE = "review-sample.parquet"
TARGET_PRECISION = 0.95  # the precision a band must reach to support its threshold


class Verdict(StrEnum):
    SAME = "same"  # a must-link
    DIFFERENT = "different"  # a cannot-link
    SKIP = "skip"  # looked at, no opinion: not shown again, not counted


DECISION_SCHEMA = pa.schema(
    [
        ("a_id", pa.string()),
        ("b_id", pa.string()),
        ("a_sha256", pa.binary(32)),
        ("b_sha256", pa.binary(32)),
        ("decision", pa.string()),
        ("signal", pa.string()),
        ("similarity", pa.float32()),
        ("why", pa.string()),
        ("decided_at", pa.timestamp("us", tz="UTC")),
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        ("a_id", pa.string()),
        ("b_id", pa.string()),
        ("a_sha256", pa.binary(32)),
        ("b_sha256", pa.binary(32)),
        ("signal", pa.string()),
        ("similarity", pa.float32()),
        ("band", pa.string()),
        ("band_lo", pa.float32()),
        ("band_hi", pa.float32()),
    ]
)

_thread_lock = threading.Lock()  # flock is per open file; threads of one server also queue here


def pair_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def read_decisions(path: Path) -> pa.Table:
    """The decisions in ``path`` (empty when the file does not exist)."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return DECISION_SCHEMA.empty_table()
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot read the decisions file {path}: {err}; hint: restore it, or move it away to start over") from None
    missing = {"a_id", "b_id", "decision"} - set(table.column_names)
    if missing:
        raise SourceError(
            f"{path} is not a dedup decisions file (no {', '.join(sorted(missing))} column); hint: pass the "
            "decisions.parquet that `dedup review` wrote"
        )
    for field in DECISION_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    try:
        table = table.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise SourceError(f"{path}: unexpected column types ({err}); hint: pass the decisions.parquet that `dedup review` wrote") from None
    bad = set(table.column("decision").drop_null().to_pylist()) - {v.value for v in Verdict}
    if bad:
        raise SourceError(f"{path}: unknown decisions {sorted(bad)!r}; hint: each is one of same, different, skip")
    return table


def _latest(table: pa.Table) -> pa.Table:
    """One row per pair (the last one), sorted by pair: the same decisions give the same bytes."""
    if table.num_rows == 0:
        return table
    last: dict[tuple[str, str], int] = {}
    for r, (a, b) in enumerate(zip(table.column("a_id").to_pylist(), table.column("b_id").to_pylist(), strict=True)):
        last[pair_key(a, b)] = r
    rows = [last[k] for k in sorted(last)]
    return table.take(pa.array(rows, pa.int64()))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with _thread_lock:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def record_decisions(path: Path, decisions: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Add ``decisions`` (dicts of :data:`DECISION_SCHEMA`'s columns; ``decided_at`` defaults to
    now) to the file at ``path``: read, merge and write under the folder's lock, atomically.
    A pair decided again keeps its latest decision. Returns the file's new contents."""
    now = datetime.now(UTC)
    rows = []
    for d in decisions:
        verdict = Verdict(d["decision"])
        a, b = str(d["a_id"]), str(d["b_id"])
        sa, sb = d.get("a_sha256"), d.get("b_sha256")
        if a > b:
            a, b, sa, sb = b, a, sb, sa
        rows.append({**{f: d.get(f) for f in DECISION_SCHEMA.names}, "a_id": a, "b_id": b, "a_sha256": sa, "b_sha256": sb,
                     "decision": verdict.value, "decided_at": d.get("decided_at") or now})  # fmt: skip
    new = pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)
    with _locked(path.parent):
        table = _latest(pa.concat_tables([read_decisions(path), new]))
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    return table


def load_decisions(out_dir: Path, extra: Sequence[Path] = ()) -> pa.Table:
    """The decisions a run into ``out_dir`` honours: ``extra`` files (``--decisions``) first,
    then ``OUT/decisions.parquet``; a pair decided in several keeps the last. A missing extra
    file is an error (it was asked for); a missing OUT file means no decisions."""
    tables = []
    for path in extra:
        if not Path(path).is_file():
            raise ConfigError(f"decisions file {path} not found; hint: pass the decisions.parquet that `dedup review` wrote")
        tables.append(read_decisions(Path(path)))
    tables.append(read_decisions(out_dir / DECISIONS_FILE))
    return _latest(pa.concat_tables(tables))


def _rows_of(rows: FeatureRows, ids: pa.Array, shas: pa.Array) -> np.ndarray:
    """Per decision end: its row (``-1``: not in this run), by sample id, else by the SHA-256
    of an ok row. The feature rows are read a part at a time, two columns of them."""
    by_id = _first_rows(rows, "sample_id", pc.unique(ids.drop_null()), ok_only=False)
    found = np.array([by_id.get(i, -1) for i in ids.to_pylist()], np.int64)
    if (found < 0).any():
        # Ids of the same shards under another source prefix (``s0/``: a run over several
        # sources, or `index add` of a new one): the bytes of exact copies cannot tell them apart.
        lost_ids = [_unprefixed(i) for i in ids.filter(pa.array(found < 0)).to_pylist()]
        by_bare = _first_rows(rows, "sample_id", pa.array(sorted({i for i in lost_ids if i is not None}), pa.string()), ok_only=False, unprefix=True)
        for k, bare in zip(np.flatnonzero(found < 0).tolist(), lost_ids, strict=True):
            found[k] = by_bare.get(bare, -1)
    lost = (found < 0) & np.asarray(shas.is_valid())
    if lost.any():
        by_sha = _first_rows(rows, "sha256", pc.unique(shas.filter(pa.array(lost))), ok_only=True)
        for k in np.flatnonzero(lost):
            found[k] = by_sha.get(shas[int(k)].as_py(), -1)
    return found


_SOURCE_PREFIX = re.compile(r"^s\d+/")


def _unprefixed(sample_id: str | None) -> str | None:
    """A sample id without the ``s<k>/`` that names its source in a run over several."""
    return None if sample_id is None else _SOURCE_PREFIX.sub("", sample_id, count=1)


def _first_rows(rows: FeatureRows, column: str, values: pa.Array, *, ok_only: bool, unprefix: bool = False) -> dict[Any, int]:
    """The first row holding each of ``values`` in ``column`` (with ``unprefix``: in the ids
    without their source prefix)."""
    first: dict[Any, int] = {}
    if len(values) == 0:
        return first
    start = 0
    for part in rows.tables([column, "status"]):
        col = part.column(0)
        if unprefix:
            col = pc.replace_substring_regex(col, pattern=_SOURCE_PREFIX.pattern, replacement="", max_replacements=1)
        pos = pc.index_in(col, value_set=values)
        hit = pos.is_valid()
        if ok_only:
            hit = pc.and_(hit, pc.equal(part.column(1), "ok").fill_null(False))
        where = np.flatnonzero(np.asarray(hit))
        for r, p in zip(where.tolist(), pos.take(pa.array(where)).to_pylist(), strict=True):
            first.setdefault(values[p].as_py(), start + r)
        start += part.num_rows
    return first


def constraints(rows: pa.Table | FeatureRows, decided: pa.Table) -> tuple[np.ndarray, np.ndarray, int]:
    """``(must, cannot, unmatched)``: the row pairs of the *same* and *different* decisions
    found in ``rows``, and how many decisions name a sample this run does not hold."""
    decided = decided.filter(pc.is_in(decided.column("decision"), pa.array([Verdict.SAME.value, Verdict.DIFFERENT.value])))
    k = decided.num_rows
    if k == 0:
        return np.empty((0, 2), np.int64), np.empty((0, 2), np.int64), 0
    ids = pa.concat_arrays([decided.column("a_id").combine_chunks(), decided.column("b_id").combine_chunks()])
    shas = pa.concat_arrays([decided.column("a_sha256").combine_chunks(), decided.column("b_sha256").combine_chunks()])
    where = _rows_of(as_rows(rows), ids, shas)
    a, b = where[:k], where[k:]
    found = (a >= 0) & (b >= 0) & (a != b)
    same = np.asarray(pc.equal(decided.column("decision"), Verdict.SAME.value))
    pairs = np.stack([a, b], axis=1)
    return pairs[found & same], pairs[found & ~same], int((~found).sum())


def cross_constraints(drop: pa.Table | FeatureRows, base: pa.Table | FeatureRows, decided: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(must, cannot)`` as ``(drop row, baseline row)`` pairs: decisions between a sample of
    a new drop (``dedup check``; found by id, else by SHA-256) and one of the baseline."""
    decided = decided.filter(pc.is_in(decided.column("decision"), pa.array([Verdict.SAME.value, Verdict.DIFFERENT.value])))
    k = decided.num_rows
    empty = np.empty((0, 2), np.int64)
    if k == 0:
        return empty, empty
    ids = pa.concat_arrays([decided.column("a_id").combine_chunks(), decided.column("b_id").combine_chunks()])
    shas = pa.concat_arrays([decided.column("a_sha256").combine_chunks(), decided.column("b_sha256").combine_chunks()])
    in_drop, in_base = _rows_of(as_rows(drop), ids, shas), _rows_of(as_rows(base), ids, shas)
    same = np.asarray(pc.equal(decided.column("decision"), Verdict.SAME.value))
    pairs, kinds = [], []
    for d_end, b_end in ((slice(0, k), slice(k, 2 * k)), (slice(k, 2 * k), slice(0, k))):
        d, b = in_drop[d_end], in_base[b_end]
        found = (d >= 0) & (b >= 0)
        pairs.append(np.stack([d[found], b[found]], axis=1))
        kinds.append(same[found])
    all_pairs, all_same = np.concatenate(pairs), np.concatenate(kinds)
    return all_pairs[all_same], all_pairs[~all_same]


class Applied:
    """Clusters with the decisions applied: ``labels``; ``links`` (the run's links plus one
    ``reviewed`` link per must-link, none across a cut) for the manifest; ``before``, the
    labels without the decisions (None when nothing was decided), to name what changed."""

    def __init__(self, labels: np.ndarray, links: Edges, before: np.ndarray | None, stats: dict[str, int]) -> None:
        self.labels, self.links, self.before, self.stats = labels, links, before, stats

    def changed(self, keep_row: np.ndarray, keep_before: np.ndarray | None) -> np.ndarray | None:
        """Rows whose keep/drop the decisions changed (the manifest's ``reviewed``)."""
        if self.before is None or keep_before is None:
            return None
        rows = np.arange(keep_row.shape[0], dtype=np.int64)
        return (keep_row == rows) != (keep_before == rows)


def apply_decisions(n: int, rows: pa.Table | FeatureRows, edges: Edges, decided: pa.Table) -> Applied:
    """Cluster ``n`` rows over ``edges`` honouring ``decided`` (see :func:`constraints`)."""
    must, cannot, unmatched = constraints(rows, decided) if decided.num_rows else (np.empty((0, 2), np.int64),) * 2 + (0,)
    stats = {"decisions": decided.num_rows, "must_links": int(must.shape[0]), "cannot_links": int(cannot.shape[0]), "unmatched": unmatched}
    if not must.size and not cannot.size:
        return Applied(components(n, edges), edges, None, stats)
    before = components(n, edges)
    labels = constrained_components(n, edges, must, cannot)
    from dedup.search import Signal

    joined = must[labels[must[:, 0]] == labels[must[:, 1]]] if must.size else must
    links = Edges.concat([edges, Edges.of(joined[:, 0], joined[:, 1], np.ones(joined.shape[0], np.float32), Signal.REVIEWED)])
    inside = labels[links.i] == labels[links.j]  # a link across a cut no longer explains a drop
    links = Edges(links.i[inside], links.j[inside], links.score[inside], links.signal[inside])
    return Applied(labels, links, before, stats)


# ------------------------------------------------------------------------------------------
# Measured precision
# ------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def precision_table(sample: pa.Table, decided: pa.Table, *, target: float = TARGET_PRECISION) -> dict[str, Any]:
    """Precision per (signal, band) of the sampled links, from the decisions on them.

    Each band: pairs sampled, decided same / different, skipped or undecided, the precision
    (same / (same + different)) and its Wilson 95% interval. Per signal, ``supported_threshold``
    is the lowest band floor from which every band with a decision up to the top reaches
    ``target`` (None when the top band does not), and ``confident_threshold`` the same with the
    interval's lower bound: the threshold the sample supports, and the one it proves.
    """
    verdict = {
        pair_key(a, b): d
        for a, b, d in zip(decided.column("a_id").to_pylist(), decided.column("b_id").to_pylist(), decided.column("decision").to_pylist(), strict=True)
    }
    bands: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sample.to_pylist():
        key = (s["signal"], s["band"])
        band = bands.setdefault(key, {"signal": s["signal"], "band": s["band"], "lo": round(float(s["band_lo"]), 4),
                                      "hi": round(float(s["band_hi"]), 4), "sampled": 0, "same": 0, "different": 0, "undecided": 0})  # fmt: skip
        band["sampled"] += 1
        d = verdict.get(pair_key(s["a_id"], s["b_id"]))
        if d in (Verdict.SAME, Verdict.DIFFERENT):
            band[str(d)] += 1
        else:
            band["undecided"] += 1
    out: list[dict[str, Any]] = []
    for band in sorted(bands.values(), key=lambda b: (b["signal"], -b["lo"])):
        judged = band["same"] + band["different"]
        lo, hi = wilson(band["same"], judged)
        band["decided"] = judged
        band["precision"] = round(band["same"] / judged, 4) if judged else None
        band["ci_low"], band["ci_high"] = (round(lo, 4), round(hi, 4)) if judged else (None, None)
        band["meets_target"] = bool(judged and band["same"] / judged >= target)
        band["proves_target"] = bool(judged and lo >= target)
        out.append(band)
    supported: dict[str, Any] = {}
    for signal in sorted({b["signal"] for b in out}):
        mine = [b for b in out if b["signal"] == signal and b["decided"]]  # highest band first
        supported[signal] = {"supported_threshold": _floor(mine, "meets_target"), "confident_threshold": _floor(mine, "proves_target")}
    return {"target": target, "bands": out, "signals": supported}


def _floor(bands: list[dict[str, Any]], flag: str) -> float | None:
    floor = None
    for b in bands:
        if not b[flag]:
            break
        floor = b["lo"]
    return floor


def review_section(out_dir: Path) -> dict[str, Any] | None:
    """report.json's ``review`` section: decisions counted by kind and, when OUT holds a
    sample, precision per band. None when nothing has been reviewed."""
    decided = read_decisions(out_dir / DECISIONS_FILE)
    sample_path = out_dir / SAMPLE_FILE
    if decided.num_rows == 0 and not sample_path.exists():
        return None
    counts = {v.value: 0 for v in Verdict}
    for d in decided.column("decision").to_pylist():
        counts[d] += 1
    section: dict[str, Any] = {"decisions": counts}
    if sample_path.exists():
        try:
            sample = pq.read_table(sample_path).cast(SAMPLE_SCHEMA)
        except (OSError, pa.ArrowException) as err:
            raise SourceError(f"cannot read {sample_path}: {err}; hint: draw it again with `dedup review OUT --sample N`") from None
        section["precision"] = precision_table(sample, decided)
    return section
