"""Precomputed embeddings in clip-retrieval's layout: no images, only vectors and their metadata.

::

    EMB_DIR/img_emb/img_emb_0.npy          float16 or float32 rows (LAION publishes float16)
    EMB_DIR/metadata/metadata_0.parquet    the same rows, in the same order: image_path, caption, url, ...

This is how LAION publishes its CLIP embeddings and how ``clip-retrieval inference`` writes them.
One shard per ``img_emb_K.npy``; its id is the file's stem (``img_emb_0``, with the folders above
``img_emb/`` in front when nested), and a sample's key is the metadata's ``key`` column when it
has one that is unique, else the row number zero-padded to nine digits
(``img_emb_0/000000012``). ``text_emb/`` (caption embeddings) is not read.

The per-shard step reads these shards vectorised (:func:`metadata_table`, :func:`vector_blocks`);
:func:`read_embeddings` yields them as samples for code that wants rows one by one.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup._types import Sample, Shard, ShardKind
from dedup.errors import SourceError
from dedup.sources._common import ENVIRONMENT_ERRORS, filesystem, open_failure, open_input, one_line, scalar_columns, stamp, url_of

if TYPE_CHECKING:
    import polars as pl

EMB_DIR = "img_emb"
META_DIR = "metadata"
_NPY_NAME = re.compile(r"^img_emb_(\d+)\.npy$")
_KEY_WIDTH = 9
DAMAGED_KEY = "<damaged>"
BAD_VECTOR = "embedding: zero or not finite"
_BLOCK_ROWS = 65_536
_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# Metadata names, first present wins (clip-retrieval writes lowercase, LAION parquet uppercase).
_URL = ("url", "URL")
_CAPTION = ("caption", "TEXT", "text", "txt")
_WIDTH = ("width", "WIDTH")
_HEIGHT = ("height", "HEIGHT")
_NOT_META = frozenset({"key", "__key__", "status", "error_message"})


def is_embedding_file(rel: str) -> bool:
    """``.../img_emb_K.npy``: the vectors of one clip-retrieval shard."""
    return _NPY_NAME.match(posixpath.basename(rel)) is not None


def metadata_rel(npy_rel: str, *, root_name: str = "") -> str:
    """Where the metadata of ``img_emb/img_emb_K.npy`` lives, relative like ``npy_rel``:
    ``metadata/metadata_K.parquet`` beside the ``img_emb/`` folder (``../metadata/...`` when the
    source is the ``img_emb/`` folder itself), or beside the file when it is not in one."""
    folder, name = posixpath.split(npy_rel)
    number = _NPY_NAME.match(name).group(1)  # type: ignore[union-attr]
    meta_name = f"metadata_{number}.parquet"
    if posixpath.basename(folder) == EMB_DIR:
        return posixpath.join(posixpath.dirname(folder), META_DIR, meta_name)
    if not folder and root_name == EMB_DIR:
        return posixpath.join("..", META_DIR, meta_name)
    return posixpath.join(folder, meta_name)


def shard_id_of(npy_rel: str) -> str:
    """``a/img_emb/img_emb_3.npy`` -> ``a/img_emb_3``: what sample ids start with."""
    folder, name = posixpath.split(npy_rel)
    if posixpath.basename(folder) == EMB_DIR:
        folder = posixpath.dirname(folder)
    stem = name[: -len(".npy")]
    return posixpath.join(folder, stem) if folder else stem


def embeddings_shard(
    fs: fsspec.AbstractFileSystem,
    source: str,
    npy_path: str,
    shard_id: str,
    npy_info: Mapping[str, Any],
    meta_path: str | None,
    meta_info: Mapping[str, Any] | None,
) -> Shard:
    """One shard: ``path`` is the ``.npy``, ``members`` the metadata parquet (when there is one);
    the stamp covers both files, so replacing either recomputes the shard."""
    shard_stamp = stamp(npy_info) if meta_info is None else f"{stamp(npy_info)}+{stamp(meta_info)}"
    members = (url_of(fs, meta_path),) if meta_path is not None and meta_info is not None else ()
    return Shard(source, url_of(fs, npy_path), ShardKind.EMBEDDINGS, shard_id, shard_stamp, members)


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True, slots=True)
class Header:
    rows: int
    dim: int
    dtype: np.dtype[Any]
    offset: int  # where the rows start in the file


class DamagedFileError(Exception):
    """The ``.npy`` cannot be read as a matrix of float rows; the message says why."""


def read_header(shard: Shard) -> Header:
    """The shape and dtype of a shard's ``.npy``, from its header (nothing else is read).

    Raises:
        DamagedFileError: not an ``.npy`` of 2-D float rows, or shorter than its header says.
        SourceError: the file cannot be opened (moved, no permission).
    """
    fs, path = filesystem(shard.path)
    try:
        size = int(fs.size(path))
        with open_input(fs, path) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except ENVIRONMENT_ERRORS as err:
        raise open_failure(shard.path, err) from err
    except (ValueError, OSError, EOFError) as err:
        raise DamagedFileError(f"not a readable .npy file: {one_line(str(err))}") from err
    dtype = np.dtype(dtype)
    if len(shape) != 2 or fortran or dtype not in _DTYPES:
        raise DamagedFileError(
            f"expected a C-order 2-D float16/float32 array, found shape {tuple(shape)} {dtype}"
            f"{' (Fortran order)' if fortran else ''}"
        )
    rows, dim = int(shape[0]), int(shape[1])
    if size < offset + rows * dim * dtype.itemsize:
        raise DamagedFileError(f"truncated: {size} bytes, the header promises {rows} rows of {dim} {dtype}")
    return Header(rows, dim, dtype, offset)


def vector_blocks(shard: Shard, header: Header, block_rows: int = _BLOCK_ROWS) -> Iterator[np.ndarray]:
    """The shard's rows in order, as stored, ``block_rows`` at a time (memory: one block)."""
    fs, path = filesystem(shard.path)
    row_bytes = header.dim * header.dtype.itemsize
    try:
        with open_input(fs, path) as fh:
            fh.seek(header.offset)
            for start in range(0, header.rows, block_rows):
                count = min(block_rows, header.rows - start)
                data = fh.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise DamagedFileError(f"truncated at row {start + len(data) // row_bytes}")
                yield np.frombuffer(data, header.dtype).reshape(count, header.dim)
    except ENVIRONMENT_ERRORS as err:
        raise SourceError(f"cannot read shard {shard.path!r}: {err}; hint: check permissions and retry") from err


def unit_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ok, unit)``: which rows can be normalised (finite, not all zero), and those rows as
    float32 unit vectors. One pass: a norm is finite only when every component is."""
    x = np.array(block, np.float32)  # a copy: normalised in place
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    ok = np.isfinite(norm) & (norm > 0)
    big = np.isinf(norm)
    if big.any():  # finite float32 components whose squares overflow: redo those in float64
        wide = np.asarray(block[big], np.float64)
        exact = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        good = np.isfinite(exact) & (exact > 0)
        ok[big] = good
        x[big] = np.where(good[:, None], wide / np.where(good, exact, 1.0)[:, None], 0.0)
        norm[big] = 1.0  # those rows are unit already
    if not ok.all():
        x, norm = x[ok], norm[ok]
    x /= norm[:, None]
    return ok, x


def valid_rows(block: np.ndarray) -> np.ndarray:
    """Rows that can be normalised: finite, and not all zero."""
    return unit_rows(block)[0]


def metadata_table(shard: Shard, rows: int) -> tuple[pa.Table, str | None]:
    """The rows' identity and metadata, vectorised: ``key, sample_id, url, caption, width,
    height, meta`` (``meta``: JSON of the other scalar columns, sorted by name; null when there
    are none). Returns ``(table, problem)``; ``problem`` is a one-line reason when the metadata
    cannot be used (unreadable, or not row for row with the vectors): then every row keeps its
    row-number key and the caller fails the rows with that reason.
    """
    # polars here only: every image worker imports this module, and polars costs it ~30 MB and a
    # third of a second of CPU at start-up for nothing
    import polars as pl

    frame: pl.DataFrame | None = None
    problem: str | None = None
    if shard.members:
        fs, path = filesystem(shard.members[0])
        try:
            with open_input(fs, path) as fh:
                parquet = pq.ParquetFile(fh)
                table = parquet.read(columns=scalar_columns(parquet.schema_arrow))
            frame = pl.from_arrow(table)  # type: ignore[assignment]
        except ENVIRONMENT_ERRORS as err:
            raise SourceError(f"cannot read {shard.members[0]!r}: {err}; hint: check permissions and retry") from err
        except (pa.ArrowException, OSError, ValueError, pl.exceptions.PolarsError) as err:
            problem = f"metadata parquet unreadable: {one_line(str(err))}"
        if frame is not None and frame.height != rows:
            name = posixpath.basename(path)
            problem = f"{name} has {frame.height} rows for {rows} embeddings: not row for row"
            frame = None
    if frame is None:
        frame = pl.DataFrame()
    numbers = pl.int_range(0, rows, eager=True, dtype=pl.Int64).cast(pl.String).str.zfill(_KEY_WIDTH)
    key = numbers
    if "key" in frame.columns:
        given = frame.get_column("key").cast(pl.String)
        if given.null_count() == 0 and given.n_unique() == rows:
            key = given
    out = pl.DataFrame({"key": key}).with_columns((pl.lit(f"{shard.shard_id}/") + pl.col("key")).alias("sample_id"))
    used = set(_NOT_META)
    for name, candidates, dtype in (
        ("url", _URL, pl.String),
        ("caption", _CAPTION, pl.String),
        ("width", _WIDTH, pl.Int32),
        ("height", _HEIGHT, pl.Int32),
    ):
        found = next((c for c in candidates if c in frame.columns), None)
        if found is None:
            out = out.with_columns(pl.lit(None, dtype).alias(name))
            continue
        used.add(found)
        series = frame.get_column(found)
        if dtype == pl.Int32 and series.dtype.is_float():
            series = series.fill_nan(None)
        out = out.with_columns(series.cast(dtype, strict=False).alias(name))
    extra = sorted(c for c in frame.columns if c not in used)
    if extra:
        fields = [pl.col(c).fill_nan(None) if frame.schema[c].is_float() else pl.col(c) for c in extra]
        out = out.with_columns(frame.select(pl.struct(fields).struct.json_encode().alias("meta")).get_column("meta"))
    else:
        out = out.with_columns(pl.lit(None, pl.String).alias("meta"))
    return out.select("key", "sample_id", "url", "caption", "width", "height", "meta").to_arrow(), problem


def read_embeddings(shard: Shard) -> Iterator[Sample]:
    """Yield every row of a shard as a sample without image bytes (url, caption and the other
    metadata as :func:`metadata_table` maps them). Rows whose vector is zero or not finite are
    failed samples; a damaged ``.npy`` is one failed ``<damaged>`` sample."""
    try:
        header = read_header(shard)
    except DamagedFileError as err:
        yield Sample(f"{shard.shard_id}/{DAMAGED_KEY}", DAMAGED_KEY, status="failed", error=f"embeddings {err}")
        return
    table, problem = metadata_table(shard, header.rows)
    ok = np.concatenate([valid_rows(b) for b in vector_blocks(shard, header)]) if header.rows else np.zeros(0, bool)
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    for r in range(header.rows):
        error = problem or (None if ok[r] else BAD_VECTOR)
        yield Sample(
            sample_id=cols["sample_id"][r],
            key=cols["key"][r],
            url=cols["url"][r],
            caption=cols["caption"][r],
            width=cols["width"][r],
            height=cols["height"][r],
            status="failed" if error else "ok",
            error=error,
            extra=json.loads(cols["meta"][r]) if cols["meta"][r] else {},
        )


# ---------------------------------------------------------------------------------- discovery


def discover_embeddings(
    fs: fsspec.AbstractFileSystem,
    source: str,
    root: str,
    prefix: str,
    files: Mapping[str, Mapping[str, Any]],
) -> tuple[list[Shard], set[str]]:
    """The embeddings shards of a folder listing (``{relative path: info}``), and the metadata
    parquets they take (which are therefore not shards of their own)."""
    shards: list[Shard] = []
    taken: set[str] = set()
    root_name = posixpath.basename(root.rstrip("/"))
    for rel in sorted(r for r in files if is_embedding_file(r)):
        meta = metadata_rel(rel, root_name=root_name)
        if meta.startswith("../"):  # the source is the img_emb/ folder: metadata sits beside it
            meta_path = posixpath.normpath(posixpath.join(root, meta))
            meta_info = _info_or_none(fs, meta_path)
        else:
            meta_path = posixpath.join(root, meta)
            meta_info = files.get(meta)
            if meta_info is not None:
                taken.add(meta)
        shards.append(
            embeddings_shard(
                fs, source, posixpath.join(root, rel), prefix + shard_id_of(rel), files[rel], meta_path, meta_info
            )
        )
    return shards, taken


def discover_embedding_file(
    fs: fsspec.AbstractFileSystem, source: str, path: str, info: Mapping[str, Any], prefix: str
) -> Shard:
    """A single ``img_emb_K.npy`` given as the source (its metadata looked up where
    clip-retrieval puts it)."""
    folder, name = posixpath.split(path)
    in_emb_dir = posixpath.basename(folder) == EMB_DIR
    rel = posixpath.join(EMB_DIR, name) if in_emb_dir else name
    base = posixpath.dirname(folder) if in_emb_dir else folder
    meta_path = posixpath.join(base, metadata_rel(rel))
    return embeddings_shard(fs, source, path, prefix + shard_id_of(name), info, meta_path, _info_or_none(fs, meta_path))


def _info_or_none(fs: fsspec.AbstractFileSystem, path: str) -> Mapping[str, Any] | None:
    try:
        info: Mapping[str, Any] = fs.info(path)
    except FileNotFoundError:
        return None
    return info if info.get("type") != "directory" else None
