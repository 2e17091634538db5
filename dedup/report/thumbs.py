"""Small JPEG thumbnails of a few samples, read back from the original shards.

The images come back through :mod:`dedup.sources.readback`. A source that moved or changed
simply gives no thumbnail: a picture is a convenience, never a reason for a run to fail.

``thumbnails.parquet`` (``sample_id, jpeg``) keeps the report's thumbnails beside report.json,
so ``dedup report OUT`` can render them again without the sources.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dedup._io import atomic_path
from dedup._types import Shard
from dedup.config import FingerprintConfig
from dedup.errors import SampleError
from dedup.fingerprint import decode
from dedup.sources.readback import fetch_images

__all__ = [
    "THUMBS_FILE",
    "cluster_thumbnails",
    "data_uri",
    "make_thumbnail",
    "read_thumbnails",
    "write_thumbnails",
]

THUMBS_FILE = "thumbnails.parquet"
_SCHEMA = pa.schema([("sample_id", pa.string()), ("jpeg", pa.binary())])
_MAX_PIXELS = FingerprintConfig().max_pixels





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
