"""Links to clusters: connected components with deterministic ids.

A cluster's id is the smallest global row number among its members, so the same input in the
same order always gives the same ids, whatever order the links were found in.
"""

from __future__ import annotations

import numpy as np

from dedup.search import Edges


def components(n: int, edges: Edges) -> np.ndarray:
    """The component label of each of ``n`` rows: the smallest row number in its component.

    Vectorised min-label propagation with pointer jumping: each round every edge pulls both
    ends to the smaller label, then labels jump to their label's label. Rounds are few in
    practice (logarithmic in component diameter), and each is a handful of numpy passes over the
    edges, so it handles millions of links without a Python loop per edge.
    """
    labels = np.arange(n, dtype=np.int64)
    if n == 0 or len(edges) == 0:
        return labels
    i, j = edges.i, edges.j
    while True:
        li, lj = labels[i], labels[j]
        low = np.minimum(li, lj)
        before = labels.copy()
        np.minimum.at(labels, li, low)
        np.minimum.at(labels, lj, low)
        # pointer jumping until every label is a root
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(before, labels):
            return labels


def sizes(labels: np.ndarray) -> np.ndarray:
    """The size of each row's cluster."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse]
