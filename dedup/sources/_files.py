"""Readers for inputs made of loose files: img2dataset's ``files`` output and plain image folders."""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Collection, Iterator
from dataclasses import replace
from typing import Any

import fsspec

from dedup._types import Sample, Shard
from dedup.errors import SourceError
from dedup.sources._common import (
    ENVIRONMENT_ERRORS,
    READ_CHUNK,
    Fields,
    FileFetcher,
    chunks,
    clean_text,
    decode_text,
    failed_sample,
    is_folder_metadata,
    filesystem,
    is_hidden,
    map_fields,
    metadata_captions,
    parse_json,
    pick_image_field,
    read_error,
    read_sidecar,
    source_root,
    split_name,
    stamp,
)

MISSING = "missing from folder"
NO_IMAGE = "no image file in folder"
SIDECAR_KEY = "<sidecar>"


def read_i2d_files(shard: Shard) -> Iterator[Sample]:
    """Yield every sample of one img2dataset ``files`` subfolder (``NNNNN/``), in key order.

    Each key's ``key.jpg`` (or png/webp), ``key.txt`` and ``key.json`` are grouped as in a
    webdataset tar; the sidecar ``NNNNN.parquet`` beside the folder adds the failed downloads.
    The folder is listed once and files are fetched in chunks, so the cost per sample is the
    reads themselves. A folder that does not exist (img2dataset creates none on some object
    stores when every download failed) is read as empty.
    """
    fs, path = filesystem(shard.path)
    confine_to = source_root(shard.source)
    # A files folder given as the source has its sidecar beside it, as a tar given alone does.
    beside = os.path.dirname(confine_to) if confine_to == os.path.realpath(path) else confine_to
    sidecar = read_sidecar(fs, path.rstrip("/") + ".parquet", confine_to=beside)
    if sidecar.error is not None:
        yield failed_sample(f"{shard.shard_id}/{SIDECAR_KEY}", SIDECAR_KEY, sidecar.error)
    groups = _list_groups(fs, path, shard)
    keys = sorted(set(groups) | set(sidecar.rows or ()))
    with FileFetcher(fs, confine_to) as fetcher:
        for chunk in chunks(keys, READ_CHUNK):
            plan: list[str] = []
            for key in chunk:
                members = groups.get(key, {})
                image = pick_image_field(members)
                for name in (image, "txt", "json"):
                    if name is not None and name in members:
                        plan.append(members[name])
            contents = dict(zip(plan, fetcher.read(plan), strict=True))
            for key in chunk:
                yield _files_sample(shard, key, groups.get(key, {}), contents, sidecar.pop(key))


def _list_groups(fs: fsspec.AbstractFileSystem, path: str, shard: Shard) -> dict[str, dict[str, str]]:
    """One listing of the folder: ``{key: {field: file path}}``."""
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    except ENVIRONMENT_ERRORS as err:
        raise SourceError(f"cannot list {shard.path!r}: {err}; hint: check permissions and retry") from err
    groups: dict[str, dict[str, str]] = {}
    for entry in entries:
        # fsspec lists a symlink as type "other": it is a member too (read only if it stays
        # inside the source, see FileFetcher), never silently passed over.
        if entry.get("type") != "file" and not entry.get("islink"):
            continue
        name = entry["name"].rstrip("/").rpartition("/")[2]
        if is_hidden(name):
            continue
        key, field = split_name(name)
        groups.setdefault(key, {})[field] = entry["name"]
    return groups


def _files_sample(
    shard: Shard,
    key: str,
    members: dict[str, str],
    contents: dict[str, bytes | OSError],
    listed: Fields | None,
) -> Sample:
    key = clean_text(key)
    sample_id = f"{shard.shard_id}/{key}"
    record: dict[str, Any] = {}
    if listed is not None:
        record.update(listed.as_record())
    meta = contents.get(members.get("json", ""))
    if isinstance(meta, bytes):
        record.update(parse_json(meta))
    fields = map_fields(record)
    text = contents.get(members.get("txt", ""))
    if isinstance(text, bytes):
        fields.caption = decode_text(text)
    image = pick_image_field(members)
    if image is None:
        if listed is not None and not listed.succeeded:
            return failed_sample(sample_id, key, listed.failure(), fields)
        return failed_sample(sample_id, key, MISSING if listed is not None else NO_IMAGE, fields)
    data = contents[members[image]]
    if isinstance(data, OSError):
        return failed_sample(sample_id, key, read_error(data), fields)
    return Sample(
        sample_id=sample_id,
        key=key,
        data=data,
        url=fields.url,
        caption=fields.caption,
        width=fields.width,
        height=fields.height,
        extra=fields.extra,
    )


def folder_samples(shard: Shard, sample_ids: Collection[str]) -> Shard:
    """The folder batch ``shard`` narrowed to the members whose sample ids are given (their
    order kept), so that reading a few images back does not read the whole batch."""
    prefix = shard.shard_id[: shard.shard_id.rfind("/") + 1]
    keep = [i for i, m in enumerate(shard.members) if prefix + clean_text(m) in sample_ids]
    captions = tuple(shard.captions[i] for i in keep) if shard.captions else ()
    return replace(shard, members=tuple(shard.members[i] for i in keep), captions=captions)


def read_folder(shard: Shard) -> Iterator[Sample]:
    """Yield one sample per file of a folder batch, in the batch's (sorted) order.

    The bytes are yielded whatever they hold: telling a corrupt image from a good one is the
    decoder's job, and a corrupt file must show up in the manifest as such. A file that cannot
    be read at all (deleted since discovery, no permission) becomes a failed sample, and so
    does a symlink that leads outside the source (it is not read). A member's caption
    (``shard.captions``: a caption file beside it, or a Hugging Face ``metadata.jsonl`` /
    ``.csv`` row naming it) is read with it; one that cannot be read leaves the caption empty
    and says why in the sample's metadata (``caption_error``).
    """
    fs, root = filesystem(shard.path)
    root = root.rstrip("/")
    # Folder batch ids are "part-00000" or "s1/part-00000": sample ids take the same prefix.
    prefix = shard.shard_id[: shard.shard_id.rfind("/") + 1]
    captions = shard.captions or ("",) * len(shard.members)
    tables: dict[str, dict[str, str] | OSError] = {}  # a metadata file, looked up once per batch
    with FileFetcher(fs, source_root(shard.source)) as fetcher:
        for chunk in chunks(list(zip(shard.members, captions, strict=True)), READ_CHUNK):
            files = [cap for _, cap in chunk if cap and not is_folder_metadata(cap)]
            for meta in sorted({cap for _, cap in chunk if is_folder_metadata(cap)} - set(tables)):
                tables[meta] = _metadata(fs, fetcher, f"{root}/{meta}")
            contents = iter(fetcher.read([f"{root}/{rel}" for rel, _ in chunk] + [f"{root}/{f}" for f in files]))
            images = [next(contents) for _ in chunk]
            texts = {f: next(contents) for f in files}
            for (rel, cap), data in zip(chunk, images, strict=True):
                key = clean_text(rel)  # the path as read stays raw; the id must be valid UTF-8
                sample_id = prefix + key
                if isinstance(data, OSError):
                    yield failed_sample(sample_id, key, read_error(data))
                    continue
                sample = Sample(sample_id=sample_id, key=key, data=data)
                found = tables[cap] if is_folder_metadata(cap) else texts.get(cap)
                if isinstance(found, OSError):
                    sample.extra["caption_error"] = f"{clean_text(cap)}: {read_error(found)}"
                elif isinstance(found, bytes):
                    sample.caption = decode_text(found).strip()
                elif isinstance(found, dict):
                    folder = cap.rpartition("/")[0]
                    sample.caption = found.get(posixpath.relpath(rel, folder) if folder else rel)
                yield sample


# A Hugging Face metadata file describes every batch below it (one at the root: all of them), so
# each process parses it once, keyed by its path and stamp, not once per batch of 1,000 images.
_PARSED: dict[tuple[str, str], dict[str, str]] = {}
_PARSED_LOCK = threading.Lock()
_PARSED_KEEP = 4


def _metadata(fs: fsspec.AbstractFileSystem, fetcher: FileFetcher, path: str) -> dict[str, str] | OSError:
    """``file_name -> caption`` of the metadata file ``path``, or why it cannot be read."""
    try:
        key: tuple[str, str] | None = (path, stamp(fs.info(path)))
    except Exception:  # gone, unreadable, a remote store's own error: the read below says why
        key = None
    with _PARSED_LOCK:
        if key is not None and key in _PARSED:
            return _PARSED[key]
    (data,) = fetcher.read([path])
    if isinstance(data, OSError):
        return data
    table = metadata_captions(data, path.endswith(".csv"))
    if key is not None:
        with _PARSED_LOCK:
            _PARSED[key] = table
            while len(_PARSED) > _PARSED_KEEP:
                _PARSED.pop(next(iter(_PARSED)))
    return table
