"""Small JPEG thumbnails of a few samples, read back from the original shards.

The pipeline keeps no image bytes (decode once, keep the features), so the report and ``query``
read the few images they show from the sources again: only the shards that hold them, and each
shard only until its last wanted sample is found. A source that moved or changed simply gives
no thumbnail (when the expected SHA-256 is known, changed bytes are refused rather than shown
under the wrong caption): a picture is a convenience, never a reason for a run to fail.

``thumbnails.parquet`` (``sample_id, jpeg``) keeps the report's thumbnails beside report.json,
so ``dedup report OUT`` can render them again without the sources.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dedup._io import atomic_path
from dedup._types import Shard
from dedup.config import FingerprintConfig
from dedup.errors import DedupError, SampleError
from dedup.fingerprint import decode

__all__ = [
    "THUMBS_FILE",
    "cluster_thumbnails",
    "data_uri",
    "fetch_images",
    "make_thumbnail",
    "read_thumbnails",
    "rediscover",
    "stream_images",
    "write_thumbnails",
]

THUMBS_FILE = "thumbnails.parquet"
_SCHEMA = pa.schema([("sample_id", pa.string()), ("jpeg", pa.binary())])
_MAX_PIXELS = FingerprintConfig().max_pixels


def rediscover(sources: Iterable[str | None]) -> list[Shard]:
    """The shards of a finished run, from the ``source`` column of its manifest (run order).

    Shard ids depend on the order of the sources (``s0/``, ``s1/`` prefixes), which is the
    order of their first rows in the manifest. An empty list when a source is gone.
    """
    from dedup.sources import discover

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
    from dedup.sources import read_samples

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


def cluster_thumbnails(
    report: Mapping[str, object],
    shards: Sequence[Shard],
    *,
    size: int,
    sha256: Mapping[str, bytes | None] | None = None,
    only: set[str] | None = None,
) -> dict[str, bytes]:
    """Thumbnails of the samples ``report["largest_clusters"]`` shows (of those in ``only``,
    when given), by sample id."""
    clusters = report.get("largest_clusters") or []
    assert isinstance(clusters, list)
    wanted = {
        s["sample_id"]: s["shard"]
        for c in clusters
        for s in c["samples"]
        if s.get("shard") and (only is None or s["sample_id"] in only)
    }
    images = fetch_images(shards, wanted, sha256=sha256)
    thumbs = {sid: make_thumbnail(data, size) for sid, data in images.items()}
    return {sid: t for sid, t in thumbs.items() if t is not None}


def make_thumbnail(data: bytes | Image.Image, size: int) -> bytes | None:
    """A JPEG of the image fitted in ``size`` x ``size`` (None if the bytes do not decode)."""
    try:
        image = data if isinstance(data, Image.Image) else decode(data, max_pixels=_MAX_PIXELS)
    except SampleError:
        return None
    image = image.convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82, optimize=True)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    """``data:image/jpeg;base64,...``: an image inside the page, no request."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def write_thumbnails(path: Path, thumbs: Mapping[str, bytes]) -> None:
    """``thumbnails.parquet``, sorted by sample id (the same run gives the same bytes)."""
    ids = sorted(thumbs)
    table = pa.table([pa.array(ids, pa.string()), pa.array([thumbs[i] for i in ids], pa.binary())], schema=_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="none")


def read_thumbnails(path: Path) -> dict[str, bytes]:
    """What :func:`write_thumbnails` wrote; empty when the file is missing or unreadable."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return {}
    if set(_SCHEMA.names) - set(table.column_names):
        return {}
    return dict(zip(table.column("sample_id").to_pylist(), table.column("jpeg").to_pylist(), strict=True))
