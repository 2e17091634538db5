"""Connected components and keep policies, against a simple reference and as properties."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dedup.cluster import components, sizes
from dedup.config import KeepPolicy
from dedup.search import Edges, Signal
from dedup.select import keepers


def _edges(pairs: list[tuple[int, int]]) -> Edges:
    a = np.array([p[0] for p in pairs], np.int64)
    b = np.array([p[1] for p in pairs], np.int64)
    return Edges.of(a, b, np.ones(len(pairs), np.float32), Signal.EMBEDDING)


def _reference(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [min(r for r in range(n) if find(r) == find(x)) for x in range(n)]


def test_components_chain_and_ids_are_min_row() -> None:
    labels = components(7, _edges([(5, 6), (1, 5), (3, 4)]))
    assert labels.tolist() == [0, 1, 2, 3, 3, 1, 1]
    assert sizes(labels).tolist() == [1, 3, 1, 2, 2, 3, 3]


def test_long_chain_converges() -> None:
    n = 5000
    pairs = [(k, k + 1) for k in range(n - 1)][::-1]
    assert (components(n, _edges(pairs)) == 0).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=60))))
def test_components_match_reference(case: tuple[int, list[tuple[int, int]]]) -> None:
    n, pairs = case
    labels = components(n, _edges(pairs))
    assert labels.tolist() == _reference(n, pairs)
    # independent of link order
    assert components(n, _edges(pairs[::-1])).tolist() == labels.tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=60), st.lists(st.booleans(), min_size=n, max_size=n))))
def test_one_keeper_per_cluster(case: tuple[int, list[tuple[int, int]], list[bool]]) -> None:
    n, pairs, elig = case
    labels = components(n, _edges(pairs))
    eligible = np.array(elig)
    keep = keepers(labels, policy=KeepPolicy.FIRST, eligible=eligible)
    kept = np.flatnonzero(keep == np.arange(n))
    # exactly one kept sample per cluster that has an eligible member, and it is eligible
    clusters_with_eligible = set(labels[eligible].tolist())
    assert sorted(labels[kept].tolist()) == sorted(clusters_with_eligible)
    assert eligible[kept].all()
    # everyone eligible points at the keeper of their own cluster
    assert (labels[keep[eligible]] == labels[eligible]).all()
    assert (keep[~eligible] == -1).all()


def test_keep_largest_and_column_break_ties_by_order() -> None:
    labels = np.array([0, 0, 0, 3, 3])
    eligible = np.ones(5, bool)
    pixels = np.array([10, 50, 50, 7, 7], np.float64)
    assert keepers(labels, policy=KeepPolicy.LARGEST, eligible=eligible, pixels=pixels).tolist() == [1, 1, 1, 3, 3]
    metric = np.array([0.1, np.nan, 0.9, np.nan, 0.2])
    assert keepers(labels, policy=KeepPolicy.COLUMN, eligible=eligible, metric=metric).tolist() == [2, 2, 2, 4, 4]


def test_failed_never_kept() -> None:
    labels = np.array([0, 0, 2])
    eligible = np.array([False, True, False])
    assert keepers(labels, policy=KeepPolicy.FIRST, eligible=eligible).tolist() == [-1, 1, -1]
