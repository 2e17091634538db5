"""Caption key phrases: the n-grams over-represented in duplicate clusters.

The paper's observation is that some caption phrases ("Canvas Wall Art Print") pull the same
picture out again and again. Here a phrase is a run of 1 to 3 words of a caption; for each
phrase we count, **once per sample** (a caption that repeats a phrase counts it once):

* ``support``: duplicate samples (in a cluster of two or more) whose caption has the phrase;
* ``clusters``: how many distinct duplicate clusters those samples fall in;
* ``count``: samples of the whole set (every decoded sample) whose caption has the phrase;
* ``lift`` = P(phrase | duplicate samples) / P(phrase | all samples); above 1 means the
  phrase is more common among duplicated images than in the set as a whole.

Counting per sample keeps lift an honest ratio of two rates (per cluster, a big cluster would
carry more captions and so more phrases of every kind). The price is that one big cluster of
identical captions could give any of its words a high support, so a phrase must also be spread
over ``min_clusters`` clusters. Phrases start and end with a content word (``print on canvas``
yes, ``art of`` no); a phrase is dropped when a longer phrase containing it has the very same
counts (it says nothing more). The order is deterministic: lift, then support (both
descending), then the phrase.

Memory is bounded by the duplicate samples: candidates come from their captions first, and only
those candidates are counted over the whole set.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["STOPWORDS", "key_phrases", "phrases_of"]

MAX_N = 3

# English function words, plus the filler of alt texts; a phrase may hold them inside
# ("print on canvas") but never start or end with one.
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its
    itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    s t d ll m re ve via vs amp quot www com http https jpg jpeg png
    """.split()
)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def _tokens(caption: str) -> list[str]:
    text = unicodedata.normalize("NFKC", caption).lower()
    return [w.replace("’", "'") for w in _WORD.findall(text)]


def _content(word: str) -> bool:
    return len(word) > 1 and word not in STOPWORDS


def phrases_of(caption: str | None, *, max_n: int = MAX_N) -> set[str]:
    """The distinct phrases (1 to ``max_n`` words, content words at both ends) of a caption."""
    if not caption:
        return set()
    words = _tokens(caption)
    out: set[str] = set()
    for n in range(1, max_n + 1):
        for start in range(len(words) - n + 1):
            gram = words[start : start + n]
            if _content(gram[0]) and _content(gram[-1]):
                out.add(" ".join(gram))
    return out


def key_phrases(
    captions: Sequence[str | None],
    cluster: Sequence[int],
    duplicate: Sequence[bool],
    *,
    min_support: int = 3,
    min_clusters: int = 2,
    limit: int = 25,
) -> dict[str, Any]:
    """The phrases over-represented among ``duplicate`` samples (see the module docstring).

    ``captions``, ``cluster`` and ``duplicate`` are parallel, one entry per decoded sample.
    Returns the JSON-ready section of ``report.json``: the counting rule, the sizes of both
    groups, and ``phrases`` (each ``phrase, words, support, clusters, count, lift``).
    """
    n_all = len(captions)
    dup_rows = [r for r in range(n_all) if duplicate[r]]
    section: dict[str, Any] = {
        "unit": "sample",
        "max_words": MAX_N,
        "min_support": min_support,
        "min_clusters": min_clusters,
        "samples": n_all,
        "duplicate_samples": len(dup_rows),
        "phrases": [],
    }
    if not dup_rows:
        return section

    support: Counter[str] = Counter()
    in_clusters: dict[str, set[int]] = {}
    for r in dup_rows:
        for p in phrases_of(captions[r]):
            support[p] += 1
            in_clusters.setdefault(p, set()).add(int(cluster[r]))
    candidates = {
        p for p, s in support.items() if s >= min_support and len(in_clusters[p]) >= min_clusters
    }
    if not candidates:
        return section
    count: Counter[str] = Counter()
    for caption in captions:
        count.update(phrases_of(caption) & candidates)

    rows: list[dict[str, Any]] = []
    for p in candidates:
        lift = (support[p] / len(dup_rows)) / (count[p] / n_all)
        if lift > 1.0 + 1e-9:
            rows.append(
                {
                    "phrase": p,
                    "words": p.count(" ") + 1,
                    "support": support[p],
                    "clusters": len(in_clusters[p]),
                    "count": count[p],
                    "lift": round(lift, 4),
                }
            )
    rows = _drop_contained(rows)
    rows.sort(key=lambda r: (-r["lift"], -r["support"], r["phrase"]))
    section["phrases"] = rows[: max(0, limit)]
    return section


def _drop_contained(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop a phrase when a longer one that contains it has the same support and count."""
    rows = list(rows)
    by_counts: dict[tuple[int, int], list[str]] = {}
    for r in rows:
        by_counts.setdefault((r["support"], r["count"]), []).append(f" {r['phrase']} ")
    kept = []
    for r in rows:
        me = f" {r['phrase']} "
        peers = by_counts[(r["support"], r["count"])]
        if not any(len(q) > len(me) and me in q for q in peers):
            kept.append(r)
    return kept
