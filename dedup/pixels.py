"""Exact-pixel hashes only where they can label a link.

The exact-pixel SHA-256 (:func:`dedup.fingerprint.pixel_sha256`) needs every decoded pixel and
costs as much as PDQ on the hash path, yet it never decides *whether* two images link: two
images with the same pixels have the same size and the same PDQ (PDQ is computed from the same
full decode), so PDQ links them at distance 0 and the embedding at cosine 1. It decides the
link's label only (``exact_pixels`` before ``embedding`` / ``pdq``). So the per-shard stage
leaves ``pixel_sha256`` null (not computed) when PDQ is on, and here, in the global stage:

* rows are grouped by their **pixel key** ``(width, height, pdq)``; a group that holds two or
  more different byte hashes may hold pixel twins of other bytes, so for each of its byte
  hashes whose pixel hash no row knows yet, one row is re-read from its source
  (:mod:`dedup.sources.readback`, a per-shard :class:`PixelStep` through the run's executor)
  and pixel-hashed;
* every other row's pixel twins are its byte twins, so its byte hash stands for its pixels:
  :func:`pixel_keys` gives each row its pixel hash where known (its own, or its byte twin's),
  else its byte hash. ``exact_edges`` over those keys makes the same links as over eagerly
  computed pixel hashes.

Against an index (``check``, ``--against``, ``index add``) the same rule runs over the new rows
and the index rows that share a new row's pixel key: new rows are re-read from the new data,
index rows (whose ``pixel_sha256`` is null where it was never needed) from the index's sources.
An index row whose source is gone keeps a null hash: the pair still links, by PDQ at distance 0
(and the embedding), and is labelled by that signal instead of ``exact_pixels``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup._io import atomic_path
from dedup._types import Shard
from dedup.errors import SampleError
from dedup.executors.base import Executor, Markers, shard_file_name
from dedup.executors.local import LocalExecutor
from dedup.fingerprint import pixel_sha256
from dedup.rows import FeatureRows, as_rows
from dedup.sources.readback import stream_images

__all__ = ["KEY_COLUMNS", "PixelStep", "hash_pixels", "pixel_keys", "plan", "resolve_against", "resolve_within"]

KEY_COLUMNS = ("width", "height", "pdq", "sha256", "pixel_sha256")
_READ_COLUMNS = (*KEY_COLUMNS, "sample_id", "shard", "status")


def plan(width: Sequence[Any], height: Sequence[Any], pdq: Sequence[Any], sha: Sequence[Any], pix: Sequence[Any]) -> list[int]:
    """Positions to pixel-hash: in each ``(width, height, pdq)`` group with two or more byte
    hashes, the first position of each byte hash whose pixel hash no position holds."""
    known = {s for s, p in zip(sha, pix, strict=True) if s is not None and p is not None}
    groups: dict[tuple[Any, Any, Any], dict[bytes, int]] = {}
    for r, (w, h, q, s) in enumerate(zip(width, height, pdq, sha, strict=True)):
        if s is None or q is None:
            continue
        groups.setdefault((w, h, q), {}).setdefault(s, r)
    out = [r for shas in groups.values() if len(shas) > 1 for s, r in shas.items() if s not in known]
    return sorted(out)


def pixel_keys(pix: Sequence[bytes | None], sha: Sequence[bytes | None], known: Mapping[bytes, bytes] | None = None) -> list[bytes | None]:
    """Each row's exact-pixel key: its pixel hash, else a byte twin's (``known``: byte hash ->
    pixel hash; by default from these rows), else its byte hash (its only pixel twins are then
    its byte twins, see the module docstring). None for rows without bytes."""
    if known is None:
        known = known_pixels(pix, sha)
    return [p if p is not None else (known.get(s, s) if s is not None else None) for p, s in zip(pix, sha, strict=True)]


def known_pixels(pix: Sequence[bytes | None], sha: Sequence[bytes | None]) -> dict[bytes, bytes]:
    """Byte hash -> pixel hash, from the rows that hold both."""
    return {s: p for s, p in zip(sha, pix, strict=True) if s is not None and p is not None}


# --------------------------------------------------------------------------------------------
# Re-reading: a per-shard step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PixelStep:
    """Re-read one shard's wanted samples and hash their pixels (picklable: any executor).

    ``<root>/wanted/<shard>.npz``: ``sample_ids`` and their byte hashes ``sha256`` (changed
    bytes are refused); writes ``<root>/pixels/<shard>.npz``: the ``sample_ids`` read and their
    ``pixel_sha256``. A sample that cannot be read or decoded again is left out."""

    root: Path
    max_pixels: int

    def paths(self, shard: Shard) -> list[Path]:
        return [self.root / "pixels" / f"{shard_file_name(shard)}.npz"]

    def __call__(self, shard: Shard, progress: Callable[[int], object] | None = None) -> dict[str, Any]:
        with np.load(self.root / "wanted" / f"{shard_file_name(shard)}.npz") as wanted:
            ids, shas = wanted["sample_ids"].tolist(), [bytes(h) for h in wanted["sha256"]]
        expected = dict(zip(ids, shas, strict=True))
        got_ids: list[str] = []
        got: list[bytes] = []
        for sample_id, data in stream_images([shard], dict.fromkeys(ids, shard.shard_id), sha256=expected):
            try:
                got.append(pixel_sha256(data, max_pixels=self.max_pixels))
            except SampleError:
                continue
            got_ids.append(sample_id)
        (path,) = self.paths(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, sample_ids=np.array(got_ids, dtype=str), pixel_sha256=_packed(got))
        if progress is not None:
            progress(len(ids))
        return {"pixel_hashed": len(got), "pixel_unreadable": len(ids) - len(got)}


def hash_pixels(
    shards: Sequence[Shard],
    wanted: Mapping[str, tuple[str, bytes]],
    *,
    max_pixels: int,
    root: Path | None = None,
    executor: Executor | None = None,
    workers: int = 1,
) -> dict[str, bytes]:
    """Pixel hashes of the ``wanted`` samples (``sample_id -> (shard_id, sha256)``) that can
    still be read from ``shards``: one :class:`PixelStep` per shard that holds some, through
    ``executor`` (default: this process, ``workers`` threads). ``root``: its work folder
    (emptied first; default a temporary one)."""
    if not wanted:
        return {}
    with _folder(root) as folder:
        by_shard: dict[str, list[str]] = {}
        for sample_id, (shard_id, _) in wanted.items():
            by_shard.setdefault(shard_id, []).append(sample_id)
        todo = [s for s in shards if s.shard_id in by_shard]
        for shard in todo:
            ids = by_shard[shard.shard_id]
            path = folder / "wanted" / f"{shard_file_name(shard)}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, sample_ids=np.array(ids, dtype=str), sha256=_packed([wanted[i][1] for i in ids]))
        step = PixelStep(root=folder, max_pixels=max_pixels)
        runner = executor or LocalExecutor(workers=workers, threads=True)
        runner.run(step, todo, markers=Markers(folder / "done", outputs=step.paths))
        out: dict[str, bytes] = {}
        for shard in todo:
            with np.load(step.paths(shard)[0]) as got:
                out.update(zip(got["sample_ids"].tolist(), (bytes(h) for h in got["pixel_sha256"]), strict=True))
        return out


def _packed(hashes: Sequence[bytes]) -> np.ndarray:
    """32-byte hashes as an (n, 32) uint8 array (numpy's S32 would drop trailing zero bytes)."""
    return np.frombuffer(b"".join(hashes), np.uint8).reshape(-1, 32)


@contextmanager
def _folder(root: Path | None) -> Iterator[Path]:
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)  # an earlier run's: the wanted rows may differ
        root.mkdir(parents=True)
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="dedup-pixels-") as tmp:
        yield Path(tmp)


# --------------------------------------------------------------------------------------------
# Within one set, and against an index
# --------------------------------------------------------------------------------------------


def _shared(pdq: pa.ChunkedArray | pa.Array, eligible: np.ndarray) -> np.ndarray:
    """Eligible rows whose PDQ another eligible row holds (the only ones a group can pair)."""
    column = pdq.combine_chunks() if isinstance(pdq, pa.ChunkedArray) else pdq
    mine = column.filter(pa.array(eligible)).drop_null()
    if not len(mine):
        return np.zeros(len(column), bool)
    counts = pc.value_counts(mine)
    dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    hit = np.asarray(pc.is_in(column, value_set=dup).fill_null(False).to_numpy(zero_copy_only=False), bool)
    return hit & eligible


def _eligible(table: pa.Table | FeatureRows) -> np.ndarray:
    rows = as_rows(table)
    has_sha = np.asarray(rows.column("sha256").is_valid().to_numpy(zero_copy_only=False), bool)
    return rows.equals("status", "ok") & has_sha


def resolve_within(
    table: pa.Table | FeatureRows,
    shards: Sequence[Shard],
    *,
    max_pixels: int,
    root: Path | None = None,
    executor: Executor | None = None,
    workers: int = 1,
) -> tuple[FeatureRows, dict[str, int]]:
    """``table``'s rows with the pixel hashes their links need laid over ``pixel_sha256``
    (re-read from ``shards``), and counts (``pixel_candidates``: rows re-read, ``pixel_hashed``)."""
    rows = as_rows(table)
    if not rows.num_rows or rows.null_count("pixel_sha256") == 0 or rows.null_count("pdq") == rows.num_rows:
        return rows, {"pixel_candidates": 0, "pixel_hashed": 0}
    at = np.flatnonzero(_shared(rows.column("pdq"), _eligible(rows)))
    sub = rows.take(_READ_COLUMNS, at)
    want = plan(*(sub.column(c).to_pylist() for c in KEY_COLUMNS))
    if not want:
        return rows, {"pixel_candidates": 0, "pixel_hashed": 0}
    ids, shard_ids, shas = (sub.column(c).to_pylist() for c in ("sample_id", "shard", "sha256"))
    got = hash_pixels(
        shards, {ids[p]: (shard_ids[p], shas[p]) for p in want}, max_pixels=max_pixels, root=root, executor=executor, workers=workers
    )
    done = [p for p in want if ids[p] in got]
    values = pa.array([got[ids[p]] for p in done], pa.binary(32))
    return rows.with_values("pixel_sha256", at[np.array(done, np.int64)], values), {"pixel_candidates": len(want), "pixel_hashed": len(done)}


def resolve_against(
    table: pa.Table | FeatureRows,
    shards: Sequence[Shard],
    base: pa.Table,
    base_shards: Sequence[Shard],
    *,
    max_pixels: int,
    executor: Executor | None = None,
    workers: int = 1,
) -> tuple[FeatureRows, pa.Table, dict[str, int]]:
    """New rows (``table``, read from ``shards``) and index rows (``base``: the index's
    samples with :data:`KEY_COLUMNS`, ``sample_id`` and ``shard``, read from ``base_shards``)
    with the pixel hashes their cross links need: the rule of :func:`resolve_within` over the
    new rows and the index rows that share a new row's pixel key. Index rows whose source is
    gone keep a null hash (see the module docstring)."""
    rows = as_rows(table)
    nothing = {"pixel_candidates": 0, "pixel_hashed": 0}
    if not rows.num_rows or not base.num_rows or "pdq" not in base.column_names:
        return rows, base, nothing
    mine_ok = _eligible(rows)
    mine_pdq = rows.column("pdq").combine_chunks()
    wanted_pdq = mine_pdq.filter(pa.array(mine_ok)).drop_null()
    if not len(wanted_pdq):
        return rows, base, nothing
    base_ok = _eligible(base)
    their_at = np.flatnonzero(np.asarray(pc.is_in(base.column("pdq"), value_set=wanted_pdq).fill_null(False).to_numpy(zero_copy_only=False), bool) & base_ok)
    if not their_at.size:
        return rows, base, nothing
    their_pdq = base.column("pdq").take(pa.array(their_at)).combine_chunks()
    my_at = np.flatnonzero(np.asarray(pc.is_in(mine_pdq, value_set=their_pdq).fill_null(False).to_numpy(zero_copy_only=False), bool) & mine_ok)
    mine = rows.take(_READ_COLUMNS, my_at)
    theirs = base.select(list(_READ_COLUMNS)).take(pa.array(their_at))
    both = pa.concat_tables([mine, theirs.cast(mine.schema)])  # new rows first: they are re-read by preference
    want = plan(*(both.column(c).to_pylist() for c in KEY_COLUMNS))
    if not want:
        return rows, base, nothing
    ids, shard_ids, shas = (both.column(c).to_pylist() for c in ("sample_id", "shard", "sha256"))
    n_mine = mine.num_rows
    got_mine = hash_pixels(shards, {ids[p]: (shard_ids[p], shas[p]) for p in want if p < n_mine}, max_pixels=max_pixels, executor=executor, workers=workers)
    got_theirs = hash_pixels(base_shards, {ids[p]: (shard_ids[p], shas[p]) for p in want if p >= n_mine}, max_pixels=max_pixels, workers=workers)
    done_mine = [p for p in want if p < n_mine and ids[p] in got_mine]
    done_theirs = [p for p in want if p >= n_mine and ids[p] in got_theirs]
    if done_mine:
        rows = rows.with_values(
            "pixel_sha256", my_at[np.array(done_mine, np.int64)], pa.array([got_mine[ids[p]] for p in done_mine], pa.binary(32))
        )
    if done_theirs:
        at = their_at[np.array(done_theirs, np.int64) - n_mine]
        mask = np.zeros(base.num_rows, bool)
        mask[at] = True
        order = np.argsort(at)
        values = pa.array([got_theirs[ids[p]] for p in done_theirs], pa.binary(32)).take(pa.array(order))
        column = base.column("pixel_sha256").combine_chunks().cast(pa.binary(32))
        base = base.set_column(base.schema.get_field_index("pixel_sha256"), "pixel_sha256", pc.replace_with_mask(column, pa.array(mask), values))
    return rows, base, {"pixel_candidates": len(want), "pixel_hashed": len(done_mine) + len(done_theirs)}
