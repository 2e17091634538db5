"""Helpers shared by the readers: filesystems, stamps, metadata mapping, sidecar parquet.

Every reader maps its metadata (a webdataset ``.json``, a parquet row, a sidecar row) through
:func:`map_fields`, so the same column means the same thing whatever the input format.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import re
import stat as stat_module
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

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

# The largest single file or tar member read into memory. An image at fingerprint.max_pixels
# is far smaller; anything bigger is a mistake or an attack (a gzip bomb inside a .tar.gz), and
# reading it would cost the whole worker its memory.
MAX_FILE_BYTES = 1 << 30

# How many small files to fetch at once from a remote filesystem (latency-bound, not CPU-bound).
READ_CHUNK = 64
_REMOTE_READ_THREADS = 16

_T = TypeVar("_T")

# Optional filesystem packages we ship an extra for: package name -> extra name.
_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs", "aiohttp": "http", "requests": "http"}

# Reads from a remote filesystem (http, s3, gs, ...) that fail for a reason that may pass (an
# HTTP 5xx, a connection dropped mid-body, a timeout) are tried this many times in all, waiting
# REMOTE_BACKOFF seconds, then twice that, ... between tries. Missing files (404) and refusals
# (403) are not retried. DEDUP_REMOTE_TRIES / DEDUP_REMOTE_BACKOFF override them.
REMOTE_TRIES = int(os.environ.get("DEDUP_REMOTE_TRIES", "4"))
REMOTE_BACKOFF = float(os.environ.get("DEDUP_REMOTE_BACKOFF", "0.5"))
# An HTTP server that sends nothing for this long (seconds) is a failed try (DEDUP_REMOTE_TIMEOUT).
REMOTE_TIMEOUT = float(os.environ.get("DEDUP_REMOTE_TIMEOUT", "60"))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with our errors: a missing package names its pip install."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **_storage_options(url))
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


def _storage_options(url: str) -> dict[str, Any]:
    """A read timeout for plain HTTP (aiohttp's default waits five minutes on a silent server)."""
    if not url.lower().startswith(("http://", "https://")):
        return {}
    try:
        import aiohttp
    except ImportError:
        return {}  # url_to_fs raises the ImportError that names the extra
    return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=REMOTE_TIMEOUT, sock_read=REMOTE_TIMEOUT)}}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_http(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol
    return "http" in (protocol if isinstance(protocol, tuple | list) else (protocol,))


class RemoteReadError(ConnectionError):
    """A remote read that kept failing after :data:`REMOTE_TRIES` tries, with a short reason."""

    def __init__(self, reason: str, tries: int) -> None:
        super().__init__(f"{reason} (after {tries} {'try' if tries == 1 else 'tries'})")
        self.strerror = str(self)
        self.reason = reason


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth another try: network and server trouble, of the packages loaded."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        kinds.append(aiohttp.ClientError)  # 5xx (ClientResponseError), dropped bodies, resets
    return tuple(kinds)


def _cause(err: BaseException) -> BaseException:
    """fsspec's HTTP filesystem turns any failed GET of a file's size (a 500, a refused
    connection) into ``FileNotFoundError`` raised *from* the real error: look through it."""
    cause = err.__cause__
    if isinstance(err, FileNotFoundError) and cause is not None and not isinstance(cause, FileNotFoundError):
        return cause
    return err


def remote_reason(err: BaseException) -> str:
    """A short, path-free reason for a failed remote read (counted per reason in the report)."""
    err = _cause(err)
    if isinstance(err, RemoteReadError):
        return str(err)
    status = getattr(err, "status", None)
    if isinstance(status, int):
        message = getattr(err, "message", "") or ""
        return one_line(f"HTTP {status} {message}".strip())
    if isinstance(err, FileNotFoundError):
        return "not found"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, TimeoutError) or type(err).__name__ in ("ServerTimeoutError", "SocketTimeoutError"):
        return "timed out"
    text = one_line(str(err))
    name = type(err).__name__
    return f"{name}: {text}" if text else name


def open_failure(what: str, err: BaseException) -> SourceError:
    """The error for a shard file that cannot be opened: a source that stopped answering
    (retried already) or a file gone since discovery, with the hint that fits."""
    reason = str(err) if _cause(err) is err else remote_reason(err)
    if isinstance(_cause(err), RemoteReadError | ConnectionError | TimeoutError):
        hint = "finished shards are kept: rerun the same command to resume once the source answers"
    else:
        hint = "the input changed since discovery? run again to rediscover"
    return SourceError(f"cannot open shard {what!r}: {reason}; hint: {hint}")


def _permanent(err: BaseException) -> bool:
    """A 4xx (but 408/429) answer, a missing file or a refusal: another try gets the same."""
    err = _cause(err)
    status = getattr(err, "status", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return True
    return isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError)


def retried[R](call: Callable[[], R], *, tries: int | None = None) -> R:
    """``call()``, tried again (with backoff) while it fails with a transient remote error; then
    :class:`RemoteReadError` with the last reason. Permanent errors pass through at once."""
    tries = max(1, REMOTE_TRIES if tries is None else tries)
    transient = _transient_errors()
    for attempt in range(1, tries + 1):
        try:
            return call()
        except Exception as err:
            if _permanent(err) or not isinstance(_cause(err), transient):
                raise
            if attempt == tries:
                raise RemoteReadError(remote_reason(err), tries) from err
            time.sleep(REMOTE_BACKOFF * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover


class _RetryingReader(io.RawIOBase):
    """A remote file read front to back that survives a dropped connection: a read that fails
    transiently is tried again from the same offset (by seeking, or, where the file cannot
    seek, by reopening it and skipping what was read). Seeks pass through, for parquet."""

    def __init__(self, opener: Callable[[], IO[bytes]]) -> None:
        self._opener = opener
        self._fh = retried(opener)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self._fh.seekable())

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._fh.seek(offset, whence)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")

        def attempt() -> bytes:
            try:
                return self._fh.read(len(view))
            except Exception:
                self._reopen()
                raise

        data = retried(attempt)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _reopen(self) -> None:
        """Back to ``self._pos`` on a fresh handle, for the next try (best effort)."""
        try:
            self._fh.close()
        except Exception:  # noqa: S110 (a broken connection may fail to close too)
            pass
        try:
            fh = self._opener()
            try:
                fh.seek(self._pos)
            except (OSError, ValueError):  # a stream: skip what was read
                left = self._pos
                while left > 0:
                    chunk = fh.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
            self._fh = fh
        except Exception:  # noqa: S110 (the next try fails on the old handle and says why)
            pass

    def close(self) -> None:
        if not self.closed:
            try:
                self._fh.close()
            finally:
                super().close()


def open_input(fs: fsspec.AbstractFileSystem, path: str, *, stream: bool = False) -> IO[bytes]:
    """Open a file to read. Remote files are retried on transient failures (see
    :data:`REMOTE_TRIES`) and fail with :class:`RemoteReadError` (a ``ConnectionError``, so an
    environment error); ``stream``: read front to back only (a tar), which over HTTP needs no
    range requests."""
    if is_local(fs):
        return fs.open(path, "rb")  # type: ignore[no-any-return]
    options: dict[str, Any] = {"block_size": 0} if stream and is_http(fs) else {}
    return io.BufferedReader(_RetryingReader(lambda: fs.open(path, "rb", **options)), buffer_size=1 << 16)


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
    for name in ("mtime", "LastModified", "Last-Modified", "last_modified", "updated", "modified", "created"):
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


# A plain folder's caption files: the same name with another extension (``cat.jpg`` +
# ``cat.txt``), as fine-tuning folders (kohya's sd-scripts, diffusers' examples) keep them.
# The first one present is the caption. ``apply`` copies these (and tag lists) with the image.
CAPTION_EXTENSIONS = (".txt", ".caption")


# Hugging Face ``imagefolder`` metadata: a file of this name describes the images in its folder
# and below, one row each, naming its image by ``file_name`` relative to the file's folder.
FOLDER_METADATA = ("metadata.jsonl", "metadata.csv")


def caption_file(rel: str, files: Collection[str]) -> str:
    """Where the image ``rel``'s caption is, among the listed ``files``: the caption file beside
    it, else the nearest ``metadata.jsonl`` / ``metadata.csv`` in its folder or above; ``""``."""
    stem = rel[: rel.rfind(".")] if "." in rel.rpartition("/")[2] else rel
    beside = next((stem + ext for ext in CAPTION_EXTENSIONS if stem + ext in files), "")
    if beside:
        return beside
    parts = rel.split("/")[:-1]
    for depth in range(len(parts), -1, -1):
        folder = "/".join(parts[:depth])
        for name in FOLDER_METADATA:
            if (candidate := f"{folder}/{name}" if folder else name) in files:
                return candidate
    return ""


def is_folder_metadata(rel: str) -> bool:
    return rel.rpartition("/")[2] in FOLDER_METADATA


def metadata_captions(data: bytes, csv_file: bool) -> dict[str, str]:
    """``file_name -> caption`` of a Hugging Face imagefolder metadata file (``text``, ``caption``
    ... as elsewhere); rows without a file name or caption, or not parseable, give none."""
    text = data.decode("utf-8-sig", errors="replace")
    if csv_file:
        rows: Iterable[Any] = csv.DictReader(io.StringIO(text, newline=""))
    else:
        rows = (_json_line(line) for line in text.splitlines() if line.strip())
    out: dict[str, str] = {}
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            continue
        name = _first_present(row, _CAPTION_FIELDS)
        caption = _as_str(row[name]) if name is not None else None
        if caption:
            out[posixpath.normpath(row["file_name"])] = caption
    return out


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


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


def clean_text(text: str) -> str:
    """``text`` made encodable as UTF-8 (parquet columns must be), keeping the rest as is.

    File and tar member names that are not valid UTF-8 reach Python as lone surrogates
    (``surrogateescape``), and JSON may spell one out (``"\\ud83d"``, half an emoji cut by a
    scraper); either would make writing the shard's rows fail. Escaped bytes come back as
    ``\\xNN`` (distinct names stay distinct), other lone surrogates as U+FFFD.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


# C0/C1 control characters but the whitespace that str.split() already folds.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """Errors end up in one manifest cell; keep them on one line, without control characters
    (an ``error_message`` is web text, and may hold terminal escape sequences)."""
    return " ".join(_CONTROL.sub("?", clean_text(text)).split())


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
    """img2dataset's per-sample ``.json``; anything malformed yields no fields, never an exception.

    Bytes that are not valid UTF-8 cost only those characters (replaced), not the whole record.
    """
    try:
        value = json.loads(data)
    except UnicodeDecodeError:
        try:
            value = json.loads(decode_text(data))
        except (ValueError, RecursionError):
            return {}
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
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
    return clean_text(str(value))


def key_text(value: Any) -> str | None:
    """A ``key`` value (column or json field) as the readers spell it in sample ids."""
    return _as_str(value)


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


def column_values(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """A column's Python values. Parquet does not check that text is UTF-8, and pyarrow fails
    on the first bad byte when converting: text columns fall back to bytes decoded with
    replacement, so one bad caption costs its bad bytes, not the file's rows."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        t = column.type
        if pa.types.is_dictionary(t):
            column = column.cast(t.value_type)
        binary = column.cast(pa.large_binary())
        return [decode_text(v) if isinstance(v, bytes) else v for v in binary.to_pylist()]


def image_column(schema: pa.Schema) -> str | None:
    """The column holding encoded images: img2dataset names it after ``encode_format``
    (binary); a Hugging Face ``datasets`` table (``save_to_disk`` Arrow files, ``to_parquet``)
    has an ``Image`` feature, stored as a ``{bytes, path}`` struct."""
    for ext in IMAGE_EXTENSIONS:
        if ext in schema.names:
            t = schema.field(ext).type
            if _is_binary(t):
                return ext
    structs = [f.name for f in schema if _is_image_struct(f.type)]
    if not structs:
        return None
    declared = hf_image_features(schema)
    return next((name for name in structs if name in declared), structs[0])


def hf_image_features(schema: pa.Schema) -> list[str]:
    """The columns a Hugging Face table's own metadata declares as ``Image`` features."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return []
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return []
    if not isinstance(features, dict):
        return []
    return [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]


def _is_binary(t: pa.DataType) -> bool:
    return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_type(t, "is_binary_view"))


def _is_image_struct(t: pa.DataType) -> bool:
    """``datasets.Image``'s storage: ``struct<bytes: binary, path: string>``."""
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return "bytes" in names and _is_binary(names["bytes"]) and set(names) <= {"bytes", "path"}


def image_bytes(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """The encoded images of an :func:`image_column` (a struct's ``bytes``; None where absent)."""
    if pa.types.is_struct(column.type):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        # A null struct row hides whatever its child holds.
        return [None if valid is False else data for valid, data in zip(column.is_valid().to_pylist(), column.field("bytes").to_pylist(), strict=True)]
    return column.to_pylist()


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


def read_sidecar(fs: fsspec.AbstractFileSystem, path: str, *, confine_to: str | None = None) -> Sidecar:
    """Load a sidecar whole: it holds only small scalar columns (about 1 KB a row).

    A missing sidecar is normal (it is optional); an unreadable one is reported, not raised,
    so the shard's images are still read. So is one that is a symlink leading outside
    ``confine_to`` (see :func:`source_root`): it is not read.
    """
    if confine_to is not None and is_local(fs) and os.path.lexists(path) and outside(path, confine_to):
        return Sidecar(error=f"sidecar parquet: {OUTSIDE_SOURCE}")
    try:
        with open_input(fs, path) as fh:
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
    values = {name: column_values(table.column(name)) for name in table.column_names}
    for i in range(table.num_rows):
        mapped = map_fields({name: column[i] for name, column in values.items()})
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
    A file that cannot be read comes back as its ``OSError`` (it becomes a failed sample). With
    ``confine_to`` (a real local folder, from :func:`source_root`), a path that resolves outside
    it (a symlink leaving the source) is not read: it comes back as :class:`OutsideSourceError`.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, confine_to: str | None = None) -> None:
        self._fs = fs
        self._local = is_local(fs)
        self._confine_to = confine_to if is_local(fs) else None
        self._pool = None if is_local(fs) else ThreadPoolExecutor(_REMOTE_READ_THREADS)

    def read(self, paths: Sequence[str]) -> list[bytes | OSError]:
        if self._pool is None or len(paths) < 2:
            return [self._read_one(p) for p in paths]
        return list(self._pool.map(self._read_one, paths))

    def _read_one(self, path: str) -> bytes | OSError:
        if self._confine_to is not None and outside(path, self._confine_to):
            return OutsideSourceError(path)
        if self._local:
            # One stat: a FIFO named x.jpg would block the read forever, a device never end.
            try:
                info = os.stat(path)
            except OSError as err:
                return err
            if not stat_module.S_ISREG(info.st_mode):
                return UnreadableFileError(path, "not a regular file")
            if info.st_size > MAX_FILE_BYTES:
                return UnreadableFileError(path, too_large(info.st_size))
        try:
            if self._local:
                return bytes(self._fs.cat_file(path))
            return bytes(retried(lambda: self._fs.cat_file(path)))
        except OSError as err:
            return err
        except Exception as err:  # a remote filesystem's own error type (an HTTP 4xx, say)
            return UnreadableFileError(path, remote_reason(err))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> FileFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_error(err: OSError) -> str:
    """A short, path-free reason (errors are counted per reason in the report)."""
    if isinstance(err, OutsideSourceError):
        return OUTSIDE_SOURCE
    if err.strerror is None and isinstance(err, FileNotFoundError):
        return "unreadable file: not found"  # a remote 404 (fsspec's error carries no strerror)
    return f"unreadable file: {err.strerror or type(err).__name__}"


# --- symlinks that leave the source ---------------------------------------------------------
# dedup reads what the user pointed it at and nothing else: a symlink inside a source folder
# that resolves outside it (to /etc, a home folder, another mount) is never read. It becomes a
# failed sample with this error, so it is visible rather than silently skipped. Symlinks that
# stay inside the source are read; directory symlinks are never descended into (the files they
# lead to are either listed under their real path, or outside the source).
OUTSIDE_SOURCE = "symlink outside source"


class UnreadableFileError(OSError):
    """A file that is there but is not read (not a regular file, too large)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{reason}: {path}")
        self.strerror = reason


def too_large(size: int) -> str:
    return f"too large ({size} bytes; the limit is {MAX_FILE_BYTES} bytes)"


class OutsideSourceError(OSError):
    """A local path that resolves outside the source the user gave."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{OUTSIDE_SOURCE}: {path}")
        self.strerror = OUTSIDE_SOURCE


def source_root(source: str) -> str | None:
    """The real folder a local ``source`` confines reads to; None for remote filesystems.

    A folder confines to itself; a single file given on its own to the folder it really lives
    in (so its sidecar ``.parquet`` beside it is in bounds).
    """
    fs, path = filesystem(source)
    if not is_local(fs):
        return None
    real = os.path.realpath(path)
    return real if os.path.isdir(real) else os.path.dirname(real)


def outside(path: str, root: str) -> bool:
    """True when local ``path``, symlinks resolved, is not ``root`` or inside it."""
    real = os.path.realpath(path)
    return real != root and not real.startswith(root.rstrip(os.sep) + os.sep)


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
