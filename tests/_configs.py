"""The config the stage tests were written against, apart from the library's default.

``RunConfig()`` *is* the ``default`` preset (tests/test_config.py proves it), and the default
moves whenever the bench finds a better trade-off. A test of one stage (a reader, the search,
the clustering, resuming) must not change its meaning when that happens, so it builds on
``PLAIN``: one worker process, full SSCD at 288 px, direct links at 0.95, upright PDQ at
512 px, pHash computed, no border trim, no region descriptors, no second look, no partial
copies. Tests of the default itself use ``load_config("default")`` or ``RunConfig()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dedup.config import EmbedConfig, FingerprintConfig, RunConfig

PLAIN: RunConfig = RunConfig().with_overrides(
    {
        "workers": 1,
        "fingerprint.phash": True,
        "fingerprint.pdq_dihedral": False,
        "fingerprint.pdq_side": 512,
        "fingerprint.trim": False,
        "embed.model": "sscd",
        "embed.size": 288,
        "embed.regions": False,
        "search.threshold": 0.95,
        "search.verify_from": -1.0,
        "search.verify_per_image": 0,
        "search.partial": False,
        "search.partial_propose": 0.5,
    }
)


def plain_fingerprint(**changes: Any) -> FingerprintConfig:
    """``PLAIN``'s fingerprint settings with ``changes``."""
    return dataclasses.replace(PLAIN.fingerprint, **changes)


def plain_embed(**changes: Any) -> EmbedConfig:
    """``PLAIN``'s embedding settings with ``changes``."""
    return dataclasses.replace(PLAIN.embed, **changes)
