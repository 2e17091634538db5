"""faiss searches checked against brute-force numpy; exact/URL/caption links."""

from __future__ import annotations

import numpy as np
import pytest

from dedup.search import (
    Edges,
    Signal,
    embedding_edges,
    exact_edges,
    hamming_edges,
    normalise_caption,
    pack_uint64,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(e: Edges) -> set[tuple[int, int]]:
    return set(zip(e.i.tolist(), e.j.tolist(), strict=True))


@pytest.mark.parametrize("block", [7, 64, 10_000])
def test_embedding_edges_equal_brute_force(block: int) -> None:
    rng = np.random.default_rng(0)
    base = _unit(rng, 120, 16)
    # planted near-duplicates at several strengths
    noisy = base[:40] + 0.15 * rng.standard_normal((40, 16)).astype(np.float32)
    x = np.concatenate([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    sim = x @ x.T
    for t in (0.9, 0.5):
        edges, levels = embedding_edges(x, threshold=t, block_size=block, count_at=(0.95, 0.5))
        iu, ju = np.triu_indices(x.shape[0], 1)
        want = {(int(a), int(b)) for a, b in zip(iu, ju, strict=True) if sim[a, b] >= t}
        assert _pairs(edges) == want
        assert (edges.i < edges.j).all()
        assert np.allclose(edges.score, sim[edges.i, edges.j], atol=1e-5)
        assert set(edges.signal.tolist()) <= {int(Signal.EMBEDDING)}
        for level, (pairs, samples) in levels.items():
            hit = [(a, b) for a, b in zip(iu, ju, strict=True) if sim[a, b] >= level]
            assert pairs == len(hit)
            assert samples == len({v for p in hit for v in p})


def test_embedding_threshold_is_inclusive() -> None:
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    edges, _ = embedding_edges(x, threshold=1.0)
    assert _pairs(edges) == {(0, 1)}


def test_embedding_rows_map_to_global_ids() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    edges, _ = embedding_edges(x, threshold=0.99, rows=np.array([10, 20, 30]))
    assert _pairs(edges) == {(10, 30)}


@pytest.mark.parametrize("max_distance", [0, 3, 31, 64])
def test_hamming_edges_equal_brute_force(max_distance: int) -> None:
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, (80, 256)).astype(np.uint8)
    flips = rng.integers(0, 2, (30, 256)) * (rng.random((30, 256)) < 0.08)
    bits = np.concatenate([bits, bits[:30] ^ flips.astype(np.uint8)])
    codes = np.packbits(bits, axis=1)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(2)
    edges = hamming_edges(codes, max_distance=max_distance, signal=Signal.PDQ, block_size=17)
    iu, ju = np.triu_indices(bits.shape[0], 1)
    want = {(int(a), int(b)) for a, b in zip(iu, ju, strict=True) if dist[a, b] <= max_distance}
    assert _pairs(edges) == want
    assert np.allclose(edges.score, 1 - dist[edges.i, edges.j] / 256)


def test_hamming_off_gives_nothing() -> None:
    codes = np.zeros((3, 8), np.uint8)
    assert len(hamming_edges(codes, max_distance=-1, signal=Signal.PHASH)) == 0


def test_pack_uint64_is_big_endian_bit_order() -> None:
    codes = pack_uint64(np.array([1, 1 << 63], np.uint64))
    assert codes[0].tolist() == [0] * 7 + [1]
    assert codes[1].tolist() == [128] + [0] * 7


def test_exact_edges_star_per_group_and_none_never_matches() -> None:
    e = exact_edges([b"a", None, b"b", b"a", None, b"a", b""], signal=Signal.EXACT_BYTES)
    assert _pairs(e) == {(0, 3), (0, 5)}
    assert (e.score == 1).all()


def test_normalise_caption() -> None:
    assert normalise_caption("  Canvas Wall-Art PRINT!! ") == normalise_caption("canvas wall art print")
    assert normalise_caption("Café") == normalise_caption("cafe")
    assert normalise_caption("...") is None
    assert normalise_caption(None) is None


def test_counts_by_signal() -> None:
    e = Edges.concat(
        [
            Edges.of(np.array([0]), np.array([1]), np.array([1.0]), Signal.PDQ),
            Edges.of(np.array([2, 3]), np.array([1, 1]), np.array([0.9, 0.97]), Signal.EMBEDDING),
        ]
    )
    assert e.counts_by_signal() == {"pdq": 1, "embedding": 2}
    assert (e.i < e.j).all()


def test_embedding_blocks_shrink_in_a_crowd_and_find_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where many vectors look alike, a query block's range-search results are bounded by
    shrinking the next blocks; the edges and the report's counts are those of one big block."""
    import dedup.search

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((5, 32))
    v = centres[rng.integers(0, 5, 6000)] + 1.2 * rng.standard_normal((6000, 32))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    whole, levels = embedding_edges(v, threshold=0.8, count_at=(0.5, 0.95), block_size=16384)
    assert levels[0.5][0] > 1_000_000 and len(whole) > 100  # a crowd at 0.5
    sizes: list[int] = []
    monkeypatch.setattr(dedup.search, "RESULTS_PER_BLOCK", 20_000)
    small, small_levels = embedding_edges(v, threshold=0.8, count_at=(0.5, 0.95), block_size=16384, progress=sizes.append)
    assert max(sizes[1:]) <= 64 and sum(sizes) == 6000  # ~400 neighbours a query at 0.5: 64-row blocks
    assert small_levels == levels
    for f in ("i", "j", "score", "signal"):
        assert np.array_equal(getattr(small, f), getattr(whole, f))
