"""The second look: pairs the fast signals are unsure of, re-read and checked by geometry.

:mod:`~dedup.second_look.propose` picks the pairs, :mod:`~dedup.second_look.geometry` is the
per-pair kernel, :mod:`~dedup.second_look.look` runs it over a run's rows.
"""

from dedup.second_look.geometry import LocalFeatures, aligned_agreement, confirms, geometric_inliers, geometric_match, local_features
from dedup.second_look.look import second_look, verify
from dedup.second_look.propose import RegionFiles, load_regions, load_trims

__all__ = [
    "LocalFeatures",
    "RegionFiles",
    "aligned_agreement",
    "confirms",
    "geometric_inliers",
    "geometric_match",
    "load_regions",
    "load_trims",
    "local_features",
    "second_look",
    "verify",
]
