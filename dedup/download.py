"""``dedup download``: fetch the images of LAION metadata with img2dataset.

The output is img2dataset's own webdataset layout (``NNNNN.tar`` + ``NNNNN.parquet`` +
``NNNNN_stats.json``), which ``dedup run`` reads directly; failed downloads stay listed in the
sidecar parquet, so they become ``failed`` rows of the manifest rather than vanishing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from dedup.errors import SourceError


def download(
    metadata: str,
    out: Path,
    *,
    url_col: str = "URL",
    caption_col: str = "TEXT",
    image_size: int = 256,
    resize_mode: str = "keep_ratio",
    processes: int = 1,
    threads: int = 64,
    samples_per_shard: int = 10000,
    timeout: int = 10,
) -> Path:
    """Run img2dataset on ``metadata`` (a parquet file or folder of them) into ``out``."""
    path = Path(metadata)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise SourceError(f"no metadata parquet at {metadata}; give a .parquet file or a folder of them")
    names = pq.read_schema(files[0]).names
    for col in (url_col, caption_col):
        if col not in names:
            raise SourceError(
                f"column '{col}' not in {files[0].name} (columns: {', '.join(names)}); "
                "pass --url-col / --caption-col"
            )
    extra = [c for c in names if c not in (url_col, caption_col)]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as i2d

    i2d(
        url_list=str(path),
        output_folder=str(out),
        input_format="parquet",
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=extra or None,
        output_format="webdataset",
        image_size=image_size,
        resize_mode=resize_mode,
        processes_count=processes,
        thread_count=threads,
        number_sample_per_shard=samples_per_shard,
        timeout=timeout,
        enable_wandb=False,
        distributor="multiprocessing",
    )
    return out
