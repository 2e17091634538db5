"""Reading a few samples back from the sources, after the per-shard stage has let them go.

The pipeline keeps no image bytes (decode once, keep the features), so the later stages that
must look at a few images again — the second look, the report's thumbnails, ``query``'s page,
``review`` — read them back here: only the shards that hold them, and each shard only until its
last wanted sample is found. A source that moved or changed simply gives nothing for its samples
(when the expected SHA-256 is known, changed bytes are refused rather than shown under the wrong
caption); callers decide what a missing image means.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

from dedup._types import Shard
from dedup.errors import DedupError
from dedup.sources import discover, read_samples

__all__ = ["fetch_images", "rediscover", "stream_images"]


def rediscover(sources: Iterable[str | None]) -> list[Shard]:
    """The shards of a finished run, from the ``source`` column of its manifest (run order).

    Shard ids depend on the order of the sources (``s0/``, ``s1/`` prefixes), which is the
    order of their first rows in the manifest. An empty list when a source is gone.
    """
    ordered = list(dict.fromkeys(s for s in sources if s))
    if not ordered:
        return []
    try:
        return discover(ordered)
    except (DedupError, OSError):
        return []


def fetch_images(
    shards: Sequence[Shard],
    wanted: Mapping[str, str],
    *,
    sha256: Mapping[str, bytes | None] | None = None,
) -> dict[str, bytes]:
    """Encoded bytes of the ``wanted`` samples (``sample_id -> shard_id``) that can be read.

    Reads each shard that holds a wanted sample, in the order of ``shards``, and stops reading
    it once its wanted samples are found. Samples whose shard is missing or unreadable, or
    whose bytes no longer match ``sha256[sample_id]``, are left out.
    """
    return dict(stream_images(shards, wanted, sha256=sha256))


def stream_images(
    shards: Sequence[Shard],
    wanted: Mapping[str, str],
    *,
    sha256: Mapping[str, bytes | None] | None = None,
) -> Iterator[tuple[str, bytes]]:
    """:func:`fetch_images` one sample at a time, as each is read: ``(sample_id, bytes)`` in
    the order of ``shards`` and of the samples within each, holding one in memory. One pass
    reads each shard once, however many samples it holds (fetching a chunk at a time read a
    shard again from its start for every chunk), and of a folder batch only the wanted files."""
    by_shard: dict[str, set[str]] = {}
    for sample_id, shard_id in wanted.items():
        by_shard.setdefault(shard_id, set()).add(sample_id)
    for shard in shards:
        todo = by_shard.get(shard.shard_id)
        if not todo:
            continue
        try:
            for sample in read_samples(shard, frozenset(todo)):
                if sample.sample_id in todo:
                    todo.discard(sample.sample_id)
                    data = sample.data
                    expected = (sha256 or {}).get(sample.sample_id)
                    if data and (expected is None or hashlib.sha256(data).digest() == expected):
                        yield sample.sample_id, data
                    if not todo:
                        break
        except (DedupError, OSError):
            continue  # the source moved or broke since the run: nothing more from it
