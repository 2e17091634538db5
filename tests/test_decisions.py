"""Review decisions: constrained clustering, the decisions file, precision per band."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup.cluster import components, constrained_components
from dedup.decisions import (
    DECISIONS_FILE,
    SAMPLE_SCHEMA,
    Verdict,
    apply_decisions,
    constraints,
    load_decisions,
    precision_table,
    read_decisions,
    record_decisions,
    wilson,
)
from dedup.errors import ConfigError, SourceError
from dedup.review.sample import allocate, band_of
from dedup.search import Edges, Signal


def _edges(links: list[tuple[int, int, float]], signal: Signal = Signal.EMBEDDING) -> Edges:
    i, j, s = zip(*links, strict=True) if links else ((), (), ())
    return Edges.of(np.array(i, np.int64), np.array(j, np.int64), np.array(s, np.float32), signal)


# --------------------------------------------------------------------------------------------
# constrained_components
# --------------------------------------------------------------------------------------------


def test_cannot_link_cuts_a_chain_at_its_weakest_link() -> None:
    # 0 - 1 (0.99) - 2 (0.91, the weak joint) - 3 (0.98); 5 - 6 elsewhere
    edges = _edges([(0, 1, 0.99), (1, 2, 0.91), (2, 3, 0.98), (5, 6, 0.95)])
    assert components(8, edges).tolist() == [0, 0, 0, 0, 4, 5, 5, 7]
    got = constrained_components(8, edges, cannot=np.array([[0, 3]]))
    assert got.tolist() == [0, 0, 2, 2, 4, 5, 5, 7]


def test_must_link_joins_and_conflicts_keep_the_cannot_link() -> None:
    edges = _edges([(0, 1, 0.99), (5, 6, 0.95)])
    assert constrained_components(8, edges, must=np.array([[1, 6]])).tolist() == [0, 0, 2, 3, 4, 0, 0, 7]
    # same 0~3, same 3~4, different 0~4: the must-link that would break the cannot-link goes
    got = constrained_components(8, edges, must=np.array([[0, 3], [3, 4]]), cannot=np.array([[0, 4]]))
    assert got[0] == got[3] and got[0] != got[4]


def test_constraints_of_unrelated_rows_change_nothing() -> None:
    edges = _edges([(0, 1, 0.99), (1, 2, 0.93)])
    assert np.array_equal(constrained_components(5, edges, cannot=np.array([[3, 4]])), components(5, edges))
    assert np.array_equal(constrained_components(5, edges), components(5, edges))


def test_stronger_signal_wins_over_a_higher_score_of_a_weaker_one() -> None:
    # 1 is tied to 0 by exact bytes and to 2 by a (higher-scored) PDQ link; 0 and 2 differ.
    edges = Edges.concat([_edges([(0, 1, 1.0)], Signal.EXACT_BYTES), _edges([(1, 2, 0.99)], Signal.PDQ)])
    got = constrained_components(3, edges, cannot=np.array([[0, 2]]))
    assert got.tolist() == [0, 0, 2]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 14),
    links=st.lists(st.tuples(st.integers(0, 13), st.integers(0, 13), st.floats(0.5, 1.0, width=32)), max_size=40),
    must=st.lists(st.tuples(st.integers(0, 13), st.integers(0, 13)), max_size=4),
    cannot=st.lists(st.tuples(st.integers(0, 13), st.integers(0, 13)), max_size=4),
    seed=st.integers(0, 1000),
)
def test_constrained_components_properties(n: int, links: list, must: list, cannot: list, seed: int) -> None:
    links = [(a % n, b % n, s) for a, b, s in links]
    must_a = np.array([(a % n, b % n) for a, b in must], np.int64).reshape(-1, 2)
    cannot_a = np.array([(a % n, b % n) for a, b in cannot if a % n != b % n], np.int64).reshape(-1, 2)
    edges = _edges(links)
    got = constrained_components(n, edges, must_a, cannot_a)
    # ids are the smallest member's row
    for label in np.unique(got):
        assert label == np.flatnonzero(got == label).min()
    # no cannot-linked pair shares a cluster
    for a, b in cannot_a:
        assert got[a] != got[b]
    # every cluster is a union of plain components (with the must-links): cuts only split
    joined = components(n, Edges.concat([edges, _edges([(a, b, 1.0) for a, b in must_a.tolist()])]))
    for label in np.unique(got):
        assert len(np.unique(joined[got == label])) == 1
    # the order links were found in does not matter
    perm = np.random.default_rng(seed).permutation(len(edges))
    shuffled = Edges(edges.i[perm], edges.j[perm], edges.score[perm], edges.signal[perm])
    assert np.array_equal(constrained_components(n, shuffled, must_a, cannot_a), got)
    # without cannot-links every must-link holds
    if not cannot_a.size:
        for a, b in must_a:
            assert got[a] == got[b]


# --------------------------------------------------------------------------------------------
# The decisions file
# --------------------------------------------------------------------------------------------


def _decide(path: Path, a: str, b: str, verdict: str, **extra: object) -> pa.Table:
    return record_decisions(path, [{"a_id": a, "b_id": b, "decision": verdict, **extra}])


def test_record_keeps_the_latest_decision_per_pair_sorted(tmp_path: Path) -> None:
    path = tmp_path / DECISIONS_FILE
    _decide(path, "b", "a", "same")
    _decide(path, "c", "d", "skip")
    table = _decide(path, "a", "b", "different")
    assert table.column("a_id").to_pylist() == ["a", "c"] and table.column("b_id").to_pylist() == ["b", "d"]
    assert read_decisions(path).column("decision").to_pylist() == ["different", "skip"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp left behind


def _writer(path: str, who: int) -> None:
    for k in range(15):
        record_decisions(Path(path), [{"a_id": f"w{who}", "b_id": f"x{k:02d}", "decision": "same"}])


def test_two_writers_lose_nothing(tmp_path: Path) -> None:
    """Two processes (two tabs, two reviewers) recording at once: every decision lands."""
    path = tmp_path / DECISIONS_FILE
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), who)) for who in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert read_decisions(path).num_rows == 30


def test_unreadable_or_foreign_decisions_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="cannot read the decisions file"):
        read_decisions(bad)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(SourceError, match="not a dedup decisions file"):
        read_decisions(tmp_path / "other.parquet")
    with pytest.raises(ConfigError, match="not found"):
        load_decisions(tmp_path, [tmp_path / "missing.parquet"])
    with pytest.raises(ValueError):
        _decide(tmp_path / DECISIONS_FILE, "a", "b", "maybe")


def test_decisions_find_rows_by_id_else_by_sha256(tmp_path: Path) -> None:
    sha = [bytes([k]) * 32 for k in range(4)]
    rows = pa.table({"sample_id": ["s/0", "s/1", "s/2", "s/3"], "sha256": pa.array(sha, pa.binary(32)), "status": ["ok"] * 4})
    path = tmp_path / DECISIONS_FILE
    _decide(path, "s/0", "s/1", "different")
    # ids of another layout of the same data: found by their bytes' hash
    _decide(path, "old/2", "old/3", "same", a_sha256=sha[2], b_sha256=sha[3])
    _decide(path, "gone/9", "s/0", "same")  # not in this run
    must, cannot, unmatched = constraints(rows, read_decisions(path))
    assert must.tolist() == [[2, 3]] and cannot.tolist() == [[0, 1]] and unmatched == 1


def test_apply_decisions_names_what_changed(tmp_path: Path) -> None:
    rows = pa.table({"sample_id": [f"s/{k}" for k in range(4)], "sha256": pa.nulls(4, pa.binary(32)), "status": ["ok"] * 4})
    edges = _edges([(0, 1, 0.99), (1, 2, 0.92)])
    path = tmp_path / DECISIONS_FILE
    _decide(path, "s/0", "s/2", "different")
    _decide(path, "s/2", "s/3", "same")
    applied = apply_decisions(4, rows, edges, read_decisions(path))
    assert applied.labels.tolist() == [0, 0, 2, 2]
    assert applied.before is not None and applied.before.tolist() == [0, 0, 0, 3]
    # the cut link 1-2 no longer explains anything; the must-link 2-3 is a `reviewed` link
    assert sorted(zip(applied.links.i.tolist(), applied.links.j.tolist(), strict=True)) == [(0, 1), (2, 3)]
    assert Signal.REVIEWED in applied.links.signal.tolist()
    assert applied.stats == {"decisions": 2, "must_links": 1, "cannot_links": 1, "unmatched": 0}
    nothing = apply_decisions(4, rows, edges, read_decisions(tmp_path / "none.parquet"))
    assert nothing.before is None and np.array_equal(nothing.labels, components(4, edges))


# --------------------------------------------------------------------------------------------
# Precision per band
# --------------------------------------------------------------------------------------------


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-3)


def test_band_of_and_allocation() -> None:
    assert band_of(0.9) == (0.9, 0.95) and band_of(0.949) == (0.9, 0.95) and band_of(1.0) == (0.95, 1.0)
    assert band_of(0.8828) == (0.85, 0.9)
    assert allocate([100, 100, 100], 30) == [10, 10, 10]
    assert allocate([2, 100, 100], 30) == [2, 14, 14]  # a small stratum's spare share goes to the others
    assert allocate([1, 1], 10) == [1, 1]
    assert sum(allocate([5, 7, 9], 13)) == 13


def test_precision_table_and_supported_threshold(tmp_path: Path) -> None:
    records = []
    verdicts = []
    for band_lo, same, different in ((0.95, 20, 0), (0.9, 19, 1), (0.85, 6, 4)):
        for k in range(same + different + 2):  # 2 left undecided per band
            a, b = f"a{band_lo}-{k:02d}", f"b{band_lo}-{k:02d}"
            records.append({"a_id": a, "b_id": b, "signal": "sscd", "similarity": band_lo + 0.01,
                            "band": f"{band_lo:.2f}-{band_lo + 0.05:.2f}", "band_lo": band_lo, "band_hi": band_lo + 0.05})  # fmt: skip
            if k < same + different:
                verdicts.append({"a_id": a, "b_id": b, "decision": "same" if k < same else "different"})
    path = tmp_path / DECISIONS_FILE
    record_decisions(path, verdicts)
    table = precision_table(pa.Table.from_pylist(records, schema=SAMPLE_SCHEMA), read_decisions(path), target=0.95)
    bands = {b["band"]: b for b in table["bands"]}
    assert [b["band"] for b in table["bands"]] == ["0.95-1.00", "0.90-0.95", "0.85-0.90"]  # highest first
    top, mid, low = bands["0.95-1.00"], bands["0.90-0.95"], bands["0.85-0.90"]
    assert (top["sampled"], top["decided"], top["undecided"], top["precision"]) == (22, 20, 2, 1.0)
    assert mid["precision"] == 0.95 and low["precision"] == 0.6
    assert top["ci_low"] == pytest.approx(wilson(20, 20)[0], abs=1e-4)
    assert top["meets_target"] and mid["meets_target"] and not low["meets_target"]
    assert not top["proves_target"]  # 20 of 20 proves only ~84%
    assert table["signals"]["sscd"] == {"supported_threshold": 0.9, "confident_threshold": None}


def test_verdict_values() -> None:
    assert {v.value for v in Verdict} == {"same", "different", "skip"}


def test_decisions_survive_a_source_prefix(tmp_path: Path) -> None:
    """Exact copies share their hash, so ids renamed by a source prefix (``s0/``, as `index add`
    of a new source does) are matched without it, both ways."""
    same = bytes(32)
    rows = pa.table({"sample_id": ["s0/t.tar/a", "s0/t.tar/b", "s1/u/c"], "sha256": pa.array([same, same, None], pa.binary(32)), "status": ["ok"] * 3})
    path = tmp_path / DECISIONS_FILE
    _decide(path, "t.tar/a", "t.tar/b", "different", a_sha256=same, b_sha256=same)
    _decide(path, "s3/u/c", "t.tar/a", "same")
    must, cannot, unmatched = constraints(rows, read_decisions(path))
    assert cannot.tolist() == [[0, 1]] and must.tolist() == [[2, 0]] and unmatched == 0
