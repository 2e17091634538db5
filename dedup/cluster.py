"""Links to clusters: connected components with deterministic ids.

A cluster's id is the smallest global row number among its members, so the same input in the
same order always gives the same ids, whatever order the links were found in.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import connected_components

from dedup.search import Edges


def components(n: int, edges: Edges) -> np.ndarray:
    """The component label of each of ``n`` rows: the smallest row number in its component.

    scipy's compiled connected components over the links as a sparse graph (measured: 10M rows
    and 10M links in ~4.5 s and under 1 GB, half the time of the numpy min-label propagation
    this replaced), then every component relabelled by its smallest row, so ids do not depend
    on the order links were found in.
    """
    labels = np.arange(n, dtype=np.int64)
    if n == 0 or len(edges) == 0:
        return labels
    index = np.int32 if n < np.iinfo(np.int32).max else np.int64
    graph = csr_array(
        (np.ones(len(edges), np.int32), (edges.i.astype(index), edges.j.astype(index))), shape=(n, n)
    )
    count, component = connected_components(graph, directed=False)
    smallest = np.full(count, n, np.int64)
    np.minimum.at(smallest, component, labels)
    return smallest[component]


def sizes(labels: np.ndarray) -> np.ndarray:
    """The size of each row's cluster."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse]
