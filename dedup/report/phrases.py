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

Memory and time are bounded, whatever the size of the run: candidates come from the captions of
the duplicate samples, and only those candidates are counted among the other samples. On a run
with more than :data:`MAX_DUPLICATE_CAPTIONS` duplicate samples or :data:`MAX_OTHER_CAPTIONS`
other ones, each group is a uniform random sample of that size (fixed seed :data:`PHRASE_SEED`,
so the same run gives the same report), drawn separately — a stratified sample, so:

* P(phrase | duplicates) is estimated from the duplicate sample alone, and
  ``support = hits in that sample × duplicates / sampled duplicates``;
* ``count = support + hits among the sampled others × others / sampled others`` — the whole
  set's count is estimated stratum by stratum, so it is never below ``support`` and lift never
  exceeds ``samples / duplicate_samples``, as in an exact count;
* both are unbiased estimates (lift, their ratio, is consistent: its error shrinks like
  1/sqrt(sample)); ``min_support`` applies to the hits in the sample (stricter than to the
  estimate), and ``clusters`` counts the clusters seen in the sample (a lower bound).

The section then says so: ``sample`` gives both sample sizes and the seed. Below both limits
nothing is drawn and every number is an exact count.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["MAX_DUPLICATE_CAPTIONS", "MAX_OTHER_CAPTIONS", "PHRASE_SEED", "STOPWORDS", "key_phrases", "phrase_section", "phrases_of"]

MAX_N = 3
MAX_DUPLICATE_CAPTIONS = 200_000  # captions of duplicate samples read at most (a uniform sample beyond)
MAX_OTHER_CAPTIONS = 200_000  # captions of the other samples read at most
PHRASE_SEED = 8

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
    """The phrases over-represented among ``duplicate`` samples (see the module docstring),
    counted exactly over every caption given.

    ``captions``, ``cluster`` and ``duplicate`` are parallel, one entry per decoded sample.
    Returns the JSON-ready section of ``report.json``: the counting rule, the sizes of both
    groups, and ``phrases`` (each ``phrase, words, support, clusters, count, lift``).
    """
    dup = [r for r in range(len(captions)) if duplicate[r]]
    others = [captions[r] for r in range(len(captions)) if not duplicate[r]]
    return phrase_section(
        [captions[r] for r in dup],
        [int(cluster[r]) for r in dup],
        others,
        duplicate_samples=len(dup),
        other_samples=len(others),
        min_support=min_support,
        min_clusters=min_clusters,
        limit=limit,
    )


def phrase_section(
    dup_captions: Sequence[str | None],
    dup_cluster: Sequence[int],
    other_captions: Sequence[str | None],
    *,
    duplicate_samples: int,
    other_samples: int,
    min_support: int = 3,
    min_clusters: int = 2,
    limit: int = 25,
) -> dict[str, Any]:
    """:func:`key_phrases` from the captions of (a uniform sample of) the ``duplicate_samples``
    duplicate samples, with their clusters, and of (a uniform sample of) the ``other_samples``
    others. Exact when both lists are complete; estimated as the module docstring says when not.
    """
    n_dup, n_other = duplicate_samples, other_samples
    n_all = n_dup + n_other
    k_dup, k_other = len(dup_captions), len(other_captions)
    section: dict[str, Any] = {
        "unit": "sample",
        "max_words": MAX_N,
        "min_support": min_support,
        "min_clusters": min_clusters,
        "samples": n_all,
        "duplicate_samples": n_dup,
        "phrases": [],
    }
    sampled = k_dup < n_dup or k_other < n_other
    if sampled:
        section["sample"] = {"duplicate_captions": k_dup, "other_captions": k_other, "seed": PHRASE_SEED}
    if not k_dup:
        return section

    hits: Counter[str] = Counter()
    in_clusters: dict[str, set[int]] = {}
    for caption, c in zip(dup_captions, dup_cluster, strict=True):
        for p in phrases_of(caption):
            hits[p] += 1
            in_clusters.setdefault(p, set()).add(int(c))
    candidates = {
        p for p, s in hits.items() if s >= min_support and len(in_clusters[p]) >= min_clusters
    }
    if not candidates:
        return section
    other_hits: Counter[str] = Counter()
    for caption in other_captions:
        other_hits.update(phrases_of(caption) & candidates)
    dup_scale = n_dup / k_dup
    other_scale = n_other / k_other if k_other else 0.0

    rows: list[dict[str, Any]] = []
    for p in candidates:
        support = hits[p] * dup_scale
        count = support + other_hits[p] * other_scale
        lift = (hits[p] / k_dup) / (count / n_all)
        if lift > 1.0 + 1e-9:
            rows.append(
                {
                    "phrase": p,
                    "words": p.count(" ") + 1,
                    "support": round(support) if sampled else hits[p],
                    "clusters": len(in_clusters[p]),
                    "count": round(count) if sampled else hits[p] + other_hits[p],
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
