"""The second look as per-shard tasks: what the executor runs (locally or on Ray).

The driver (:func:`dedup.second_look.look.second_look`) proposes the candidate pairs and
spills them to disk grouped by shard, each pair in the shard of its lower row; then two steps
run over the shards, each a picklable ``step(shard, progress=None) -> stats`` like the
per-shard features, with a completion marker per shard written last::

    <root>/wanted/<shard>.npz        rows of the shard that some candidate names (+ ids, boxes)
    <root>/candidates/<shard>.npy    the pairs whose lower row is in the shard
      ─► ReadStep  (phase A): re-read only that shard's wanted images, ORB features + grey copy
    <root>/features/<shard>/         index.npy (a row each) + points / descriptors / grey .bin
      ─► CheckStep (phase B): the shard's pairs, features of both ends memory-mapped from the
                              own and the partners' folders (only the rows needed), confirms()
    <root>/edges/<shard>.npy         the confirmed links, each pair once

Features are written as they are computed and read back through memory maps, a block of
pairs at a time: a task holds one chunk of images or one block of pairs' features, never a
whole shard's (about 120 KB a re-read image: 1,000 ORB descriptors and a 320 px grey copy).

"Skip the pairs already joined" (best score first, a block at a time) stays inside a task,
seeded by the direct links' components: which pairs are checked depends on the task's own
candidates only, so any executor, in any order, writes the same edges.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import batched
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dedup._io import atomic_path
from dedup._types import Shard
from dedup.config import RunConfig
from dedup.errors import SampleError
from dedup.executors.base import shard_file_name
from dedup.fingerprint import decode, trim_borders
from dedup.search import Signal, best_per_pair
from dedup.second_look.geometry import LOCAL_SIDE, LocalFeatures, confirms, local_features, one_thread_each
from dedup.sources.readback import stream_images

__all__ = ["CANDIDATE_DTYPE", "EDGE_DTYPE", "CheckStep", "ReadStep", "crop_to", "read_edges"]

CHUNK_ROWS = 256  # images read (encoded bytes held) at once by a read task
CHECK_BLOCK = 256  # pairs checked between two updates of what is joined (see CheckStep)
CACHE_ROWS = 2048  # re-read images' features a check task keeps mapped in (~120 KB each)

CANDIDATE_DTYPE = np.dtype(
    [("i", "<i8"), ("j", "<i8"), ("score", "<f4"), ("window", "<i2"), ("li", "<i8"), ("lj", "<i8"), ("si", "<i4"), ("sj", "<i4")]
)
"""A candidate: rows ``i`` and ``j``, proposing score and window (-1: whole image), the direct
links' component of each end (``li``, ``lj``) and the shard (index) holding each (``si``, ``sj``)."""
EDGE_DTYPE = np.dtype([("i", "<i8"), ("j", "<i8"), ("score", "<f4"), ("signal", "i1")])
_INDEX_DTYPE = np.dtype(
    [("row", "<i8"), ("kp_start", "<i8"), ("kp_count", "<i4"), ("grey_start", "<i8"), ("h", "<i4"), ("w", "<i4"), ("scale", "<f4")]
)
_FILES = ("points.bin", "descriptors.bin", "grey.bin")


def _threads(threads: int) -> int:
    return threads if threads > 0 else (os.cpu_count() or 1)


def crop_to(img: Image.Image, box: np.ndarray) -> Image.Image:
    """``img`` cut to ``box`` (left, top, right, bottom as shares of its size), the whole of it
    for the full box. A JPEG re-read at a reduced scale lands within a pixel of the full one."""
    w, h = img.size
    left, top = round(float(box[0]) * w), round(float(box[1]) * h)
    right, bottom = min(w, round(float(box[2]) * w)), min(h, round(float(box[3]) * h))
    if (left, top, right, bottom) == (0, 0, w, h) or right - left < 1 or bottom - top < 1:
        return img
    return img.crop((left, top, right, bottom))


def look(data: bytes | None, box: np.ndarray | None, cfg: RunConfig) -> LocalFeatures | None:
    """One re-read image's local features, cut as its model input was (``box``: the trim box
    the fingerprint stage recorded; NaN or None: measure the margins again when trimming is on).
    None when it cannot be decoded."""
    if data is None:
        return None
    if box is not None and np.isnan(box).any():
        box = None
    # ORB and the pixel check see brightness only: the luma is all that is decoded, unless a
    # new measure of the margins (in colour) needs more.
    grey = box is not None or not cfg.fingerprint.trim
    try:
        # Local features look at 512 px: a JPEG can decode at a reduced scale. Trimming then
        # measures that image, as it measured the full one to within a pixel.
        img = decode(data, max_pixels=cfg.fingerprint.max_pixels, draft=LOCAL_SIDE, grey=grey)
    except SampleError:
        return None
    if box is not None:
        img = crop_to(img, box)
    elif cfg.fingerprint.trim:
        img = trim_borders(img)
    return local_features(img)


@dataclass(frozen=True)
class ReadStep:
    """Phase A: re-read one shard's wanted images and write their local features.

    ``root``: the second look's work folder (see the module docstring); ``threads``: decoding
    and ORB threads (0: one per core; Ray gives an actor its CPU share)."""

    config: RunConfig
    root: Path
    threads: int = 0

    def paths(self, shard: Shard) -> list[Path]:
        return [features_dir(self.root, shard) / "index.npy"]

    def __call__(self, shard: Shard, progress: Callable[[int], object] | None = None) -> dict[str, Any]:
        with np.load(self.root / "wanted" / f"{shard_file_name(shard)}.npz") as wanted:  # an npz holds its file open
            rows, ids, boxes = wanted["rows"], wanted["sample_ids"].tolist(), wanted["boxes"]
        row_of = {sample_id: k for k, sample_id in enumerate(ids)}
        target = features_dir(self.root, shard)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        index = np.zeros(len(ids), _INDEX_DTYPE)
        index["row"] = rows
        counts = {"kp": 0, "grey": 0}
        unreadable = 0
        files = [open(tmp / name, "wb") for name in _FILES]  # noqa: SIM115  # closed below
        try:

            def keep(k: int, feats: LocalFeatures | None) -> None:
                nonlocal unreadable
                if feats is None:
                    unreadable += 1
                    return
                n_kp, (h, w) = feats.points.shape[0], feats.grey.shape[:2]
                index[k] = (rows[k], counts["kp"], n_kp, counts["grey"], h, w, feats.scale)
                files[0].write(np.ascontiguousarray(feats.points, np.float32).tobytes())
                files[1].write(np.ascontiguousarray(feats.descriptors, np.uint8).tobytes())
                files[2].write(np.ascontiguousarray(feats.grey, np.uint8).tobytes())
                counts["kp"] += n_kp
                counts["grey"] += h * w

            def arrivals() -> Iterator[tuple[int, bytes]]:
                for sample_id, data in stream_images([shard], dict.fromkeys(ids, shard.shard_id)):
                    yield row_of[sample_id], data

            def one(k: int, data: bytes) -> tuple[int, LocalFeatures | None]:
                return k, look(data, boxes[k], self.config)

            seen = 0
            with ThreadPoolExecutor(max_workers=_threads(self.threads)) as pool:  # PIL and OpenCV release the GIL
                # The next chunk is read while the pool decodes this one: two chunks' bytes at most.
                pending: list[Future[tuple[int, LocalFeatures | None]]] = []
                for chunk in batched(arrivals(), CHUNK_ROWS):
                    submitted = [pool.submit(one, k, data) for k, data in chunk]
                    for fut in pending:
                        keep(*fut.result())
                    seen += len(pending)
                    if progress is not None and pending:
                        progress(len(pending))
                    pending = submitted
                for fut in pending:
                    keep(*fut.result())
                seen += len(pending)
                if progress is not None and pending:
                    progress(len(pending))
            unreadable += len(ids) - seen  # never found in the shard (moved, changed, gone)
        finally:
            for fh in files:
                fh.close()
        with open(tmp / "index.npy", "wb") as fh:
            np.save(fh, index)  # written last: a folder with its index is complete
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return {"samples": len(ids), "looked": len(ids), "unreadable": unreadable}


def features_dir(root: Path, shard: Shard | str) -> Path:
    name = shard if isinstance(shard, str) else shard_file_name(shard)
    return root / "features" / name


class _Features:
    """The local features of one shard's re-read images, memory-mapped; rows gathered on demand."""

    def __init__(self, directory: Path) -> None:
        self.index = np.load(directory / "index.npy")
        self.directory = directory
        self.position = {int(r): k for k, r in enumerate(self.index["row"].tolist())}

    def _map(self, name: str, dtype: Any) -> np.ndarray:
        path = self.directory / name
        if path.stat().st_size == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def get(self, rows: Sequence[int]) -> dict[int, LocalFeatures | None]:
        points, desc, grey = self._map("points.bin", np.float32), self._map("descriptors.bin", np.uint8), self._map("grey.bin", np.uint8)
        out: dict[int, LocalFeatures | None] = {}
        for r in rows:
            k = self.position.get(int(r))
            if k is None:
                out[int(r)] = None
                continue
            e = self.index[k]
            n, h, w = int(e["kp_count"]), int(e["h"]), int(e["w"])
            if h == 0:  # unreadable
                out[int(r)] = None
                continue
            a, g = int(e["kp_start"]), int(e["grey_start"])
            out[int(r)] = LocalFeatures(
                np.array(points[2 * a : 2 * (a + n)]).reshape(n, 2),
                np.array(desc[32 * a : 32 * (a + n)]).reshape(n, 32),
                np.array(grey[g : g + h * w]).reshape(h, w),
                float(e["scale"]),
            )
        del points, desc, grey
        return out


@dataclass(frozen=True)
class CheckStep:
    """Phase B: check one shard's candidate pairs on the features phase A wrote.

    ``names``: every shard's file name, by the shard index the candidates carry (``si``,
    ``sj``), where a partner's features are found."""

    config: RunConfig
    root: Path
    names: tuple[str, ...]
    threads: int = 0

    def paths(self, shard: Shard) -> list[Path]:
        return [self.root / "edges" / f"{shard_file_name(shard)}.npy"]

    def __call__(self, shard: Shard, progress: Callable[[int], object] | None = None) -> dict[str, Any]:
        cands = np.load(self.root / "candidates" / f"{shard_file_name(shard)}.npy")
        search = self.config.search
        order = np.argsort(-cands["score"], kind="stable")  # best score first
        opened: dict[int, _Features] = {}
        cache: dict[int, LocalFeatures | None] = {}

        def fetch(pairs: np.ndarray) -> None:
            """Features of both ends of ``pairs`` into the cache (evicting the oldest)."""
            need: dict[int, set[int]] = {}
            for r, s in ((pairs["i"], pairs["si"]), (pairs["j"], pairs["sj"])):
                for row, sh in zip(r.tolist(), s.tolist(), strict=True):
                    if row not in cache:
                        need.setdefault(sh, set()).add(row)
            for sh, rows in sorted(need.items()):
                if sh not in opened:
                    opened[sh] = _Features(features_dir(self.root, self.names[sh]))
                cache.update(opened[sh].get(sorted(rows)))
            while len(cache) > max(CACHE_ROWS, 2 * pairs.size):
                cache.pop(next(iter(cache)))

        parent: dict[int, int] = {}  # union-find over the direct links' components, as checks confirm

        def root(x: int) -> int:
            while (up := parent.get(x, x)) != x:
                parent[x] = parent.get(up, up)  # path halving
                x = up
            return x

        def check(pair: tuple[LocalFeatures | None, LocalFeatures | None, bool]) -> bool:
            query, target, partial = pair
            if not query or not target:
                return False
            return confirms(query, target, search, partial=partial)

        accept = np.zeros(cands.size, bool)
        checked = 0
        with ThreadPoolExecutor(max_workers=_threads(self.threads), initializer=one_thread_each) as pool:
            for start in range(0, order.size, CHECK_BLOCK):
                block = [k for k in order[start : start + CHECK_BLOCK].tolist() if root(int(cands["li"][k])) != root(int(cands["lj"][k]))]
                if not block:
                    continue
                checked += len(block)
                fetch(cands[block])
                pairs = [(cache.get(int(cands["j"][k])), cache.get(int(cands["i"][k])), bool(cands["window"][k] >= 0)) for k in block]
                for k, ok in zip(block, pool.map(check, pairs), strict=True):
                    accept[k] = ok
                    if ok:
                        ri, rj = root(int(cands["li"][k])), root(int(cands["lj"][k]))
                        if ri != rj:
                            parent[ri] = rj
                if progress is not None:
                    progress(len(block))
        # Several windows of one container may propose the same pair: keep the best.
        got = cands[accept]
        lo, hi = np.minimum(got["i"], got["j"]), np.maximum(got["i"], got["j"])
        keep = best_per_pair(lo, hi, got["score"])
        edges = np.zeros(keep.size, EDGE_DTYPE)
        edges["i"], edges["j"], edges["score"] = lo[keep], hi[keep], got["score"][keep]
        edges["signal"] = np.where(got["window"][keep] >= 0, int(Signal.PARTIAL), int(Signal.VERIFIED))
        with atomic_path(self.paths(shard)[0]) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, edges)
        return {"samples": int(cands.size), "checked": checked, "confirmed": int(keep.size)}


def read_edges(root: Path, shards: Sequence[Shard]) -> np.ndarray:
    """The confirmed links of ``shards`` (their edge files, in shard order)."""
    parts = [np.load(root / "edges" / f"{shard_file_name(s)}.npy") for s in shards]
    return np.concatenate(parts) if parts else np.zeros(0, EDGE_DTYPE)
