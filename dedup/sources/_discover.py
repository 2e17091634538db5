"""Turn what the user typed (paths, URLs) into a stable list of shards."""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dedup._types import Shard, ShardKind, source_prefix
from dedup.errors import ConfigError, SourceError
from dedup.sources._embeddings import discover_embedding_file, discover_embeddings, is_embedding_file
from dedup.sources._hf import hf_shard, is_hf_split
from dedup.sources._common import (
    open_input,
    ENVIRONMENT_ERRORS,
    IMAGE_EXTENSIONS,
    caption_file,
    clean_text,
    digest,
    filesystem,
    has_image_extension,
    has_url_column,
    image_column,
    is_hidden,
    is_http,
    is_local,
    is_sidecar_schema,
    outside,
    remote_reason,
    retried,
    split_name,
    stamp,
    url_of,
)

_SCHEMA_THREADS = 16
# What a parquet footer says the file is; "sidecar" is img2dataset's per-shard status table.
# "damaged": the footer cannot be read; the shard's reader reports it as a failed row.
_ParquetKind = ShardKind | Literal["sidecar", "damaged"] | None
_WHAT_WE_READ = (
    "img2dataset output (webdataset .tar, parquet, files), LAION metadata .parquet, "
    "clip-retrieval embeddings (img_emb/img_emb_K.npy + metadata/metadata_K.parquet), "
    "Hugging Face datasets (a save_to_disk folder, or its to_parquet export), "
    f"or image files ({', '.join(IMAGE_EXTENSIONS)})"
)


def discover(sources: Sequence[str], *, folder_batch: int = 1000) -> list[Shard]:
    """List the shards of ``sources``, in a stable order: sources as given, then by path.

    Each source is a local path, a ``file://`` URL or any fsspec URL (``s3://``, ``gs://``,
    ``http://`` ...), naming a folder or a single file. Over HTTP a folder is an index page
    (its links are the folder's entries), and each file's size and ``Last-Modified`` are
    asked for, so stamps change when files do. A folder may hold several kinds at
    once (say, tars and loose images) and is searched recursively; dot-files and dot-folders
    are skipped. ``shard_id`` is the shard's path relative to its source (``00000.tar``,
    ``00000`` for a files folder, ``part-00000`` for a batch of loose images), prefixed with
    ``s{index}/`` when several sources are given, so ids are unique in the run and stable
    across runs.

    Raises:
        SourceError: a source does not exist, cannot be read, or holds nothing we can read.
        MissingDependencyError: the URL's filesystem package (s3fs, gcsfs, ...) is missing.
        ConfigError: ``folder_batch`` is not positive.
    """
    if isinstance(sources, str):  # a str is a Sequence[str] too: one source, not one per letter
        sources = [sources]
    if folder_batch < 1:
        raise ConfigError(f"folder_batch must be at least 1, got {folder_batch}; hint: the default is 1000")
    if not sources:
        raise SourceError("no source given; hint: pass at least one folder, file or URL")
    shards: list[Shard] = []
    for index, source in enumerate(sources):
        prefix = source_prefix(index, len(sources))
        shards.extend(_discover_source(source, prefix, folder_batch))
    # Ids name checkpoint files and fill the manifest's shard column: both need valid UTF-8,
    # and a file name need not be (the path itself stays as the filesystem spells it).
    shards = [dataclasses.replace(s, shard_id=clean_text(s.shard_id)) for s in shards]
    _check_unique(shards)
    return shards


def _discover_source(source: str, prefix: str, folder_batch: int) -> list[Shard]:
    fs, root = filesystem(source)
    if root != "/":
        root = root.rstrip("/")
    try:
        info = fs.info(root)
    except FileNotFoundError as err:
        reason = remote_reason(err)
        if reason not in ("not found", "HTTP 404 Not Found", "HTTP 410 Gone"):  # a server that did not answer
            raise SourceError(f"cannot read source {source!r}: {reason}; hint: check the URL and that the server is up") from err
        raise SourceError(
            f"source {source!r} does not exist; hint: check the path (for a bucket URL, the "
            "bucket name and your credentials)"
        ) from err
    except Exception as err:  # any filesystem's failure (auth, network): one clean message
        raise SourceError(
            f"cannot read source {source!r}: {remote_reason(err)}; hint: check the URL, permissions and credentials"
        ) from err
    if info.get("type") != "directory" and is_http(fs) and str(info.get("mimetype", "")).startswith("text/html"):
        # HTTP has no folders: a page of links (a server's index of a folder) stands for one.
        if fs.isdir(root):
            info = {**info, "type": "directory"}
    if info.get("type") == "directory":
        shards = _discover_folder(fs, source, root, prefix, folder_batch)
    else:
        shards = _discover_file(fs, source, root, info, prefix)
    return sorted(shards, key=lambda shard: shard.shard_id)


def _discover_file(
    fs: fsspec.AbstractFileSystem, source: str, path: str, info: Mapping[str, Any], prefix: str
) -> list[Shard]:
    """A single file given as the source: a tar, a parquet, or one image."""
    name = posixpath.basename(path)
    lower = name.lower()
    if lower.endswith(".tar"):
        sidecar = _info_or_none(fs, path[: -len(".tar")] + ".parquet")
        return [_webdataset_shard(fs, source, path, prefix + name, info, sidecar)]
    if lower.endswith(".parquet"):
        kind = _parquet_kind(fs, path)
        if kind is None:
            raise SourceError(
                f"{source!r} is a parquet file without image bytes or a url column; "
                "hint: pass img2dataset parquet output or LAION metadata (URL, TEXT, ...)"
            )
        if kind == "sidecar":
            stem = path[: -len(".parquet")]
            if fs.exists(stem + ".tar") or fs.isdir(stem):
                raise SourceError(
                    f"{source!r} is img2dataset's sidecar of {posixpath.basename(stem)!r}, not a "
                    "shard of its own; hint: pass the img2dataset output folder (or the .tar) instead"
                )
            kind = ShardKind.I2D_PARQUET
        if kind == "damaged":
            kind = ShardKind.I2D_PARQUET
        return [Shard(source, url_of(fs, path), kind, prefix + name, stamp(info))]
    if has_image_extension(name):
        parent = posixpath.dirname(path)
        return [
            Shard(
                source,
                url_of(fs, parent),
                ShardKind.FOLDER,
                f"{prefix}part-00000",
                digest([name, stamp(info)]),
                (name,),
            )
        ]
    if is_embedding_file(name):
        return [discover_embedding_file(fs, source, path, info, prefix)]
    raise SourceError(f"{source!r} is not a file dedup can read; hint: pass a folder, or {_WHAT_WE_READ}")


def _discover_folder(
    fs: fsspec.AbstractFileSystem, source: str, root: str, prefix: str, folder_batch: int
) -> list[Shard]:
    """Classify one recursive listing of ``root`` into shards (no reads but parquet footers).

    Symlinks that leave the source (see ``_common.OUTSIDE_SOURCE``) are not classified, so no
    footer of theirs is read: the ones named like an input become members of a folder batch,
    whose reader turns them into failed samples without reading them.
    """
    files, dirs, escaping = _listing(fs, source, root)
    children: dict[str, list[str]] = {}
    for rel in files:
        parent, _, name = rel.rpartition("/")
        children.setdefault(parent, []).append(name)

    tars = {rel for rel in files if rel.lower().endswith(".tar")}
    tar_stems = {rel[: -len(".tar")] for rel in tars}
    parquets = sorted(rel for rel in files if rel.lower().endswith(".parquet"))
    sidecars: set[str] = set()
    files_dirs: set[str] = set()
    for rel in parquets:
        stem = rel[: -len(".parquet")]
        if stem in tar_stems:
            sidecars.add(rel)
        elif stem in dirs and posixpath.basename(stem).isdigit():
            sidecars.add(rel)
            files_dirs.add(stem)
    # clip-retrieval embeddings: their metadata parquets belong to them, not shards of their own.
    embedding_shards, embedding_metadata = discover_embeddings(fs, source, root, prefix, files)
    sidecars |= embedding_metadata
    # A files folder whose sidecar is gone still looks like one: NNNNN/ with key.jpg + key.json.
    root_name = posixpath.basename(root)
    for rel in ["", *dirs]:
        name = posixpath.basename(rel) if rel else root_name
        if name.isdigit() and _has_image_json_pair(children.get(rel, ())):
            files_dirs.add(rel)

    # Hugging Face save_to_disk splits: data-*.arrow listed in a state.json (a shard each).
    hf_dirs = sorted(rel for rel in ["", *dirs] if is_hf_split(set(children.get(rel, ()))))

    shards: list[Shard] = []
    for rel in hf_dirs:
        in_folder = {name: files[f"{rel}/{name}" if rel else name] for name in children.get(rel, ())}
        shards.append(hf_shard(fs, source, _join(root, rel), prefix + (rel or root_name), in_folder))
    for rel in sorted(tars):
        sidecar = files.get(rel[: -len(".tar")] + ".parquet")
        shards.append(_webdataset_shard(fs, source, _join(root, rel), prefix + rel, files[rel], sidecar))
    for rel in sorted(files_dirs):
        shards.append(_files_shard(fs, source, root, rel, root_name, prefix, files, children))
    shards.extend(_parquet_shards(fs, source, root, prefix, [p for p in parquets if p not in sidecars], files))
    shards.extend(embedding_shards)

    images = sorted(rel for rel in files if has_image_extension(rel) and rel.rpartition("/")[0] not in files_dirs)
    # Escaping links inside a files folder are reported by that folder's reader, escaping
    # sidecars by their tar's reader; the others are reported as members of a folder batch.
    images = sorted(
        images
        + [
            rel
            for rel in escaping
            if rel.rpartition("/")[0] not in files_dirs
            and not _is_sidecar_name(rel, tar_stems, dirs)
            and _looks_like_input(fs, root, rel)
        ]
    )
    infos = {**files, **escaping}
    for number, start in enumerate(range(0, len(images), folder_batch)):
        members = tuple(images[start : start + folder_batch])
        captions = tuple(caption_file(rel, files) for rel in members)
        captions = captions if any(captions) else ()
        # The stamp is the images': a caption is metadata, read with its image; editing one
        # later does not make the batch's pixels and embeddings be computed again.
        parts = [f"{rel}\0{stamp(infos[rel])}" for rel in members]
        shards.append(
            Shard(source, url_of(fs, root), ShardKind.FOLDER, f"{prefix}part-{number:05d}", digest(parts), members, captions)
        )
    if not shards:
        raise SourceError(
            f"found nothing to read in {source!r} ({len(files)} files); hint: dedup reads {_WHAT_WE_READ}"
        )
    return shards


def _listing(
    fs: fsspec.AbstractFileSystem, source: str, root: str
) -> tuple[dict[str, Mapping[str, Any]], set[str], dict[str, Mapping[str, Any]]]:
    """One recursive listing: ``({relative file path: info}, {relative dir path}, {relative
    path: info} of the symlinks that resolve outside root)``, hidden ones out.

    fsspec lists a symlink (to a file or a folder) as an entry of its own and never descends
    into a linked folder, so a link cycle cannot make the listing loop.
    """
    # Locally, an unreadable subfolder must fail loudly rather than vanish from the run.
    options: dict[str, Any] = {"on_error": "raise"} if is_local(fs) else {}
    try:
        entries: dict[str, Mapping[str, Any]] = fs.find(root, withdirs=True, detail=True, **options)
    except Exception as err:
        raise SourceError(f"cannot list {source!r}: {err}; hint: check permissions and credentials") from err
    base = root.rstrip("/") + "/"
    real_root = os.path.realpath(root) if is_local(fs) else None
    files: dict[str, Mapping[str, Any]] = {}
    dirs: set[str] = set()
    escaping: dict[str, Mapping[str, Any]] = {}
    for path, info in entries.items():
        path = path.rstrip("/")
        if not path.startswith(base):
            continue  # the root itself
        rel = path[len(base) :]
        if not rel or is_hidden(rel):
            continue
        if info.get("type") == "directory":
            dirs.add(rel)
        elif real_root is not None and info.get("islink") and outside(path, real_root):
            escaping[rel] = info
        else:
            files[rel] = info
    if not is_local(fs):
        _fill_stamps(fs, source, base, files)
    return files, dirs, escaping


def _fill_stamps(fs: fsspec.AbstractFileSystem, source: str, base: str, files: dict[str, Mapping[str, Any]]) -> None:
    """An HTTP index page lists names only: ask each file for its size and Last-Modified /
    ETag (one HEAD each, concurrently), so that a shard's stamp changes when its file does."""
    bare = [rel for rel, info in files.items() if info.get("size") is None]
    if not bare:
        return

    def info_of(rel: str) -> Mapping[str, Any]:
        try:
            return retried(lambda: fs.info(base + rel))
        except Exception:
            # Listed but not answering (a 404 or 500 for this one file): its read will fail
            # too and say why, as a failed row; the stamp without a size then changes as soon
            # as the file answers, so a rerun reads it again.
            return files[rel]

    with ThreadPoolExecutor(min(_SCHEMA_THREADS, len(bare))) as pool:
        found = list(pool.map(info_of, bare))
    files.update(zip(bare, found, strict=True))


def _is_sidecar_name(rel: str, tar_stems: set[str], dirs: set[str]) -> bool:
    stem = rel[: -len(".parquet")] if rel.lower().endswith(".parquet") else None
    return stem is not None and (stem in tar_stems or (stem in dirs and posixpath.basename(stem).isdigit()))


def _looks_like_input(fs: fsspec.AbstractFileSystem, root: str, rel: str) -> bool:
    """Whether an escaping symlink would have been read had it stayed inside: an image, a
    tar or parquet, or a folder (a linked folder of images must not vanish unnoticed)."""
    lower = rel.lower()
    if has_image_extension(rel) or lower.endswith((".tar", ".parquet")):
        return True
    return os.path.isdir(_join(root, rel))  # stat only, nothing read


def _has_image_json_pair(names: Iterable[str]) -> bool:
    """img2dataset's files layout: some ``key.json`` beside an image of the same key."""
    json_keys: set[str] = set()
    image_keys: set[str] = set()
    for name in names:
        key, field = split_name(name)
        if field == "json":
            json_keys.add(key)
        elif has_image_extension(name):
            image_keys.add(key)
    return not json_keys.isdisjoint(image_keys)


def _webdataset_shard(
    fs: fsspec.AbstractFileSystem,
    source: str,
    path: str,
    shard_id: str,
    info: Mapping[str, Any],
    sidecar: Mapping[str, Any] | None,
) -> Shard:
    """The stamp covers the sidecar too: replacing either file must recompute the shard."""
    shard_stamp = stamp(info) if sidecar is None else f"{stamp(info)}+{stamp(sidecar)}"
    return Shard(source, url_of(fs, path), ShardKind.WEBDATASET, shard_id, shard_stamp)


def _files_shard(
    fs: fsspec.AbstractFileSystem,
    source: str,
    root: str,
    rel: str,
    root_name: str,
    prefix: str,
    files: Mapping[str, Mapping[str, Any]],
    children: Mapping[str, list[str]],
) -> Shard:
    """An img2dataset files folder; its stamp digests every file in it plus the sidecar."""
    names = sorted(children.get(rel, ()))
    in_folder = [f"{rel}/{name}" if rel else name for name in names]
    parts = [f"{path}\0{stamp(files[path])}" for path in in_folder]
    # The sidecar sits beside the folder: outside the listing when the folder is the source.
    sidecar = files.get(f"{rel}.parquet") if rel else _info_or_none(fs, f"{root}.parquet")
    if sidecar is not None:
        parts.append(f"sidecar\0{stamp(sidecar)}")
    shard_id = prefix + (rel or root_name)
    return Shard(source, url_of(fs, _join(root, rel)), ShardKind.I2D_FILES, shard_id, digest(parts))


def _parquet_shards(
    fs: fsspec.AbstractFileSystem,
    source: str,
    root: str,
    prefix: str,
    parquets: list[str],
    files: Mapping[str, Mapping[str, Any]],
) -> list[Shard]:
    """Classify stand-alone parquet files, reading only the footers we must.

    ``NNNNN.parquet`` beside img2dataset's ``NNNNN_stats.json`` is img2dataset parquet output:
    no read needed, which matters for thousands of shards on an object store. The others have
    their footers read (concurrently when remote). Parquet files that are neither image nor
    metadata tables (embeddings, say) are not samples and are passed over.
    """
    kinds: dict[str, _ParquetKind] = {}
    to_inspect: list[str] = []
    for rel in parquets:
        if f"{rel[: -len('.parquet')]}_stats.json" in files:
            kinds[rel] = ShardKind.I2D_PARQUET
        else:
            to_inspect.append(rel)
    if to_inspect:
        paths = [_join(root, rel) for rel in to_inspect]
        if is_local(fs) or len(paths) == 1:
            found = [_parquet_kind(fs, p) for p in paths]
        else:
            with ThreadPoolExecutor(min(_SCHEMA_THREADS, len(paths))) as pool:
                found = list(pool.map(lambda p: _parquet_kind(fs, p), paths))
        kinds.update(zip(to_inspect, found, strict=True))
    shards: list[Shard] = []
    for rel in parquets:
        kind = kinds[rel]
        if kind is None:
            continue
        # An orphaned sidecar (its tar or folder gone): read as rows, every success lacks bytes.
        # A damaged footer: read as rows, which reports the damage as one failed row.
        shard_kind = ShardKind.I2D_PARQUET if kind in ("sidecar", "damaged") else ShardKind(kind)
        shards.append(Shard(source, url_of(fs, _join(root, rel)), shard_kind, prefix + rel, stamp(files[rel])))
    return shards


def _parquet_kind(fs: fsspec.AbstractFileSystem, path: str) -> _ParquetKind:
    """Read one footer: image bytes, img2dataset sidecar (``"sidecar"``), metadata, or None.

    A footer that cannot be parsed (a truncated download, a file that is not parquet) is
    ``"damaged"``: one bad file must not stop a run over thousands, so it becomes a shard whose
    reader yields a failed row saying so. A file that cannot be opened at all (permissions,
    network) is the environment failing, and stops the run with a clear error.
    """
    try:
        with open_input(fs, path) as fh:
            schema = pq.read_schema(fh)
    except ENVIRONMENT_ERRORS as err:
        raise SourceError(
            f"cannot read parquet file {url_of(fs, path)!r}: {err}; hint: check permissions and retry"
        ) from err
    except (pa.ArrowException, OSError, ValueError):
        return "damaged"
    if image_column(schema) is not None:
        return ShardKind.I2D_PARQUET
    if is_sidecar_schema(schema):
        return "sidecar"
    if has_url_column(schema):
        return ShardKind.LAION_METADATA
    return None


def _info_or_none(fs: fsspec.AbstractFileSystem, path: str) -> Mapping[str, Any] | None:
    try:
        info: Mapping[str, Any] = fs.info(path)
    except FileNotFoundError:
        return None
    return info


def _join(root: str, rel: str) -> str:
    if not rel:
        return root
    return f"{root.rstrip('/')}/{rel}"


def _check_unique(shards: list[Shard]) -> None:
    """Ids name checkpoints: a clash would silently share one. It takes odd names to get here
    (a folder named ``part-00000`` holding img2dataset files beside loose images)."""
    seen: set[str] = set()
    for shard in shards:
        if shard.shard_id in seen:
            raise SourceError(
                f"two shards would share the id {shard.shard_id!r}; hint: rename the folder or "
                "file of that name, or pass the parts as separate sources"
            )
        seen.add(shard.shard_id)
