"""The chaining guard and the template relation (dedup.cluster.guarded_components, issue 24)."""

from __future__ import annotations

import numpy as np

from dedup.cluster import components, guarded_components, template_links
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
