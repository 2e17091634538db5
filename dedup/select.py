"""Keep policies: which member of each cluster survives.

Every policy breaks ties by input order (the smallest row wins), so the choice is
deterministic.
"""

from __future__ import annotations

import numpy as np

from dedup.config import KeepPolicy
from dedup.errors import ConfigError


def keepers(
    labels: np.ndarray,
    *,
    policy: KeepPolicy,
    eligible: np.ndarray,
    pixels: np.ndarray | None = None,
    metric: np.ndarray | None = None,
) -> np.ndarray:
    """The row each row's cluster keeps (``-1`` for rows that are not eligible).

    ``eligible`` masks rows that may be kept at all (failed samples are not). ``pixels``
    (width × height) serves ``largest``; ``metric`` (a metadata column, NaN where missing)
    serves ``column``: the highest value wins and missing values lose to any present one.
    """
    n = labels.shape[0]
    rows = np.arange(n, dtype=np.int64)
    if policy is KeepPolicy.FIRST:
        primary = np.zeros(n)
    elif policy is KeepPolicy.LARGEST:
        if pixels is None:
            raise ConfigError("keep policy 'largest' needs image sizes")
        primary = -np.nan_to_num(np.asarray(pixels, np.float64), nan=-1.0)
    elif policy is KeepPolicy.COLUMN:
        if metric is None:
            raise ConfigError("keep policy 'column' needs keep.column, e.g. --keep-column aesthetic")
        primary = -np.nan_to_num(np.asarray(metric, np.float64), nan=-np.inf)
    else:  # pragma: no cover - the enum is closed
        raise ConfigError(f"unknown keep policy {policy!r}")
    # Sort eligible rows by (cluster, preference, row); the first of each cluster wins.
    cand = rows[eligible]
    order = np.lexsort((cand, primary[cand], labels[cand]))
    ranked = cand[order]
    first = np.ones(ranked.shape[0], bool)
    first[1:] = labels[ranked][1:] != labels[ranked][:-1]
    winners = ranked[first]
    out = np.full(n, -1, np.int64)
    if winners.shape[0] == 0:
        return out
    win_labels = labels[winners]  # sorted: ranked is ordered by label first
    pos = np.minimum(np.searchsorted(win_labels, labels), win_labels.shape[0] - 1)
    found = eligible & (win_labels[pos] == labels)
    out[found] = winners[pos[found]]
    return out
