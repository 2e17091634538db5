"""Helpers shared by the readers: filesystems, stamps, metadata mapping, sidecar parquet.

Every reader maps its metadata (a webdataset ``.json``, a parquet row, a sidecar row) through
:func:`map_fields`, so the same column means the same thing whatever the input format.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dedup._types import Sample
from dedup.errors import MissingDependencyError, SourceError, missing_dependency

# In the order a reader prefers them when one sample has several (img2dataset writes one of the
# first four, as ``encode_format``).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_IMAGE_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)

# Candidate names, first present wins: img2dataset writes lowercase, LAION metadata uppercase.
_URL_FIELDS = ("url", "URL")
_CAPTION_FIELDS = ("caption", "TEXT", "text", "txt")
_WIDTH_FIELDS = ("width", "WIDTH")
_HEIGHT_FIELDS = ("height", "HEIGHT")
# Mapped to Sample fields (or the image itself), so never copied into ``extra``.
_ALWAYS_MAPPED = frozenset({"key", "__key__", "status", "error_message", *IMAGE_EXTENSIONS})
# img2dataset's per-sample statuses are "success", "failed_to_download", "failed_to_resize".
_SUCCESS_STATUSES = frozenset({"success", "ok"})

# Errors that mean "the environment failed" (retry the shard later), not "the data is damaged".
ENVIRONMENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    ConnectionError,
    TimeoutError,
)

# How many small files to fetch at once from a remote filesystem (latency-bound, not CPU-bound).
READ_CHUNK = 64
_REMOTE_READ_THREADS = 16

_T = TypeVar("_T")

# Optional filesystem packages we ship an extra for: package name -> extra name.
_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with our errors: a missing package names its pip install."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as err:
        message = str(err)
        for package, extra in _EXTRAS.items():
            if package in message:
                raise missing_dependency(package, extra, f"reading {url!r}") from err
        raise MissingDependencyError(
            f"reading {url!r} needs a package that is not installed ({message}); "
            "install the package named there with pip"
        ) from err
    except ValueError as err:
        raise SourceError(
            f"cannot read {url!r}: {err}; hint: use a local path or a URL whose protocol fsspec "
            "knows (file://, s3://, gs://, http://, ...)"
        ) from err
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The address a shard records: a plain path for local files, a full URL otherwise.

    The reader reopens the filesystem from this string alone, so it must carry the protocol.
    """
    return path if is_local(fs) else fs.unstrip_protocol(path)


def stamp(info: Mapping[str, Any]) -> str:
    """A string that changes when the file behind ``info`` (an fsspec ``info`` dict) changes.

    Local files: ``f"{size}-{mtime}"``. Object stores: the ETag / generation when there is one
    (it changes on every overwrite even at the same size), else the last-modified time.
    """
    size = info.get("size")
    for name in ("ETag", "etag", "md5Hash", "generation", "checksum"):
        value = info.get(name)
        if value:
            return f"{size}-{str(value).strip(chr(34))}"
    for name in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(name)
        if value is not None:
            return f"{size}-{value}"
    return f"{size}"


def digest(parts: Iterable[str]) -> str:
    """A short stable digest of many stamps, for shards made of many files."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def split_name(name: str) -> tuple[str, str]:
    """``"dir/000000012.jpg"`` -> ``("dir/000000012", "jpg")``: webdataset's key convention.

    The key is everything before the first dot of the basename (with the directory kept, so two
    ``x.jpg`` in different folders of a tar stay two samples); the field is the rest, lowercased.
    """
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower()


def has_image_extension(name: str) -> bool:
    """True for ``*.jpg`` etc., case-insensitive (only the last extension counts)."""
    _, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in _IMAGE_EXTENSION_SET


def pick_image_field(fields: Iterable[str]) -> str | None:
    """The image field of a sample's members (``jpg`` before ``png`` ...), or None."""
    available = set(fields)
    for ext in IMAGE_EXTENSIONS:
        if ext in available:
            return ext
    # e.g. "seg.png": accept any field whose last extension is an image, in a stable order.
    others = sorted(f for f in available if has_image_extension(f))
    return others[0] if others else None


def is_hidden(rel_path: str) -> bool:
    """Dot-files and dot-folders (``.git``, macOS ``._x.jpg`` resource forks) are never data."""
    return any(part.startswith(".") for part in rel_path.split("/"))


def decode_text(data: bytes) -> str:
    """Captions are UTF-8 by convention, but a bad byte must never cost us the sample."""
    return data.decode("utf-8", errors="replace")


def one_line(text: str) -> str:
    """Errors end up in one manifest cell; keep them on one line."""
    return " ".join(text.split())


@dataclass(slots=True)
class Fields:
    """A metadata record mapped onto :class:`Sample`'s fields."""

    key: str | None = None
    url: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    status: str | None = None  # img2dataset's raw status, or None when the record has none
    error_message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """True unless the record says the sample failed (no status at all counts as success)."""
        return self.status is None or self.status.lower() in _SUCCESS_STATUSES

    def as_record(self) -> dict[str, Any]:
        """Back to a plain record, so a ``.json`` can be laid over it with ``dict.update``."""
        record: dict[str, Any] = dict(self.extra)
        for name in ("url", "caption", "width", "height", "key", "status", "error_message"):
            record[name] = getattr(self, name)
        return record

    def failure(self) -> str:
        """The one-line error of a record whose status is not a success."""
        detail = f": {one_line(self.error_message)}" if self.error_message else ""
        what = "resize failed" if self.status == "failed_to_resize" else "download failed"
        return f"{what}{detail}"


def map_fields(record: Mapping[str, Any]) -> Fields:
    """Map a metadata record (json dict or parquet row) onto Sample fields plus ``extra``.

    ``extra`` keeps the other scalar fields (numbers, strings, bools; names as given) so that
    selection policies can use e.g. ``AESTHETIC_SCORE``; None, NaN and nested values are left out
    to keep it JSON-serialisable and small.
    """
    mapped: set[str] = set(_ALWAYS_MAPPED)
    out = Fields()
    url_name = _first_present(record, _URL_FIELDS)
    caption_name = _first_present(record, _CAPTION_FIELDS)
    width_name = _first_present(record, _WIDTH_FIELDS)
    height_name = _first_present(record, _HEIGHT_FIELDS)
    if url_name is not None:
        out.url = _as_str(record[url_name])
        mapped.add(url_name)
    if caption_name is not None:
        out.caption = _as_str(record[caption_name])
        mapped.add(caption_name)
    if width_name is not None:
        out.width = _as_int(record[width_name])
        mapped.add(width_name)
    if height_name is not None:
        out.height = _as_int(record[height_name])
        mapped.add(height_name)
    out.key = _as_str(record.get("key"))
    out.status = _as_str(record.get("status"))
    out.error_message = _as_str(record.get("error_message"))
    for name, value in record.items():
        if name not in mapped and _is_json_scalar(value):
            out.extra[name] = value
    return out


def parse_json(data: bytes) -> dict[str, Any]:
    """img2dataset's per-sample ``.json``; anything malformed yields no fields, never an exception."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return {}
    return value if isinstance(value, dict) else {}


def _first_present(record: Mapping[str, Any], names: Sequence[str]) -> str | None:
    for name in names:
        if name in record:
            return name
    return None


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return decode_text(value)
    return str(value)


def _as_int(value: Any) -> int | None:
    """Sizes arrive as int, float (LAION's WIDTH may be float, NaN when unknown) or text."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _is_json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool))


def scalar_columns(schema: pa.Schema) -> list[str]:
    """Columns worth reading as metadata: the ones whose values are JSON scalars."""
    return [f.name for f in schema if _is_scalar_type(f.type)]


def _is_scalar_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_scalar_type(t.value_type)
    return bool(
        pa.types.is_boolean(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or _is_type(t, "is_string_view")
    )


def _is_type(t: pa.DataType, predicate: str) -> bool:
    """Call a ``pa.types`` predicate that older pyarrow versions (< 16) lack."""
    check = getattr(pa.types, predicate, None)
    return bool(check(t)) if check is not None else False


def image_column(schema: pa.Schema) -> str | None:
    """The column holding encoded images (img2dataset names it after ``encode_format``)."""
    for ext in IMAGE_EXTENSIONS:
        if ext in schema.names:
            t = schema.field(ext).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_type(t, "is_binary_view"):
                return ext
    return None


def is_sidecar_schema(schema: pa.Schema) -> bool:
    """img2dataset's sidecar: per-sample status rows, no image bytes."""
    names = set(schema.names)
    return {"key", "status", "error_message"} <= names and image_column(schema) is None


def has_url_column(schema: pa.Schema) -> bool:
    return any(name in schema.names for name in _URL_FIELDS)


@dataclass(slots=True)
class Sidecar:
    """img2dataset's ``NNNNN.parquet`` beside a tar or a files folder: one row per sample."""

    rows: dict[str, Fields] | None = None  # None: there is no sidecar
    error: str | None = None  # set when a sidecar exists but cannot be read

    def pop(self, key: str) -> Fields | None:
        return None if self.rows is None else self.rows.pop(key, None)


def read_sidecar(fs: fsspec.AbstractFileSystem, path: str) -> Sidecar:
    """Load a sidecar whole: it holds only small scalar columns (about 1 KB a row).

    A missing sidecar is normal (it is optional); an unreadable one is reported, not raised,
    so the shard's images are still read.
    """
    try:
        with fs.open(path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            columns = scalar_columns(parquet.schema_arrow)
            if "key" not in columns:
                return Sidecar(error="sidecar parquet has no key column")
            table = parquet.read(columns=columns)
    except FileNotFoundError:
        return Sidecar()
    except ENVIRONMENT_ERRORS as err:
        raise SourceError(f"cannot read {path!r}: {err}; hint: check permissions and retry") from err
    except (pa.ArrowException, OSError, ValueError) as err:
        return Sidecar(error=f"sidecar parquet unreadable: {one_line(str(err))}")
    rows: dict[str, Fields] = {}
    for record in table.to_pylist():
        mapped = map_fields(record)
        if mapped.key is not None:
            rows[mapped.key] = mapped
    return Sidecar(rows=rows)


def chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class FileFetcher:
    """Read many small files: in order, concurrently for remote filesystems.

    One object per image is unavoidable for folder and img2dataset ``files`` inputs; on an
    object store each read is a round trip, so latency, not bandwidth, is what threads hide.
    A file that cannot be read comes back as its ``OSError`` (it becomes a failed sample).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self._fs = fs
        self._pool = None if is_local(fs) else ThreadPoolExecutor(_REMOTE_READ_THREADS)

    def read(self, paths: Sequence[str]) -> list[bytes | OSError]:
        if self._pool is None or len(paths) < 2:
            return [self._read_one(p) for p in paths]
        return list(self._pool.map(self._read_one, paths))

    def _read_one(self, path: str) -> bytes | OSError:
        try:
            return bytes(self._fs.cat_file(path))
        except OSError as err:
            return err

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> FileFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_error(err: OSError) -> str:
    """A short, path-free reason (errors are counted per reason in the report)."""
    return f"unreadable file: {err.strerror or type(err).__name__}"


def failed_sample(sample_id: str, key: str, error: str, fields: Fields | None = None) -> Sample:
    """A sample that exists (it is listed somewhere) but whose image cannot be had."""
    if fields is None:
        return Sample(sample_id=sample_id, key=key, status="failed", error=error)
    return Sample(
        sample_id=sample_id,
        key=key,
        url=fields.url,
        caption=fields.caption,
        width=fields.width,
        height=fields.height,
        status="failed",
        error=error,
        extra=fields.extra,
    )
