"""``dedup apply``: write the samples a run keeps, in the input's own format, from the input.

A curator already holds the shards: downloading the keep list again would lose what link rot
took since. :func:`apply` reads ``OUT/manifest.parquet`` (which samples to keep) and the run's
index catalog (``OUT/index/shards.parquet``: which shard files they came from) and writes, under
``DEST``, the same tree with only the kept samples:

================================  ==========================================================
input (``ShardKind``)             written
================================  ==========================================================
webdataset ``NNNNN.tar``          ``NNNNN.tar`` (the kept samples' members, every extension,
                                  in their original order and with their original headers),
                                  the sidecar ``NNNNN.parquet`` (its kept rows) and
                                  ``NNNNN_stats.json`` (counts of what was written)
img2dataset ``parquet``           ``NNNNN.parquet`` (kept rows, images in their column) and
(and LAION metadata parquet)      ``NNNNN_stats.json``
img2dataset ``files``             ``NNNNN/`` (every file of each kept key), ``NNNNN.parquet``
                                  and ``NNNNN_stats.json``
image folder                      the kept images at their relative paths (copied, or hard
                                  links with ``link=True``) with their caption files, and
                                  Hugging Face ``metadata.jsonl`` / ``metadata.csv`` without
                                  the removed images' rows
================================  ==========================================================

Failed samples (download failures, undecodable images) are left out unless ``keep_failed``:
then whatever the input holds for them is written too (a failed download is a sidecar row).

It streams one shard at a time (a tar member, a parquet batch or a file at a time within it),
never writes under the input, and is resumable: each shard's files are written to temporary
names and moved into place, then a completion marker (``DEST/.dedup-apply/done/``) is written
last. A rerun skips the shards whose marker matches (same input stamp, same kept samples,
same options) and redoes the others; the bytes written depend only on the input and the
manifest, so an interrupted apply finished by a rerun gives the same bytes as one that ran
through.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup import __version__
from dedup._io import _HOST, atomic_path, atomic_write_bytes, atomic_write_text, make_out_dir, output_errors, remove_stale_temps
from dedup._progress import ProgressFactory, silent
from dedup._types import Shard, ShardKind
from dedup.errors import ConfigError, OutputError, SourceError
from dedup.store import IndexedShard, IndexUnreadableError, index_dir, index_lock, read_index
from dedup.sources import discover
from dedup.sources._common import (
    CAPTION_EXTENSIONS,
    ENVIRONMENT_ERRORS,
    FOLDER_METADATA,
    clean_text,
    column_values,
    filesystem,
    is_hidden,
    is_local,
    key_text,
    outside,
    scalar_columns,
    source_root,
    split_name,
)
from dedup.sources._hf import DICT as HF_DICT
from dedup.sources._hf import INFO as HF_INFO
from dedup.sources._hf import STATE as HF_STATE
from dedup.sources._parquet import RowCounter, row_id
from dedup.sources._webdataset import DAMAGE_ERRORS, GroupIds, member_key, sidecar_path

STATE_DIR = ".dedup-apply"  # hidden: `dedup run DEST` and img2dataset readers pass it over
_DONE = "done"
_STAGING = "staging"
_STAMP = "apply.json"
_LOCK = ".lock"
_MANIFEST_COLUMNS = ["sample_id", "shard", "status", "keep"]
_BATCH_ROWS = 1024
_CODECS = frozenset({"none", "snappy", "gzip", "brotli", "lz4", "zstd"})  # what pyarrow writes
# Bump when what apply writes for the same input changes: markers of older applies then redo.
_WRITER_VERSION = 1
_WRITABLE = frozenset(
    {
        ShardKind.WEBDATASET,
        ShardKind.I2D_PARQUET,
        ShardKind.LAION_METADATA,
        ShardKind.I2D_FILES,
        ShardKind.FOLDER,
        ShardKind.HF_DATASET,
    }
)


class ApplyError(SourceError):
    """The run's outputs and its input no longer agree (a shard changed or vanished since)."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    dest: Path
    shards: int  # shards of the run
    written_shards: int  # written by this call
    skipped_shards: int  # already done by an earlier call (their markers matched)
    samples: int  # samples of the run (manifest rows)
    kept: int  # samples written (over all shards, including skipped ones)
    dropped_duplicates: int
    dropped_failed: int


@dataclass(slots=True)
class _Decision:
    """What to write of one shard: the sample ids, and the counts for its stats."""

    keep: set[str] = field(default_factory=set)
    rows: int = 0
    duplicates: int = 0
    failed: int = 0
    failed_kept: int = 0

    def digest(self, shard: Shard, options: dict[str, Any]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([_WRITER_VERSION, shard.shard_id, shard.stamp, options], sort_keys=True).encode())
        for sample_id in sorted(self.keep):
            h.update(b"\0" + sample_id.encode("utf-8", "surrogatepass"))
        return h.hexdigest()


@output_errors("dest")  # a full disk or read-only DEST: OutputError, not a traceback
def apply(
    out: str | Path,
    dest: str | Path,
    *,
    keep_failed: bool = False,
    link: bool = False,
    progress: ProgressFactory | None = None,
) -> ApplyResult:
    """Write the samples the run in ``out`` keeps into ``dest``, in the input's own format.

    ``keep_failed``: also write the failed samples (what the input holds for them); by default
    they are left out with the duplicates. ``link``: hard-link loose files (img2dataset
    ``files`` output, image folders) instead of copying them; ``dest`` must then be on the
    input's file system. Tars and parquet files are always written anew (they hold fewer
    samples). Rerunning resumes: finished shards are skipped.

    Raises:
        IndexUnreadableError: ``out`` holds no finished run.
        ApplyError: the input changed since the run (rerun ``dedup run``, then apply).
        ConfigError: ``dest`` is the input or inside it (or the other way round), or the run
            holds inputs apply cannot write (clip-retrieval embeddings).
        OutputError: ``dest`` cannot be written, or holds something apply did not write.
    """
    out_dir = Path(out)
    dest_dir = Path(dest)
    prog = progress or silent
    manifest_path = out_dir / "manifest.parquet"
    index = index_dir(out_dir)
    if not index.is_dir() or not manifest_path.is_file():
        raise IndexUnreadableError(
            f"{out_dir} holds no finished run (no manifest.parquet and index/); hint: pass the --out "
            f"folder of `dedup run`, or run it first: dedup run SOURCE --out {out_dir}"
        )
    with index_lock(index, exclusive=False):  # an `index add` must not rewrite the manifest meanwhile
        snapshot = read_index(index)
        catalog = snapshot.catalog
        shards = [e.shard for e in catalog.shards]
        _check_writable(shards)
        _check_dest(dest_dir, out_dir, [s.source for s in catalog.sources])
        _check_unchanged(catalog.shards, [s.source for s in catalog.sources], snapshot.config.folder_batch)
        with _dest_lock(dest_dir):
            return _apply(manifest_path, catalog.shards, dest_dir, keep_failed=keep_failed, link=link, progress=prog)


def _apply(
    manifest: Path,
    entries: Sequence[IndexedShard],
    dest: Path,
    *,
    keep_failed: bool,
    link: bool,
    progress: ProgressFactory,
) -> ApplyResult:
    options = {"keep_failed": keep_failed, "link": link}
    done = dest / STATE_DIR / _DONE
    done.mkdir(parents=True, exist_ok=True)
    totals = {"samples": 0, "kept": 0, "duplicates": 0, "failed": 0, "written": 0, "skipped": 0}
    folders: dict[tuple[str, str], _FolderTree] = {}  # (root, prefix): its images, kept or not
    with progress("apply", len(entries), "shard") as bar:
        for entry, decision in _decisions(manifest, entries, keep_failed=keep_failed):
            shard = entry.shard
            if shard.kind is ShardKind.FOLDER:
                folders.setdefault((shard.path, _folder_prefix(shard)), _FolderTree()).add(shard, decision)
            totals["samples"] += decision.rows
            totals["kept"] += len(decision.keep)
            totals["duplicates"] += decision.duplicates
            totals["failed"] += decision.failed - decision.failed_kept
            digest = decision.digest(shard, options)
            marker = done / f"{quote(shard.shard_id, safe='')}.json"
            if _marker_matches(marker, digest) and _outputs_present(shard, decision, dest):
                totals["skipped"] += 1
            else:
                _write_shard(shard, decision, dest, link=link)
                body = {"shard_id": shard.shard_id, "digest": digest, "kept": len(decision.keep)}
                atomic_write_text(marker, json.dumps(body, sort_keys=True) + "\n")  # last: the shard is done
                totals["written"] += 1
            bar.update(1)
            bar.set_postfix_str(f"{totals['kept']} kept")
    for (root, prefix), tree in sorted(folders.items()):
        _write_folder_metadata(root, prefix, tree, dest)
    return ApplyResult(
        dest=dest,
        shards=len(entries),
        written_shards=totals["written"],
        skipped_shards=totals["skipped"],
        samples=totals["samples"],
        kept=totals["kept"],
        dropped_duplicates=totals["duplicates"],
        dropped_failed=totals["failed"],
    )


def _outputs_present(shard: Shard, decision: _Decision, dest: Path) -> bool:
    """A marker whose files were deleted since (by hand, a cleaned disk) does not count."""
    if shard.kind is ShardKind.FOLDER:
        prefix = shard.shard_id[: shard.shard_id.rfind("/") + 1]
        return all((dest / (prefix + rel)).is_file() for rel in shard.members if prefix + clean_text(rel) in decision.keep)
    return (dest / shard.shard_id).exists()


def _marker_matches(marker: Path, digest: str) -> bool:
    try:
        body = json.loads(marker.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(body, dict) and body.get("digest") == digest


# --------------------------------------------------------------------------------------------
# Checks before anything is written
# --------------------------------------------------------------------------------------------


def _check_writable(shards: Sequence[Shard]) -> None:
    kinds = sorted({s.kind.value for s in shards if s.kind not in _WRITABLE})
    if kinds:
        raise ConfigError(
            f"apply cannot write {', '.join(kinds)} inputs; hint: filter them with OUT/keep.parquet "
            "or OUT/remove.parquet (see README: \"Applying the result\")"
        )


def _check_dest(dest: Path, out: Path, sources: Sequence[str]) -> None:
    """``dest`` must be neither an input (nor inside or around one) nor the run's own folder."""
    real = os.path.realpath(dest)
    if real == os.path.realpath(out):
        raise ConfigError(f"--to {dest} is the run's output folder; hint: pick a new folder, e.g. {out}-applied")
    for source in sources:
        root = source_root(source)
        if root is None:
            continue  # a remote input: nothing local to clash with
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep) or root.startswith(real.rstrip(os.sep) + os.sep):
            raise ConfigError(
                f"--to {dest} overlaps the input {source!r}; hint: apply never writes where it reads: "
                "pick a folder outside the input"
            )


def _check_unchanged(entries: Sequence[IndexedShard], sources: Sequence[str], folder_batch: int) -> None:
    """Every shard the run read is still there with the same stamp (rediscovered, as a rerun
    would): writing from a changed input would not be the run's decisions."""
    several = len(sources) > 1
    current: dict[str, Shard] = {}
    for i, source in enumerate(sources):
        prefix = f"s{i}/" if several else ""
        try:
            found = discover([source], folder_batch=folder_batch)
        except SourceError as err:
            raise ApplyError(f"{err}; hint: apply reads the run's input again, where the run read it") from None
        for shard in found:
            current[prefix + shard.shard_id] = shard
    for entry in entries:
        shard = entry.shard
        now = current.get(shard.shard_id)
        if now is None or now.stamp != shard.stamp or now.members != shard.members:
            what = "is gone" if now is None else "changed"
            raise ApplyError(
                f"shard {shard.shard_id!r} of {shard.source!r} {what} since the run; hint: rerun "
                "`dedup run` on the same --out (it resumes), then apply"
            )


@contextmanager
def _dest_lock(dest: Path) -> Iterator[None]:
    """Prepare ``dest`` and hold its lock: one apply at a time; leftovers of killed ones go."""
    make_out_dir(dest)
    state = dest / STATE_DIR
    stamp = state / _STAMP
    # Only our state folder (a kill before its stamp was written) counts as empty.
    if any(p.name != STATE_DIR for p in dest.iterdir()) and not stamp.is_file():
        raise OutputError(
            f"--to {dest} is not empty and was not written by dedup apply; hint: pick a new or empty folder"
        )
    state.mkdir(exist_ok=True)
    fd = os.open(state / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another dedup apply is writing to {dest}; hint: wait for it to finish") from None
        remove_stale_temps(dest)
        shutil.rmtree(state / _STAGING, ignore_errors=True)  # half-built folders of a killed apply
        if not stamp.is_file():
            atomic_write_text(stamp, json.dumps({"tool": "dedup apply", "version": __version__}) + "\n")
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Which samples of each shard to write
# --------------------------------------------------------------------------------------------


def _decisions(
    manifest: Path, entries: Sequence[IndexedShard], *, keep_failed: bool
) -> Iterator[tuple[IndexedShard, _Decision]]:
    """Each shard with its decision, streaming the manifest (in index order: each shard's rows
    are the next ``entry.rows`` rows, as the catalog counts them)."""
    parquet = pq.ParquetFile(manifest)
    batches = parquet.iter_batches(batch_size=1 << 16, columns=_MANIFEST_COLUMNS)
    pending: pa.Table = pa.schema([parquet.schema_arrow.field(c) for c in _MANIFEST_COLUMNS]).empty_table()
    position = 0
    for entry in entries:
        while pending.num_rows - position < entry.rows:
            batch = next(batches, None)
            if batch is None:
                raise ApplyError(_mismatch(manifest, entry))
            pending = pa.concat_tables([pending.slice(position), pa.Table.from_batches([batch])])
            position = 0
        rows = pending.slice(position, entry.rows)
        position += entry.rows
        yield entry, _decide(manifest, entry, rows, keep_failed=keep_failed)
    if pending.num_rows - position or next(batches, None) is not None:
        raise ApplyError(_mismatch(manifest, None))


def _decide(manifest: Path, entry: IndexedShard, rows: pa.Table, *, keep_failed: bool) -> _Decision:
    shards = rows.column("shard")
    if rows.num_rows and pc.any(pc.not_equal(shards, pa.scalar(entry.shard.shard_id))).as_py():
        raise ApplyError(_mismatch(manifest, entry))
    failed = pc.fill_null(pc.not_equal(rows.column("status"), "ok"), True)
    keep = pc.fill_null(rows.column("keep"), False)
    chosen = pc.or_(keep, failed) if keep_failed else keep
    decision = _Decision(rows=rows.num_rows)
    decision.keep = set(rows.column("sample_id").filter(chosen).to_pylist())
    n_failed = int(pc.sum(failed).as_py() or 0)
    decision.failed = n_failed
    decision.failed_kept = n_failed if keep_failed else 0
    decision.duplicates = rows.num_rows - n_failed - int(pc.sum(keep).as_py() or 0)
    return decision


def _mismatch(manifest: Path, entry: IndexedShard | None) -> str:
    where = f" at shard {entry.shard.shard_id!r}" if entry is not None else ""
    return (
        f"{manifest} does not match the run's index{where}; hint: the output folder is damaged or "
        "half-updated: rerun `dedup run` on it (it resumes), then apply"
    )


# --------------------------------------------------------------------------------------------
# Writers, one per input kind
# --------------------------------------------------------------------------------------------


def _write_shard(shard: Shard, decision: _Decision, dest: Path, *, link: bool) -> None:
    if shard.kind is ShardKind.WEBDATASET:
        _write_webdataset(shard, decision, dest)
    elif shard.kind in (ShardKind.I2D_PARQUET, ShardKind.LAION_METADATA):
        _write_parquet(shard, decision, dest)
    elif shard.kind is ShardKind.I2D_FILES:
        _write_files(shard, decision, dest, link=link)
    elif shard.kind is ShardKind.FOLDER:
        _write_folder(shard, decision, dest, link=link)
    elif shard.kind is ShardKind.HF_DATASET:
        _write_hf_split(shard, decision, dest)
    else:  # _check_writable stops these before anything is written
        raise ConfigError(f"apply cannot write {shard.kind.value} inputs")


def _target(dest: Path, relative: str) -> Path:
    """``dest/relative``, refusing a name that would leave ``dest`` (ids come from the run's
    files, which could have been edited)."""
    path = dest / relative
    root = os.path.abspath(dest)
    if relative.startswith("/") or not os.path.abspath(path).startswith(root.rstrip(os.sep) + os.sep):
        raise ApplyError(f"the run names a shard {relative!r} outside --to; hint: rerun `dedup run`")
    return path


def _open(shard: Shard, path: str) -> IO[bytes]:
    fs, p = filesystem(path)
    try:
        return fs.open(p, "rb")  # type: ignore[no-any-return]
    except ENVIRONMENT_ERRORS as err:
        raise ApplyError(f"cannot open {path!r} of shard {shard.shard_id!r}: {err}; hint: check the input") from err


def _missing(shard: Shard, decision: _Decision, written: set[str]) -> None:
    """Every kept sample must have been found where the run read it. (With failed samples
    kept, some have nothing to write, a damaged tar's ``<damaged>`` row say: not checked.)"""
    lost = decision.keep - written
    if lost and not decision.failed_kept:
        example = sorted(lost)[0]
        raise ApplyError(
            f"{len(lost)} kept samples of shard {shard.shard_id!r} are not in it (e.g. {example!r}); "
            "hint: the input changed since the run: rerun `dedup run`, then apply"
        )


def _write_webdataset(shard: Shard, decision: _Decision, dest: Path) -> None:
    """The tar with the kept groups' members, byte for byte and header for header; then the
    sidecar's kept rows and the stats."""
    target = _target(dest, shard.shard_id)
    written: set[str] = set()
    ids = GroupIds(shard.shard_id)
    with _open(shard, shard.path) as src, atomic_path(target) as tmp, open(tmp, "wb") as raw:
        # PAX, like Python's tarfile and webdataset's TarWriter; the members' own headers (name,
        # mtime, mode, owner, pax records) are written as read, so the bytes depend on the input.
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
            key: str | None = None
            take = False
            try:
                with tarfile.open(fileobj=src, mode="r|*") as tar:
                    while (member := tar.next()) is not None:
                        tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every TarInfo
                        if not member.isfile():
                            continue  # the reader passes links, folders and devices over too
                        raw_key = member_key(member)
                        if raw_key != key:
                            key = raw_key
                            sample_id, _ = ids.next(raw_key)
                            take = sample_id in decision.keep
                            if take:
                                written.add(sample_id)
                        if take:
                            out.addfile(member, tar.extractfile(member))
            except DAMAGE_ERRORS:
                pass  # the run saw the same damage: what follows it are failed rows
    listed = _write_sidecar(shard, sidecar_path(shard.path), decision, sidecar_path(str(target)))
    _missing(shard, decision, written)
    _write_stats(shard, shard.path[: -len(".tar")], target.with_name(target.name[: -len(".tar")]), decision, listed or written)


def _write_sidecar(shard: Shard, source: str, decision: _Decision, target: str) -> set[str]:
    """img2dataset's sidecar ``source`` with only the rows of samples written, in its order and
    with its schema; returns the sample ids it lists. No sidecar in, none out."""
    fs, path = filesystem(source)
    try:
        if not fs.exists(path):
            return set()
        with fs.open(path, "rb") as fh:
            table = pq.read_table(fh)
    except ENVIRONMENT_ERRORS as err:
        raise ApplyError(f"cannot read {source!r}: {err}; hint: check the input") from err
    except (pa.ArrowException, OSError, ValueError):
        return set()  # the run reported it unreadable (a failed `<sidecar>` row): none out
    if "key" not in table.column_names:
        return set()
    prefix = shard.shard_id
    ids = [None if k is None else f"{prefix}/{k}" for k in (key_text(v) for v in column_values(table.column("key")))]
    mask = [i is not None and i in decision.keep for i in ids]
    with atomic_path(Path(target)) as tmp:
        pq.write_table(table.filter(pa.array(mask, pa.bool_())), tmp, compression=_codec_of_table_file(fs, path))
    return {i for i, m in zip(ids, mask, strict=True) if m and i is not None}


def _codec_of_table_file(fs: Any, path: str) -> str:
    """The input's compression (its first column chunk's), so the output is written alike."""
    try:
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            if meta.num_row_groups and meta.num_columns:
                codec = str(meta.row_group(0).column(0).compression).lower()
                codec = {"uncompressed": "none", "lz4_raw": "lz4"}.get(codec, codec)
                if codec in _CODECS:
                    return codec
    except (pa.ArrowException, OSError, ValueError):
        pass
    return "snappy"


def _write_stats(shard: Shard, source_stem: str, target_stem: Path, decision: _Decision, written: set[str]) -> None:
    """``NNNNN_stats.json`` as img2dataset writes it, its counts those of the written shard, and
    what apply took out under ``dedup_apply``. The input's other fields (timings) are kept."""
    fs, path = filesystem(source_stem + "_stats.json")
    stats: dict[str, Any] = {}
    try:
        with fs.open(path, "rb") as fh:
            loaded = json.loads(fh.read())
        if isinstance(loaded, dict):
            stats = loaded
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        stats = {}
    status_dict: dict[str, int] = {}
    successes = len(written)
    sidecar = Path(str(target_stem) + ".parquet")
    if sidecar.is_file() and "status" in pq.read_schema(sidecar).names:
        # img2dataset's parquet output is its own sidecar: read the status column alone.
        values = [str(v) for v in pq.read_table(sidecar, columns=["status"]).column(0).to_pylist()]
        if values:
            successes = values.count("success")
            for v in values:
                status_dict[v] = status_dict.get(v, 0) + 1
    count = len(written)
    stats.update(
        {
            "count": count,
            "successes": successes,
            "failed_to_download": status_dict.get("failed_to_download", 0),
            "failed_to_resize": status_dict.get("failed_to_resize", 0),
            "status_dict": dict(sorted(status_dict.items())),
            "dedup_apply": {
                "input_samples": decision.rows,
                "written": len(decision.keep),
                "dropped_duplicates": decision.duplicates,
                "dropped_failed": decision.failed - decision.failed_kept,
            },
        }
    )
    atomic_write_text(Path(str(target_stem) + "_stats.json"), json.dumps(stats, indent=4, sort_keys=True) + "\n")


def _write_parquet(shard: Shard, decision: _Decision, dest: Path) -> None:
    """The kept rows of a parquet shard (images in their column), schema and order kept."""
    target = _target(dest, shard.shard_id)
    written: set[str] = set()
    fs, path = filesystem(shard.path)
    codec = _codec_of_table_file(fs, path)
    with _open(shard, shard.path) as fh:
        try:
            parquet = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError, ValueError):
            return  # a damaged footer: the run read no row of it (one failed <damaged> row)
        schema = parquet.schema_arrow
        has_key = "key" in scalar_columns(schema)
        seen: set[str] = set()
        row_index = 0
        with atomic_path(target) as tmp, pq.ParquetWriter(tmp, schema, compression=codec) as writer:
            try:
                for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
                    keys = column_values(batch.column("key")) if has_key else [None] * batch.num_rows
                    mask = []
                    for value in keys:
                        sample_id, _ = row_id(shard.shard_id, key_text(value), row_index, seen if has_key else None)
                        row_index += 1
                        mask.append(sample_id in decision.keep)
                        if mask[-1]:
                            written.add(sample_id)
                    if any(mask):
                        writer.write_batch(batch.filter(pa.array(mask, pa.bool_())))
            except (pa.ArrowException, OSError, ValueError):
                pass  # damaged part-way: the run has a failed <damaged> row for the rest
    _missing(shard, decision, written)
    if shard.kind is ShardKind.I2D_PARQUET:
        stem = shard.path[: -len(".parquet")] if shard.path.endswith(".parquet") else shard.path
        _write_stats(shard, stem, target.with_name(target.name.rsplit(".", 1)[0]), decision, written)


def _write_files(shard: Shard, decision: _Decision, dest: Path, *, link: bool) -> None:
    """An img2dataset ``files`` folder: every file of each kept key, built in a staging folder
    and moved into place; then the sidecar beside it and the stats."""
    target = _target(dest, shard.shard_id)
    fs, path = filesystem(shard.path)
    confine = source_root(shard.source)
    staging = dest / STATE_DIR / _STAGING / quote(shard.shard_id, safe="")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        entries = []
    except ENVIRONMENT_ERRORS as err:
        raise ApplyError(f"cannot list {shard.path!r}: {err}; hint: check the input") from err
    written: set[str] = set()
    for entry in sorted(entries, key=lambda e: e["name"]):
        if entry.get("type") != "file" and not entry.get("islink"):
            continue
        name = entry["name"].rstrip("/").rpartition("/")[2]
        if is_hidden(name):
            continue
        sample_id = f"{shard.shard_id}/{clean_text(split_name(name)[0])}"
        if sample_id not in decision.keep:
            continue
        if confine is not None and is_local(fs) and outside(entry["name"], confine):
            continue  # a link leaving the input is never read (the run failed that sample)
        _place(fs, entry["name"], staging / name, link=link)
        written.add(sample_id)
    _swap_in(staging, target, dest)
    listed = _write_sidecar(shard, path.rstrip("/") + ".parquet", decision, str(target) + ".parquet")
    _missing(shard, decision, written)
    _write_stats(shard, shard.path.rstrip("/"), target, decision, listed or written)


# Files beside an image that belong to it (``cat.jpg`` + ``cat.txt``): the captions a run reads
# (:data:`~dedup.sources._common.CAPTION_EXTENSIONS`), tag lists and per-image JSON of
# fine-tuning folders. They go with a kept image and stay behind with a removed one.
FOLDER_SIDECARS = (*CAPTION_EXTENSIONS, ".tags", ".json")


def _folder_prefix(shard: Shard) -> str:
    """Where a folder batch's tree goes under DEST: ``""``, or ``s<i>/`` in a run of several sources."""
    return shard.shard_id[: shard.shard_id.rfind("/") + 1]


def _write_folder(shard: Shard, decision: _Decision, dest: Path, *, link: bool) -> None:
    """A batch of a plain image folder: each kept file at its relative path, one at a time,
    with its sidecars (:data:`FOLDER_SIDECARS`: same name, another extension)."""
    fs, root = filesystem(shard.path)
    root = root.rstrip("/")
    confine = source_root(shard.source)
    prefix = _folder_prefix(shard)
    written: set[str] = set()
    listings: dict[str, set[str]] = {}  # a folder's file names, listed once per batch
    for rel in shard.members:
        sample_id = prefix + clean_text(rel)
        if sample_id not in decision.keep:
            continue
        source = f"{root}/{rel}"
        if confine is not None and is_local(fs) and outside(source, confine):
            continue  # never read (the run failed it: symlink outside source)
        _copy_one(fs, source, _target(dest, prefix + rel), link=link)
        for side in _sidecars(fs, root, rel, listings):
            side_source = f"{root}/{side}"
            if confine is not None and is_local(fs) and outside(side_source, confine):
                continue
            _copy_one(fs, side_source, _target(dest, prefix + side), link=link)
        written.add(sample_id)
    _missing(shard, decision, written)


# Hugging Face ``imagefolder`` metadata (:data:`dedup.sources._common.FOLDER_METADATA`): a file
# of this name describes the images in its folder and below, one row each, naming its image by
# ``file_name`` (or ``<column>_file_name``) relative to the metadata file's folder.


@dataclass(slots=True)
class _FolderTree:
    """One image folder of the run: its images (relative paths) and those apply writes."""

    images: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)

    def add(self, shard: Shard, decision: _Decision) -> None:
        prefix = _folder_prefix(shard)
        for rel in shard.members:
            self.images.add(rel)
            if prefix + clean_text(rel) in decision.keep:
                self.kept.add(rel)


def _write_folder_metadata(root_url: str, prefix: str, tree: _FolderTree, dest: Path) -> None:
    """Each ``metadata.jsonl`` / ``metadata.csv`` of an image folder (in a folder holding its
    images or above them), written under DEST with the rows of the removed images left out.

    A row stays when none of its ``file_name`` columns names an image of the run that apply
    left out (rows naming other files, audio say, stay as they are). JSON lines are copied
    byte for byte; CSV rows are written back by the ``csv`` module under the same header.
    Written anew by every apply (a rerun too), atomically.
    """
    fs, root = filesystem(root_url)
    root = root.rstrip("/")
    folders = {""}
    for rel in tree.images:
        parts = rel.split("/")[:-1]
        folders.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    for folder in sorted(folders):
        for name in FOLDER_METADATA:
            rel = f"{folder}/{name}" if folder else name
            source = f"{root}/{rel}"
            try:
                if not fs.isfile(source):
                    continue
                with fs.open(source, "rb") as fh:
                    data = fh.read()
            except ENVIRONMENT_ERRORS as err:
                raise ApplyError(f"cannot read {source!r}: {err}; hint: check the input") from err

            def left_out(file_name: object, folder: str = folder) -> bool:
                if not isinstance(file_name, str) or not file_name:
                    return False
                image = posixpath.normpath(f"{folder}/{file_name}" if folder else file_name)
                return image in tree.images and image not in tree.kept

            body = _filter_jsonl(source, data, left_out) if name.endswith(".jsonl") else _filter_csv(source, data, left_out)
            atomic_write_bytes(_target(dest, prefix + rel), body)


def _file_name_columns(names: Sequence[str]) -> list[str]:
    return [n for n in names if n == "file_name" or n.endswith("_file_name")]


def _filter_jsonl(source: str, data: bytes, left_out: Any) -> bytes:
    kept: list[bytes] = []
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApplyError(f"{source!r} line {number} is not JSON ({err}); hint: fix the line, then rerun apply (it resumes)") from None
        names = _file_name_columns(list(row)) if isinstance(row, dict) else []
        if not any(left_out(row[n]) for n in names):
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    return b"".join(kept)


def _filter_csv(source: str, data: bytes, left_out: Any) -> bytes:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ApplyError(f"{source!r} is not UTF-8 text ({err}); hint: save it as UTF-8, then rerun apply") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return b""
    header, body = rows[0], rows[1:]
    named = set(_file_name_columns(header))
    columns = [k for k, n in enumerate(header) if n in named]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(r for r in body if not any(k < len(r) and left_out(r[k]) for k in columns))
    return buf.getvalue().encode("utf-8")


def _copy_one(fs: Any, source: str, target: Path, *, link: bool) -> None:
    if link:
        # Not through atomic_path: it chmods and fsyncs its file, which a hard link shares
        # with the input.
        tmp = target.with_name(f".{target.name}.{_HOST}-{os.getpid()}.hardlink.tmp")  # a killed one's goes on rerun
        tmp.unlink(missing_ok=True)
        _place(fs, source, tmp, link=True)
        os.replace(tmp, target)
    else:
        with atomic_path(target) as tmp:
            tmp.unlink()
            _place(fs, source, tmp, link=False)


def _sidecars(fs: Any, root: str, rel: str, listings: dict[str, set[str]]) -> list[str]:
    """The relative paths of ``rel``'s sidecars that exist (its folder is listed once)."""
    folder, _, name = rel.rpartition("/")
    if folder not in listings:
        where = f"{root}/{folder}" if folder else root
        try:
            listings[folder] = {
                e["name"].rstrip("/").rpartition("/")[2] for e in fs.ls(where, detail=True) if e.get("type") == "file" or e.get("islink")
            }
        except FileNotFoundError:
            listings[folder] = set()
        except ENVIRONMENT_ERRORS as err:
            raise ApplyError(f"cannot list {where!r}: {err}; hint: check the input") from err
    stem = name.rpartition(".")[0] or name
    names = listings[folder]
    return [f"{folder}/{stem}{ext}" if folder else f"{stem}{ext}" for ext in FOLDER_SIDECARS if f"{stem}{ext}" in names]


def _place(fs: Any, source: str, target: Path, *, link: bool) -> None:
    """Copy ``source`` to the new file ``target`` (mode and mtime kept), or hard-link it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        if not is_local(fs):
            raise ConfigError("--link needs a local input; hint: drop --link to copy")
        try:
            os.link(source, target)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise OutputError(
                    f"cannot hard-link {source} into {target.parent}: {err.strerror}; hint: --link needs "
                    "--to on the input's file system; drop --link to copy"
                ) from None
            raise
        return
    if is_local(fs):
        shutil.copy2(source, target)
    else:
        fs.get_file(source, str(target))


def _swap_in(staging: Path, target: Path, dest: Path) -> None:
    """Move the finished folder ``staging`` to ``target``, replacing an older one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        old = dest / STATE_DIR / _STAGING / (quote(target.name, safe="") + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _write_hf_split(shard: Shard, decision: _Decision, dest: Path) -> None:
    """A ``save_to_disk`` split: its Arrow files with the kept rows (same names, schema and
    feature metadata), ``dataset_info.json`` as it was and ``state.json`` with a fingerprint
    of its own (``datasets`` names its caches after it); the ``dataset_dict.json`` of a
    ``DatasetDict`` beside the split folders. ``datasets.load_from_disk`` reads the result."""
    target = _target(dest, shard.shard_id)
    fs, folder = filesystem(shard.path)
    staging = dest / STATE_DIR / _STAGING / quote(shard.shard_id, safe="")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counter = RowCounter()
    written: set[str] = set()
    for name in shard.members:
        with _open(shard, f"{shard.path.rstrip('/')}/{name}") as fh:
            try:
                reader = pa.ipc.open_stream(fh)
            except (pa.ArrowException, OSError, ValueError):
                continue  # damaged from the start: the run read no row of it
            has_key = "key" in scalar_columns(reader.schema)
            with open(staging / name, "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
                try:
                    for batch in reader:
                        keys = column_values(batch.column("key")) if has_key else [None] * batch.num_rows
                        mask = []
                        for value in keys:
                            sample_id, _ = row_id(shard.shard_id, key_text(value), counter.index, counter.seen if has_key else None)
                            counter.index += 1
                            mask.append(sample_id in decision.keep)
                            if mask[-1]:
                                written.add(sample_id)
                        writer.write_batch(batch.filter(pa.array(mask, pa.bool_())))
                except (pa.ArrowException, OSError, ValueError):
                    pass  # damaged part-way: the run has a failed <damaged> row for the rest
    _missing(shard, decision, written)
    for name in (HF_INFO, HF_STATE):
        try:
            with fs.open(f"{folder.rstrip('/')}/{name}", "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        if name == HF_STATE:
            state = json.loads(data)
            old = str(state.get("_fingerprint", ""))
            state["_fingerprint"] = hashlib.sha256(f"{old}\0{decision.digest(shard, {})}".encode()).hexdigest()[:16]
            data = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        (staging / name).write_bytes(data)
    _swap_in(staging, target, dest)
    # A DatasetDict: its dataset_dict.json sits beside the split folders, inside the input
    # (never read above a split folder given as the source itself).
    _, source_path = filesystem(shard.source)
    if source_path.rstrip("/") == folder.rstrip("/"):
        return
    parent = posixpath.dirname(folder.rstrip("/"))
    try:
        with fs.open(f"{parent}/{HF_DICT}", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return
    atomic_write_bytes(target.parent / HF_DICT, data)
