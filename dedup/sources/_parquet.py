"""Readers for parquet inputs: img2dataset's ``parquet`` output and LAION metadata.

Both stream record batches (img2dataset writes row groups of 100 rows) so memory is bounded by
a batch, never by the file: a LAION metadata part has tens of millions of rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dedup._types import Sample, Shard
from dedup.sources._common import (
    open_failure,
    open_input,
    ENVIRONMENT_ERRORS,
    OUTSIDE_SOURCE,
    Fields,
    column_values,
    failed_sample,
    filesystem,
    image_bytes,
    image_column,
    is_local,
    map_fields,
    one_line,
    outside,
    scalar_columns,
    source_root,
)

_BATCH_ROWS = 1024
# LAION keys are the row index, zero-padded like img2dataset's keys ("000000012").
_KEY_WIDTH = 9
NO_IMAGE_BYTES = "no image bytes in parquet"
DAMAGED_KEY = "<damaged>"
OUTSIDE_KEY = "<outside>"


def read_i2d_parquet(shard: Shard) -> Iterator[Sample]:
    """Yield every row of an img2dataset ``parquet`` output file, in file order.

    Rows whose download failed (``status`` other than ``success``) have no bytes and become
    failed samples carrying img2dataset's ``error_message``. A row that claims success but has
    no bytes (or a file without an image column, such as an orphaned sidecar) is failed too.
    """
    yield from _read_rows(shard, with_images=True)


def read_laion_metadata(shard: Shard) -> Iterator[Sample]:
    """Yield every row of a metadata parquet (URL, TEXT, WIDTH, ...) as a sample without bytes.

    The key is the ``key`` column when there is one, else the row index zero-padded to nine
    digits. Other scalar columns (``similarity``, ``AESTHETIC_SCORE``, ``punsafe``, ...) go to
    ``extra`` with their names as given.
    """
    yield from _read_rows(shard, with_images=False)


def _read_rows(shard: Shard, *, with_images: bool) -> Iterator[Sample]:
    """Shared row loop. A file that turns out damaged part-way yields what it could read and
    then one failed ``f"{shard_id}/<damaged>"`` sample: nothing says which rows were lost."""
    fs, path = filesystem(shard.path)
    confine_to = source_root(shard.source)
    if confine_to is not None and is_local(fs) and outside(path, confine_to):
        # Discovery never makes such a shard; the file was swapped for a link since.
        yield failed_sample(f"{shard.shard_id}/{OUTSIDE_KEY}", OUTSIDE_KEY, OUTSIDE_SOURCE)
        return
    try:
        fh = open_input(fs, path)
    except ENVIRONMENT_ERRORS as err:
        raise open_failure(shard.path, err) from err
    rows = RowCounter()
    with fh:
        try:
            parquet = pq.ParquetFile(fh)
            schema = parquet.schema_arrow
            image = image_column(schema) if with_images else None
            columns = scalar_columns(schema)
            if image is not None:
                columns.append(image)
            batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
            yield from batch_samples(shard, schema, batches, with_images=with_images, rows=rows)
        except ENVIRONMENT_ERRORS:
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            yield failed_sample(
                f"{shard.shard_id}/{DAMAGED_KEY}",
                DAMAGED_KEY,
                f"parquet damaged after {rows.index} rows: {one_line(str(err))}",
            )


@dataclass(slots=True)
class RowCounter:
    """Where a shard's row loop is: rows read so far (row-index keys go on across the files
    of a shard) and the ids given (a repeated ``key`` becomes ``key#2``)."""

    index: int = 0
    seen: set[str] = field(default_factory=set)


def batch_samples(
    shard: Shard, schema: pa.Schema, batches: Iterable[pa.RecordBatch], *, with_images: bool, rows: RowCounter
) -> Iterator[Sample]:
    """The samples of record batches of a table (parquet, or Arrow files of a Hugging Face
    dataset): scalar columns are metadata, the image column (:func:`image_column`) the bytes."""
    image = image_column(schema) if with_images else None
    names = scalar_columns(schema)
    has_key = "key" in names
    for batch in batches:
        values = {name: column_values(batch.column(name)) for name in names}
        images = image_bytes(batch.column(image)) if image is not None else None
        for i in range(batch.num_rows):
            fields = map_fields({name: values[name][i] for name in names})
            sample_id, key = row_id(shard.shard_id, fields.key, rows.index, rows.seen if has_key else None)
            data = images[i] if images is not None else None
            rows.index += 1
            yield _row_sample(sample_id, key, fields, data, with_images=with_images)


def row_id(shard_id: str, key: str | None, row_index: int, seen: set[str] | None) -> tuple[str, str]:
    """``(sample_id, key)`` of a parquet row: its ``key`` column, else its row index (nine
    digits, as LAION keys). ``seen`` (the ids so far; None without a key column, whose row
    indices cannot repeat) makes a repeated key ``key#2``. Shared by the reader and
    ``dedup apply``, which must name the rows exactly as the run did."""
    if key is None:
        key = f"{row_index:0{_KEY_WIDTH}d}"
    sample_id = f"{shard_id}/{key}"
    if seen is not None:
        sample_id = _unique(sample_id, seen)
    return sample_id, key


def _unique(sample_id: str, seen: set[str]) -> str:
    candidate, n = sample_id, 1
    while candidate in seen:
        n += 1
        candidate = f"{sample_id}#{n}"
    seen.add(candidate)
    return candidate


def _row_sample(sample_id: str, key: str, fields: Fields, data: Any, *, with_images: bool) -> Sample:
    if not fields.succeeded:
        return failed_sample(sample_id, key, fields.failure(), fields)
    if with_images and data is None:
        return failed_sample(sample_id, key, NO_IMAGE_BYTES, fields)
    return Sample(
        sample_id=sample_id,
        key=key,
        data=bytes(data) if data is not None else None,
        url=fields.url,
        caption=fields.caption,
        width=fields.width,
        height=fields.height,
        extra=fields.extra,
    )
