"""Reader for a Hugging Face ``datasets`` folder written by ``save_to_disk``.

One split is a folder of Arrow stream files (``data-00000-of-00002.arrow`` ...) listed in its
``state.json``, beside ``dataset_info.json``; a ``DatasetDict`` is a folder of such split folders
with a ``dataset_dict.json``. The files are read with pyarrow: the ``datasets`` package is not
needed. The image is the column declared as an ``Image`` feature (a ``{bytes, path}`` struct),
the other scalar columns are metadata (``text`` or ``caption`` the caption, ``url``, ...).

A split is one shard; its keys are the ``key`` column when there is one, else the row number
in the split, zero-padded to nine digits (as LAION keys): ``remove.parquet``'s ``key`` then
names the rows ``Dataset.filter(..., with_indices=True)`` sees (see README).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa

from dedup._types import Sample, Shard, ShardKind
from dedup.errors import SourceError
from dedup.sources._common import (
    ENVIRONMENT_ERRORS,
    OUTSIDE_SOURCE,
    digest,
    failed_sample,
    filesystem,
    is_local,
    one_line,
    outside,
    source_root,
    stamp,
    url_of,
)
from dedup.sources._parquet import RowCounter, batch_samples

STATE = "state.json"
INFO = "dataset_info.json"
DICT = "dataset_dict.json"
DAMAGED_KEY = "<damaged>"
OUTSIDE_KEY = "<outside>"


def is_hf_split(names: set[str]) -> bool:
    """Whether a folder holding ``names`` is one split saved by ``save_to_disk``."""
    return STATE in names and INFO in names


def data_files(fs: fsspec.AbstractFileSystem, folder: str) -> tuple[str, ...]:
    """The Arrow files of a split, in its ``state.json``'s order.

    Raises:
        SourceError: the state.json cannot be read or lists no file.
    """
    path = f"{folder.rstrip('/')}/{STATE}"
    try:
        with fs.open(path, "rb") as fh:
            state = json.loads(fh.read())
        names = tuple(str(entry["filename"]) for entry in state["_data_files"])
    except ENVIRONMENT_ERRORS as err:
        raise SourceError(f"cannot read {url_of(fs, path)!r}: {err}; hint: check permissions and retry") from err
    except (ValueError, KeyError, TypeError) as err:
        raise SourceError(
            f"{url_of(fs, path)!r} is not a Hugging Face datasets state.json ({one_line(str(err))}); "
            "hint: pass a folder written by Dataset.save_to_disk"
        ) from err
    if any("/" in name or name.startswith(".") for name in names):
        raise SourceError(f"{url_of(fs, path)!r} names data files outside its folder; hint: save the dataset again")
    return names


def hf_shard(
    fs: fsspec.AbstractFileSystem, source: str, folder: str, shard_id: str, infos: Mapping[str, Mapping[str, Any]]
) -> Shard:
    """The shard of one split folder; its stamp covers the state.json and every data file
    (``infos``: name in the folder -> fsspec info)."""
    members = data_files(fs, folder)
    parts = [f"{name}\0{stamp(infos[name])}" for name in (STATE, *members) if name in infos]
    return Shard(source, url_of(fs, folder), ShardKind.HF_DATASET, shard_id, digest(parts), members)


def read_hf_dataset(shard: Shard) -> Iterator[Sample]:
    """Yield every row of a saved split, file after file, in the order ``datasets`` reads them.

    A damaged Arrow file yields the rows read before the damage, then one failed
    ``f"{shard_id}/<damaged>"`` sample; the next files are read as usual (their row numbers
    then start after the damaged file's rows read so far), keyed ``<damaged NAME>``."""
    fs, folder = filesystem(shard.path)
    confine_to = source_root(shard.source)
    rows = RowCounter()
    for name in shard.members:
        path = posixpath.join(folder, name)
        if confine_to is not None and is_local(fs) and outside(path, confine_to):
            yield failed_sample(f"{shard.shard_id}/{OUTSIDE_KEY}", OUTSIDE_KEY, OUTSIDE_SOURCE)
            continue
        try:
            fh = fs.open(path, "rb")
        except ENVIRONMENT_ERRORS as err:
            raise SourceError(
                f"cannot open {shard.path}/{name!r}: {err}; hint: the input changed since discovery? run again"
            ) from err
        with fh:
            try:
                reader = pa.ipc.open_stream(fh)
                yield from batch_samples(shard, reader.schema, reader, with_images=True, rows=rows)
            except ENVIRONMENT_ERRORS:
                raise
            except (pa.ArrowException, OSError, ValueError) as err:
                key = f"{DAMAGED_KEY[:-1]} {name}>"  # one per damaged file: ids stay unique
                yield failed_sample(
                    f"{shard.shard_id}/{key}",
                    key,
                    f"arrow file {name} damaged after row {rows.index}: {one_line(str(err))}",
                )
