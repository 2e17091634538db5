"""Partitioned search checked against brute force: planted pairs near the threshold, across
partition borders; the on-disk vector files; connected components over its edges."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from dedup.cluster import components
from dedup.partition import PartitionSettings, VectorFiles, partitioned_edges, unit32
from dedup.search import Edges, Signal, embedding_edges

T = 0.95
DIM = 256
# Small partitions and cells, so 20k vectors go through an on-disk split and many borders.
SMALL = PartitionSettings(partition_size=256, cell_partitions=4, sample_per_centroid=32, niter=8)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def structured(n: int, pairs: int, seed: int = 0, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around topics and sub-topics (so k-means borders cut through dense regions),
    with ``pairs`` planted pairs whose cosines straddle the threshold (T - 0.01 .. T + 0.01).
    Returns the vectors and the planted pairs' rows."""
    rng = np.random.default_rng(seed)
    topics = _unit(rng.standard_normal((20, dim)))
    subs = _unit(rng.standard_normal((200, dim))).reshape(20, 10, dim)
    t, s = rng.integers(0, 20, n), rng.integers(0, 10, n)
    x = _unit(0.5 * topics[t] + 0.5 * subs[t, s] + rng.standard_normal((n, dim)) / np.sqrt(dim))
    rows = rng.permutation(n)[: 2 * pairs].reshape(pairs, 2)
    base = x[rows[:, 0]]
    u = rng.standard_normal(base.shape)
    u = _unit(u - np.sum(u * base, axis=1, keepdims=True) * base)  # orthogonal to base
    cos = rng.uniform(T - 0.01, T + 0.01, pairs)
    e = np.sqrt(1.0 / cos**2 - 1.0)[:, None]
    x[rows[:, 1]] = _unit(base + e * u)  # cosine exactly `cos` to its partner
    return x, rows


def brute(x: np.ndarray, threshold: float) -> dict[tuple[int, int], float]:
    """Every pair at or above ``threshold``, by blocks of rows against all."""
    out: dict[tuple[int, int], float] = {}
    for start in range(0, x.shape[0], 2048):
        sim = x[start : start + 2048] @ x.T
        i, j = np.nonzero(sim >= threshold)
        i += start
        keep = i < j
        out.update(zip(zip(i[keep].tolist(), j[keep].tolist(), strict=True), sim[i[keep] - start, j[keep]].tolist(), strict=True))
    return out


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], float]]:
    x, rows = structured(20_000, 3_000)
    return x, rows, brute(x, T)


def _found(edges: Edges) -> dict[tuple[int, int], float]:
    return {(int(a), int(b)): float(s) for a, b, s in zip(edges.i, edges.j, edges.score, strict=True)}


def test_partitioned_matches_brute_force_and_soft_borders_keep_cross_border_pairs(
    data: tuple[np.ndarray, np.ndarray, dict[tuple[int, int], float]], tmp_path: Path
) -> None:
    x, _, exact = data
    assert len(exact) > 1000
    stats: dict[str, object] = {}
    edges, levels = partitioned_edges(
        x, threshold=T, work_dir=tmp_path / "w", count_at=(0.95, 0.5), settings=SMALL, stats=stats
    )
    found = _found(edges)
    assert stats["cells"] > 10 and stats["partitions"] > 50  # type: ignore[operator]
    # never a pair that is not one, scores exact
    assert set(found) <= set(exact)
    assert all(abs(found[p] - exact[p]) < 1e-5 for p in found)
    assert (edges.i < edges.j).all() and len(set(found)) == len(edges)
    assert (np.diff(edges.i * len(x) + edges.j) > 0).all()  # sorted, each pair once
    assert set(edges.signal.tolist()) == {int(Signal.EMBEDDING)}
    recall = len(found) / len(exact)
    assert recall >= 0.99
    # at the threshold the count is the edges'; below it a lower bound of the exact count
    assert levels[0.95] == (len(edges), len({v for p in found for v in p}))
    below = len(brute(x, 0.5))
    assert 0.8 * below <= levels[0.5][0] <= below
    assert not (tmp_path / "w").exists()  # spilled cells and edge parts are cleaned up

    # Hard borders lose pairs the soft ones keep: the planted pairs do cross borders.
    hard, _ = partitioned_edges(
        x, threshold=T, work_dir=tmp_path / "h", settings=dataclasses.replace(SMALL, margin=0.0)
    )
    assert len(hard) < len(edges)
    assert set(_found(hard)) <= set(found) | set(exact)


def test_deeper_splits_and_rows_mapping(data: tuple[np.ndarray, np.ndarray, dict[tuple[int, int], float]], tmp_path: Path) -> None:
    x, _, exact = data
    x = x[:8000]
    exact = {p: s for p, s in exact.items() if p[1] < 8000}
    rows = np.arange(8000, dtype=np.int64) * 3 + 7
    # cells over 700 rows are split again on disk: two levels of soft borders
    deep = dataclasses.replace(SMALL, cell_rows=700)
    stats: dict[str, object] = {}
    edges, _ = partitioned_edges(x, threshold=T, work_dir=tmp_path / "w", rows=rows, settings=deep, stats=stats)
    assert stats["cells"] > 20  # type: ignore[operator]
    got = {((int(a) - 7) // 3, (int(b) - 7) // 3) for a, b in zip(edges.i, edges.j, strict=True)}
    assert got <= set(exact)
    assert len(got) >= 0.98 * len(exact)
    # the same input gives the same edges
    again, _ = partitioned_edges(x, threshold=T, work_dir=tmp_path / "w2", rows=rows, settings=deep)
    assert np.array_equal(again.i, edges.i) and np.array_equal(again.j, edges.j)
    assert np.array_equal(again.score, edges.score)


def test_float16_input_and_files_give_the_flat_search_answer(tmp_path: Path) -> None:
    x, _ = structured(3000, 400, seed=3, dim=64)
    half = (x * 3).astype(np.float16)  # not unit: readers renormalise float16 rows
    paths = []
    for k, part in enumerate(np.array_split(half, 3)):
        paths.append(tmp_path / f"{k}.npy")
        np.save(paths[-1], part)
    np.save(tmp_path / "empty.npy", np.zeros((0, 0), np.float32))  # a shard without embeddings
    files = VectorFiles([paths[0], tmp_path / "empty.npy", paths[1], paths[2]])
    assert files.shape == (3000, 64) and files.storage_dtype == np.float16
    want = unit32(half)
    assert np.array_equal(np.asarray(files), want)
    assert np.array_equal(files.take(np.array([2999, 0, 1500])), want[[2999, 0, 1500]])
    assert np.array_equal(files[10:20], want[10:20])
    with open(tmp_path / "all.npy", "wb") as fh:
        files.write_npy(fh)
    assert np.array_equal(np.load(tmp_path / "all.npy"), want)

    flat, flat_levels = embedding_edges(want, threshold=0.9, count_at=(0.9,))
    part, part_levels = partitioned_edges(files, threshold=0.9, count_at=(0.9,), work_dir=tmp_path / "w",
                                          settings=PartitionSettings(partition_size=128, cell_partitions=4))  # fmt: skip
    assert set(_found(part)) <= set(_found(flat))
    assert len(part) >= 0.99 * len(flat)
    assert part_levels[0.9][0] == len(part)


def test_files_of_other_dimensions_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((2, 8), np.float32))
    np.save(tmp_path / "b.npy", np.ones((2, 16), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        VectorFiles([tmp_path / "a.npy", tmp_path / "b.npy"])


def test_tiny_inputs(tmp_path: Path) -> None:
    edges, levels = partitioned_edges(np.ones((1, 4), np.float32), threshold=0.9, work_dir=tmp_path, count_at=(0.5,))
    assert len(edges) == 0 and levels == {0.5: (0, 0)}
    same = np.tile(_unit(np.ones((1, 8))), (40, 1))  # all alike: one partition, all pairs
    edges, _ = partitioned_edges(same, threshold=0.99, work_dir=tmp_path / "w", settings=PartitionSettings(partition_size=4, cell_partitions=2))
    assert len(edges) == 40 * 39 // 2


def test_components_ids_are_min_rows_with_repeated_links() -> None:
    # the same pair found by many signals / partitions must not change anything
    i = np.array([5, 5, 1, 3] + [8] * 300, np.int64)
    j = np.array([6, 6, 5, 4] + [9] * 300, np.int64)
    labels = components(10, Edges.of(i, j, np.ones(i.size, np.float32), Signal.EMBEDDING))
    assert labels.tolist() == [0, 1, 2, 3, 3, 1, 1, 7, 8, 8]


@pytest.mark.parametrize("deep", [False, True])
def test_scratch_stays_within_its_budget_in_passes_with_the_same_edges(tmp_path: Path, deep: bool) -> None:
    """A small scratch budget writes each split in several passes (a range of cells each) and
    deletes every level once read: the same edges as one pass, the peak under the budget
    (up to one cell), float16 spilled as float16."""
    x, _ = structured(8000, 800, seed=5, dim=64)
    half = x.astype(np.float16)
    base = dataclasses.replace(SMALL, cell_rows=700) if deep else SMALL
    roomy: dict[str, int] = {}
    one, _ = partitioned_edges(half, threshold=T, work_dir=tmp_path / "a", settings=dataclasses.replace(base, scratch_ratio=50.0), stats=roomy)
    tight: dict[str, int] = {}
    many, _ = partitioned_edges(half, threshold=T, work_dir=tmp_path / "b", settings=dataclasses.replace(base, scratch_ratio=0.4), stats=tight)
    assert tight["split_passes"] > roomy["split_passes"]
    assert np.array_equal(one.i, many.i) and np.array_equal(one.j, many.j) and np.array_equal(one.score, many.score)
    vectors = 8000 * 64 * 2
    assert tight["scratch_budget_bytes"] == int(0.4 * vectors)
    # over the budget by at most one cell (~2 partitions of 256 rows with copies), and when
    # splitting again, twice the cell split (cell_rows)
    row = 8 + 64 * 2 + 1
    assert tight["scratch_peak_bytes"] <= 0.4 * vectors + 3 * 512 * row + (2 * 700 * row if deep else 0), tight
    # float16 rows are spilled as float16: the bytes written are what the copies take as stored
    assert roomy["scratch_written_bytes"] < 8000 * roomy["split_replication"] * (8 + 64 * 2 + 1) * (2 if deep else 1) + 2e6
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
