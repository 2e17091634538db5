"""The chaining guard and the template relation (dedup.cluster.guarded_components, issue 24)."""

from __future__ import annotations

import numpy as np

from dedup.cluster import bridged_components, components, guarded_components, template_links
from dedup.config import RunConfig
from dedup.search import Edges, Signal


def _chain(a: int, b: int, score: float = 0.92) -> Edges:
    return Edges.of(np.arange(a, b - 1), np.arange(a + 1, b), np.full(b - 1 - a, score), Signal.EMBEDDING)


def _template_scene() -> tuple[Edges, np.ndarray]:
    """Picture 0 framed in scene 1, picture 3 in scene 2; the scenes share their background."""
    e = Edges.concat([
        Edges.of(np.array([0, 3]), np.array([1, 2]), np.array([0.6, 0.6]), Signal.PARTIAL),
        Edges.of(np.array([1]), np.array([2]), np.array([0.7]), Signal.VERIFIED),
    ])
    pixels = np.array([100.0, 1000.0, 1000.0, 100.0])
    return e, pixels


def test_a_star_of_copies_stays_whole() -> None:
    e = Edges.of(np.zeros(6, np.int64), np.arange(1, 7), np.full(6, 0.95), Signal.EMBEDDING)
    g = guarded_components(7, e, hops=1)
    assert (g.labels == 0).all() and g.detached == 0


def test_a_chain_breaks_into_pieces_within_hops_of_a_core() -> None:
    e = _chain(0, 9)
    assert (components(9, e) == 0).all()
    g = guarded_components(9, e, hops=2)
    labels = g.labels
    assert len(set(labels.tolist())) >= 2
    for c in set(labels.tolist()):
        members = np.flatnonzero(labels == c)
        assert members.max() - members.min() <= 4  # a path: no piece longer than 2 * hops links
    assert g.detached > 0
    # hops 0: no limit, the chain stays one component
    assert (guarded_components(9, e, hops=0).labels == 0).all()


def test_template_links_are_found_and_not_merged_by_default() -> None:
    e, pixels = _template_scene()
    mask = template_links(e, pixels)
    assert mask.tolist() == [False, False, True]  # only the scene-scene link
    g = guarded_components(4, e, pixels=pixels, hops=2)
    assert g.labels.tolist() == [0, 0, 2, 2]
    merged = guarded_components(4, e, pixels=pixels, hops=2, merge_templates=True)
    assert (merged.labels == 0).all()


def test_a_scene_linked_to_a_copy_of_its_own_picture_is_no_template() -> None:
    e, pixels = _template_scene()
    # scene 2 holds picture 3, which is itself a copy of picture 0: one picture, two scenes
    e = Edges.concat([e, Edges.of(np.array([0]), np.array([3]), np.array([0.95]), Signal.EMBEDDING)])
    assert not template_links(e, pixels).any()


def test_labels_do_not_depend_on_link_order() -> None:
    e = Edges.concat([_chain(0, 12), _chain(20, 27, 0.95)])
    perm = np.random.default_rng(0).permutation(len(e))
    shuffled = Edges(e.i[perm], e.j[perm], e.score[perm], e.signal[perm])
    a = guarded_components(30, e, hops=2).labels
    b = guarded_components(30, shuffled, hops=2).labels
    assert (a == b).all()


def test_cluster_table_reads_from_config() -> None:
    cfg = RunConfig().with_overrides({"cluster.guard": True, "cluster.hops": 1})
    assert cfg.cluster.guard and cfg.cluster.hops == 1 and not cfg.cluster.merge_templates


def _two_groups_and_a_bridge() -> Edges:
    """Group A (rows 0-3) and group B (rows 4-6), each held together by embedding links; a copy
    of A found by the second look (row 7), and one verified link from A's crop (3) to B (4)."""
    return Edges.concat([
        Edges.of(np.array([0, 0, 0, 4, 4]), np.array([1, 2, 3, 5, 6]), np.full(5, 0.95), Signal.EMBEDDING),
        Edges.of(np.array([7, 3]), np.array([0, 4]), np.array([0.7, 0.8]), Signal.VERIFIED),
    ])


def test_a_weak_link_attaches_a_copy_but_does_not_bridge_two_clusters() -> None:
    e = _two_groups_and_a_bridge()
    assert (components(8, e) == 0).all()  # plain components: one cluster of 8
    b = bridged_components(8, e, max_side=1)
    assert b.labels.tolist() == [0, 0, 0, 0, 4, 4, 4, 0]
    assert b.refused.tolist() == [False] * 5 + [False, True]
    # max_side 3 lets the bridge through: B holds 3 rows
    assert (bridged_components(8, e, max_side=3).labels == 0).all()


def test_a_strong_link_still_joins_what_a_weak_one_may_not() -> None:
    e = Edges.concat([_two_groups_and_a_bridge(), Edges.of(np.array([1]), np.array([5]), np.array([0.97]), Signal.EMBEDDING)])
    b = bridged_components(8, e, max_side=1)
    assert (b.labels == 0).all() and not b.refused.any()  # joined anyway: nothing refused


def test_bridge_labels_do_not_depend_on_link_order() -> None:
    rng = np.random.default_rng(1)
    e = Edges.concat([
        _chain(0, 10),
        Edges.of(rng.integers(0, 40, 30), rng.integers(0, 40, 30), rng.uniform(0.5, 0.9, 30), Signal.VERIFIED),
        Edges.of(rng.integers(0, 40, 10), rng.integers(0, 40, 10), rng.uniform(0.5, 0.9, 10), Signal.PARTIAL),
    ])
    perm = rng.permutation(len(e))
    shuffled = Edges(e.i[perm], e.j[perm], e.score[perm], e.signal[perm])
    a, b = bridged_components(40, e, max_side=2), bridged_components(40, shuffled, max_side=2)
    assert (a.labels == b.labels).all()
    assert sorted(zip(e.i[a.refused].tolist(), e.j[a.refused].tolist())) == sorted(
        zip(shuffled.i[b.refused].tolist(), shuffled.j[b.refused].tolist())
    )


def test_bridge_from_config_reaches_the_run() -> None:
    from dedup.pipeline import _cluster

    e = _two_groups_and_a_bridge()
    cfg = RunConfig().with_overrides({"cluster.bridge": 1})
    labels, kept, stats = _cluster(8, e, np.ones(8), cfg, {})
    assert labels.tolist() == [0, 0, 0, 0, 4, 4, 4, 0]
    assert len(kept) == len(e) - 1 and stats["cluster"]["links_refused"] == 1
    plain, _, _ = _cluster(8, e, np.ones(8), RunConfig(), {})
    assert (plain == 0).all()
