"""Input readers: find the shards of what the user passed, and read each shard's samples.

One reader per input kind (:class:`~dedup._types.ShardKind`); every reader yields one
:class:`~dedup._types.Sample` per input sample and never drops one: a sample whose image is
missing, failed to download or sits in a damaged file is yielded with ``status="failed"`` and
a one-line ``error``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

from dedup._types import Sample, Shard, ShardKind
from dedup.sources._discover import discover
from dedup.sources._embeddings import read_embeddings
from dedup.sources._files import folder_samples, read_folder, read_i2d_files
from dedup.sources._hf import read_hf_dataset
from dedup.sources._parquet import read_i2d_parquet, read_laion_metadata
from dedup.sources._webdataset import read_webdataset

__all__ = ["discover", "read_samples", "read_shard"]

_READERS: dict[ShardKind, Callable[[Shard], Iterator[Sample]]] = {
    ShardKind.WEBDATASET: read_webdataset,
    ShardKind.I2D_PARQUET: read_i2d_parquet,
    ShardKind.I2D_FILES: read_i2d_files,
    ShardKind.FOLDER: read_folder,
    ShardKind.LAION_METADATA: read_laion_metadata,
    ShardKind.EMBEDDINGS: read_embeddings,
    ShardKind.HF_DATASET: read_hf_dataset,
}


def read_shard(shard: Shard) -> Iterator[Sample]:
    """Stream the samples of one shard (from :func:`discover`), holding one sample (or one
    parquet batch) in memory at a time.

    Sample ids are ``f"{shard_id}/{key}"`` for tar, parquet and files shards and the path
    relative to the source (``s{index}/``-prefixed with several sources) for folder batches.

    Raises:
        SourceError: the shard's file cannot be opened any more (moved, no permission).
    """
    return _READERS[shard.kind](shard)


def read_samples(shard: Shard, sample_ids: Collection[str]) -> Iterator[Sample]:
    """:func:`read_shard`, where the kind allows it reading only the samples ``sample_ids`` names
    (a folder batch opens just those files); other kinds stream the shard and the caller picks."""
    if shard.kind is ShardKind.FOLDER:
        return read_folder(folder_samples(shard, sample_ids))
    return read_shard(shard)
