"""The records that flow between stages: shards in, samples out."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ShardKind(StrEnum):
    """How a shard is laid out on disk; chooses the reader."""

    WEBDATASET = "webdataset"  # img2dataset output_format=webdataset: NNNNN.tar (+ NNNNN.parquet)
    I2D_PARQUET = "img2dataset-parquet"  # img2dataset output_format=parquet: NNNNN.parquet with a `jpg` column
    I2D_FILES = "img2dataset-files"  # img2dataset output_format=files: NNNNN/ with key.jpg/.txt/.json
    FOLDER = "folder"  # a batch of image paths from a plain folder tree
    LAION_METADATA = "laion-metadata"  # parquet of URL, TEXT, ... without image bytes
    EMBEDDINGS = "embeddings"  # clip-retrieval: img_emb/img_emb_K.npy + metadata/metadata_K.parquet
    HF_DATASET = "hf-dataset"  # Hugging Face datasets save_to_disk: data-*.arrow + state.json (one split)


def source_prefix(index: int, n_sources: int) -> str:
    """The prefix of the shard and sample ids of the ``index``-th of ``n_sources`` sources.

    One source: none; several: ``s<index>/``, so ids stay unique in a run and stable across
    runs over the same sources. The one place this rule is written (discover, the index's
    catalog and ``index add`` all ask here)."""
    return f"s{index}/" if n_sources > 1 else ""


def source_index(shard_id: str, n_sources: int) -> int:
    """The source a shard id came from: the inverse of :func:`source_prefix`."""
    if n_sources <= 1:
        return 0
    head, _, _ = shard_id.partition("/")
    return int(head[1:])


@dataclass(frozen=True, slots=True)
class Shard:
    """One unit of work, parallelism and checkpointing.

    ``shard_id`` is unique within a run and stable across runs over the same inputs (it names the
    checkpoint). ``stamp`` changes when the underlying file changes (size, mtime), so a rerun
    recomputes a shard whose input was replaced. ``members`` lists the files of a folder batch;
    ``captions`` (empty, or one entry per member) the caption file beside each (``cat.jpg`` +
    ``cat.txt``, the layout of fine-tuning folders), ``""`` where a member has none.
    """

    source: str  # the SOURCE argument this shard came from, as the user gave it
    path: str  # fsspec path or URL of the shard file (or of the folder, for folder batches)
    kind: ShardKind
    shard_id: str  # e.g. "00000.tar", "photos/part-00003"; safe to use in a file name after quoting
    stamp: str = ""
    members: tuple[str, ...] = ()
    captions: tuple[str, ...] = ()


@dataclass(slots=True)
class Sample:
    """One input sample, as read; the reader never drops one.

    ``sample_id`` is stable (shard + key, or the path relative to the source). ``data`` holds the
    encoded image, or ``None`` when there is none (metadata-only source, failed download, missing
    member). A reader that already knows the sample is unusable sets ``status="failed"`` and a
    one-line ``error`` (img2dataset's own ``error_message`` for failed downloads).
    """

    sample_id: str
    key: str
    data: bytes | None = None
    url: str | None = None
    caption: str | None = None
    width: int | None = None  # as the metadata says; the decoder's size wins when there is one
    height: int | None = None
    status: str = "ok"  # "ok" | "failed"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other metadata (aesthetic, similarity, ...)
