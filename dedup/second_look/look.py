"""The second look, orchestrated: propose, re-read the few images involved, check them properly.

Two kinds of candidates reach this stage (both proposed by :mod:`dedup.search`):

- **global** pairs whose fast embedding (the distilled SSCD) scored in the band
  ``[search.verify_from, search.threshold)``. With ``search.verify_by = "geometry"`` (the
  default) the pair must align: ``search.verify_inliers`` ORB matches must fit one rotation,
  scale and shift (or failing that one homography), and once one image is warped onto the
  other, ``search.verify_agreement`` of the overlap's pixels must agree after the best gain and
  offset (:func:`confirms`). Crops, pads, captions, rotations and recolourings pass; drawings
  of one family (puzzle pieces, road signs) share keypoints but not their pixels, and flat
  images find no keypoints. Each image's ``search.verify_per_image`` best band pairs are
  looked at. With
  ``"model"`` both images are embedded again with ``search.verify_model`` (full SSCD) and the
  pair is kept at ``search.verify_threshold`` (the cascade the SSCD student was made for);
  measured on the bench, the full model separates copies from look-alikes no better than the
  student does.
- **partial** pairs: a region descriptor of image *i* (a window of its feature map, see
  :mod:`dedup.embed.regions`) came close to image *j*'s whole-image embedding. Region scores
  propose but never decide — they lift unrelated pairs too (on the bench, deciding on them cost
  more precision than any recall they bought, and re-embedding the window's crop with full SSCD
  separated no better at 10x the cost). What decides is geometry: *j*'s ORB features must land
  in *i* under one homography (``search.partial_inliers`` of them with half the aligned
  pixels agreeing, or as many as a global pair needs with as many agreeing), which a pasted,
  framed, warped picture passes and a different picture on the same kind of background does not.

The pipeline keeps no image bytes, so the images are read back from their shards
(:func:`dedup.sources.readback.stream_images`: only the shards that hold a candidate, each once and
only until its last wanted sample), decoded a chunk of rows at a time while the next is read. A
candidate whose image can no longer be read (the source moved or changed) is not linked: a
second look that cannot look does not confirm. Local features of the candidate rows stay in memory until the pairs are checked:
about 120 KB a row (1,000 ORB descriptors and a 320 px grey copy for the pixel check).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from itertools import batched
from pathlib import Path

import numpy as np
import pyarrow as pa

from dedup._io import atomic_path, atomic_write_text
from dedup._progress import ProgressFactory, silent
from dedup._types import Shard
from dedup.cluster import components
from dedup.config import RunConfig, Verifier
from dedup.embed import Embedder, build_embedder
from dedup.errors import SampleError
from dedup.executors.base import Executor, Markers, shard_file_name
from dedup.executors.local import LocalExecutor
from dedup.fingerprint import decode, trim_borders
from dedup.rows import FeatureRows, as_rows
from dedup.partition import VectorFiles, auto_settings, partitioned_edges
from dedup.search import Candidates, Edges, Signal, best_per_pair
from dedup.second_look.geometry import LOCAL_SIDE, LocalFeatures, confirms, local_features, one_thread_each
from dedup.second_look.propose import IVF_ABOVE, RegionFiles, band_candidates, fresh, ivf_lists, partial_candidates, top_per_image, whole_index
from dedup.second_look.tasks import CANDIDATE_DTYPE, CheckStep, ReadStep, crop_to, read_edges
from dedup.sources.readback import stream_images

__all__ = ["second_look", "verify", "verify_candidates"]

_CHECK_BLOCK = 256  # pairs checked between two updates of what is joined (see verify())


CHUNK_ROWS = 256  # images read (encoded bytes held) at once while verifying


def verify(
    table: pa.Table | FeatureRows,
    candidates: Candidates,
    cfg: RunConfig,
    *,
    shards: Sequence[Shard],
    progress: Callable[[int], object] | None = None,
    embedder: Embedder | None = None,
    joined: np.ndarray | None = None,
    trims: np.ndarray | None = None,
) -> tuple[Edges, dict[str, int]]:
    """The candidates a second look confirms, as edges, and counts for the report.

    ``joined`` (a component label per row, from the links already made) lets the geometric
    checks run best score first, a block at a time, skipping the pairs that earlier
    confirmations have already joined: the components come out the same, for a fifth fewer
    checks on the bench (a large group's copies are joined long before its last pairs).
    ``trims`` (a box per row, shares of the image; NaN where unknown) crops each re-read image
    as its model input was cut, instead of measuring its margins again.

    Global candidates (``window < 0``) become :attr:`Signal.VERIFIED` links, scored by their
    proposing similarity when geometry confirms them (``search.verify_by = "geometry"``:
    :func:`confirms`), or re-embedded with ``search.verify_model`` and scored by it at
    ``search.verify_threshold`` (``"model"``). Partial ones must pass :func:`confirms` too and
    become :attr:`Signal.PARTIAL` links, scored by their proposing region similarity.
    """
    stats = {"candidates": len(candidates), "global": 0, "partial": 0, "confirmed": 0, "unreadable": 0}
    if not len(candidates):
        return Edges.empty(), stats
    search = cfg.search
    is_partial = candidates.window >= 0
    stats["partial"] = int(is_partial.sum())
    stats["global"] = len(candidates) - stats["partial"]
    model: Embedder | None = None
    by_model = search.verify_by == Verifier.MODEL
    if stats["global"] and by_model:
        model = embedder or build_embedder(
            replace(cfg.embed, model=search.verify_model, regions=False, model_path=None)
            if cfg.embed.model != search.verify_model
            else replace(cfg.embed, regions=False),
            threads=None,
        )
    embed_rows = set(np.concatenate([candidates.i[~is_partial], candidates.j[~is_partial]]).tolist()) if model else set()
    by_geometry = is_partial | (not by_model)
    local_rows = set(np.concatenate([candidates.i[by_geometry], candidates.j[by_geometry]]).tolist())
    rows = np.array(sorted(embed_rows | local_rows), np.int64)

    ids = as_rows(table).take(["sample_id", "shard"], rows)
    sample_of = dict(zip(rows.tolist(), ids.column("sample_id").to_pylist(), strict=True))
    shard_of = dict(zip(rows.tolist(), ids.column("shard").to_pylist(), strict=True))
    whole: dict[int, np.ndarray] = {}
    local: dict[int, LocalFeatures] = {}
    def look(r: int, data: bytes | None) -> tuple[int, np.ndarray | None, LocalFeatures | None]:
        """Decode one image and take what its pairs need; the image itself is dropped."""
        if data is None:
            return r, None, None
        # What the embedding saw, so a trimmed copy compares as it did: the box the fingerprint
        # stage cut, else (features from before boxes were kept) the margins measured again.
        box = trims[r] if trims is not None else None
        if box is not None and np.isnan(box).any():
            box = None
        # ORB and the pixel check see brightness only: the luma is all that is decoded, unless
        # the verifying model or a new measure of the margins (in colour) needs more.
        grey = (model is None or r not in embed_rows) and (box is not None or not cfg.fingerprint.trim)
        try:
            # Local features look at 512 px, the model at its input size: a JPEG can decode at
            # a reduced scale. Trimming then measures that image, as it measured the
            # full one to within a pixel.
            img = decode(data, max_pixels=cfg.fingerprint.max_pixels, draft=LOCAL_SIDE, grey=grey)
        except SampleError:
            return r, None, None
        if box is not None:
            img = _crop_to(img, box)
        elif cfg.fingerprint.trim:
            img = trim_borders(img)
        model_input = model.preprocess(img) if model is not None and r in embed_rows else None
        feats = local_features(img) if r in local_rows else None
        return r, model_input, feats

    def take(looked: Sequence[tuple[int, np.ndarray | None, LocalFeatures | None]]) -> None:
        inputs: list[tuple[int, np.ndarray]] = []
        for r, model_input, feats in looked:
            if model_input is None and feats is None:
                stats["unreadable"] += 1
            if model_input is not None:
                inputs.append((r, model_input))
            if feats is not None:
                local[r] = feats
        if model is not None:
            for b in range(0, len(inputs), 32):
                batch = inputs[b : b + 32]
                vecs = model.embed(np.stack([x for _, x in batch]))
                whole.update(zip([r for r, _ in batch], vecs, strict=True))
        if progress is not None and looked:
            progress(len(looked))

    def arrivals() -> Iterator[tuple[int, bytes | None]]:
        """``(row, bytes)`` as the shards are read, each once; then the rows never found."""
        row_of = {sample_of[r]: r for r in rows.tolist()}
        seen: set[int] = set()
        for sample_id, data in stream_images(shards, {sample_of[r]: shard_of[r] for r in rows.tolist()}):
            seen.add(row_of[sample_id])
            yield row_of[sample_id], data
        yield from ((r, None) for r in rows.tolist() if r not in seen)

    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and OpenCV release the GIL
        # The next chunk is read while the pool decodes this one: two chunks' bytes at most.
        pending: list[Future[tuple[int, np.ndarray | None, LocalFeatures | None]]] = []
        for chunk in batched(arrivals(), CHUNK_ROWS):
            submitted = [pool.submit(look, r, data) for r, data in chunk]
            take([f.result() for f in pending])
            pending = submitted
        take([f.result() for f in pending])

    score = np.zeros(len(candidates), np.float32)
    accept = np.zeros(len(candidates), bool)
    if by_model:
        for k in np.flatnonzero(~is_partial).tolist():
            a, b = whole.get(int(candidates.i[k])), whole.get(int(candidates.j[k]))
            if a is not None and b is not None:
                score[k] = float(np.dot(a, b))
                accept[k] = score[k] >= search.verify_threshold

    def check(pair: tuple[LocalFeatures | None, LocalFeatures | None, bool]) -> bool:
        query, target, partial = pair
        if not query or not target:
            return False
        return confirms(query, target, search, partial=partial)

    checks = np.flatnonzero(by_geometry)
    checks = checks[np.argsort(-candidates.score[checks], kind="stable")]  # best score first
    parent: dict[int, int] = {}  # union-find over ``joined``'s components, as checks confirm

    def root(x: int) -> int:
        while (up := parent.get(x, x)) != x:
            parent[x] = parent.get(up, up)  # path halving
            x = up
        return x

    def ends(k: int) -> tuple[int, int]:
        assert joined is not None
        return root(int(joined[candidates.i[k]])), root(int(joined[candidates.j[k]]))

    stats["checked"] = 0
    with ThreadPoolExecutor(max_workers=workers, initializer=one_thread_each) as pool:
        for start in range(0, checks.size, _CHECK_BLOCK):
            block = checks[start : start + _CHECK_BLOCK].tolist()
            if joined is not None:
                block = [k for k in block if len(set(ends(k))) == 2]  # not joined yet
            stats["checked"] += len(block)
            pairs = [(local.get(int(candidates.j[k])), local.get(int(candidates.i[k])), bool(is_partial[k])) for k in block]
            for k, ok in zip(block, pool.map(check, pairs), strict=True):
                score[k] = candidates.score[k]
                accept[k] = ok
                if ok and joined is not None:
                    ri, rj = ends(k)
                    if ri != rj:
                        parent[ri] = rj
    # Several windows of one container may propose the same pair: keep the best.
    edges = _best_per_pair(candidates.i[accept], candidates.j[accept], score[accept], is_partial[accept])
    stats["confirmed"] = len(edges)
    return edges, stats


_crop_to = crop_to  # the name the model path and older callers know


def _best_per_pair(i: np.ndarray, j: np.ndarray, score: np.ndarray, partial: np.ndarray) -> Edges:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    keep = best_per_pair(lo, hi, score)
    signal = np.where(partial[keep], int(Signal.PARTIAL), int(Signal.VERIFIED)).astype(np.int8)
    return Edges(lo[keep], hi[keep], score[keep].astype(np.float32), signal)


def second_look(
    table: pa.Table | FeatureRows,
    vectors: np.ndarray | VectorFiles,
    direct: Edges,
    cfg: RunConfig,
    *,
    shards: Sequence[Shard],
    regions: RegionFiles | None = None,
    trims: np.ndarray | None = None,
    work_dir: Path | None = None,
    executor: Executor | None = None,
    progress: ProgressFactory = silent,
    on_phase: Callable[[str], object] | None = None,
) -> tuple[Edges, dict[str, int]]:
    """Confirmed links beyond ``direct`` (the links every signal made at its own threshold), at
    any number of rows.

    Proposes the band candidates (``search.verify_from``: each image's
    ``search.verify_per_image`` best pairs in the band not joined by ``direct`` links, from its
    nearest neighbours a block of images at a time) and, with ``regions``
    (:class:`~dedup.second_look.propose.RegionFiles`), the partial ones (``search.partial``),
    both from one index of the whole images: exact up to
    :data:`~dedup.second_look.propose.IVF_ABOVE` images (or ``search.partition_above``), an
    inverted file above (with ``verify_per_image`` 0, every band pair: the
    partitioned search); drops those already joined by ``direct`` links; spills the rest under ``work_dir`` grouped
    by the shard of their lower row and verifies them as per-shard tasks through ``executor``
    (:mod:`dedup.second_look.tasks`; default: this process, ``cfg.workers`` processes), each
    re-reading only its own shard's images. The candidates are kept under ``work_dir``
    (:data:`PROPOSALS`, keyed by the features, the direct links and the settings) and a rerun
    with the same key takes them from there, then resumes from the tasks' completion markers. Only rows with an image and an embedding take part. ``trims`` (a
    box per embedded row, :func:`load_trims`) says where each model input was cut from its
    image. ``on_phase(name)`` is told as each part ends (``pipeline.PhaseLog``).

    With ``search.verify_by = "model"`` the band pairs are re-embedded on the driver
    (:func:`verify`), whose memory grows with the candidate rows.
    """
    search = cfg.search
    rows_of = as_rows(table)
    embedded_rows = np.flatnonzero(rows_of.flags("embedded"))
    has_image = rows_of.flags("has_image") & rows_of.equals("status", "ok")
    use = has_image[embedded_rows] if embedded_rows.size else np.zeros(0, bool)
    stats: dict[str, int] = {"candidates": 0, "confirmed": 0}
    if embedded_rows.size < 2 or not use.any():
        return Edges.empty(), stats
    labels = components(rows_of.num_rows, direct)
    with _work_folder(work_dir) as work:
        # Proposing costs minutes at scale (half an hour at 200,000 images on two cores): kept
        # beside the tasks, so a rerun after a crash in the read or check tasks starts there.
        saved, key = work / PROPOSALS, _proposal_key(cfg, shards, direct, use, rows_of.num_rows) if work_dir is not None else ""
        cands = _load_proposals(saved, key) if key else None
        if cands is None:
            cands = _propose(vectors, embedded_rows, use, labels, cfg, regions=regions, work=work, progress=progress)
            if key:
                _save_proposals(saved, key, cands)
        if on_phase is not None:
            on_phase("second look: propose")
        if not len(cands):
            return Edges.empty(), stats
        boxes = None
        if trims is not None and trims.shape == (embedded_rows.size, 4):
            boxes = np.full((rows_of.num_rows, 4), np.nan, np.float32)
            boxes[embedded_rows] = trims
        if search.verify_by == Verifier.MODEL and bool((cands.window < 0).any()):
            with progress("second look: verify", int(np.unique(np.concatenate([cands.i, cands.j])).size), "img") as bar:
                return verify(rows_of, cands, cfg, shards=shards, progress=bar.update, joined=labels, trims=boxes)
        return verify_candidates(rows_of, cands, labels, cfg, shards=shards, boxes=boxes, root=work / "second_look",
                                executor=executor, progress=progress, on_phase=on_phase)  # fmt: skip


def _propose(
    vectors: np.ndarray | VectorFiles,
    embedded_rows: np.ndarray,
    use: np.ndarray,
    labels: np.ndarray,
    cfg: RunConfig,
    *,
    regions: RegionFiles | None,
    work: Path,
    progress: ProgressFactory,
) -> Candidates:
    """The band and partial-copy candidates not yet joined by the direct links (``labels``)."""
    search = cfg.search
    rows = embedded_rows[use]
    large = embedded_rows.size > search.partition_above
    parts: list[Candidates] = []
    band_on = 0 <= search.verify_from < search.threshold
    partial_on = search.partial and regions is not None and len(regions) == embedded_rows.size
    # One index of the whole images serves both proposals: exact up to IVF_ABOVE images (or
    # partition_above, if lower), an inverted file above (each query visits its nearest cells).
    nearest = band_on and search.verify_per_image > 0
    cells = ivf_lists(int(rows.size)) if large or rows.size > IVF_ABOVE else 0
    index = whole_index(vectors, use, lists=cells) if nearest or partial_on else None
    if band_on:
        partitioned = None
        if large and not nearest:
            partitioned = functools.partial(
                partitioned_edges,
                work_dir=work / "second_look.search",
                settings=auto_settings(int(embedded_rows.size), partitions=search.partitions, margin=search.margin),
            )
        with progress("second look: propose", int(rows.size if nearest or not large else embedded_rows.size), "vec") as bar:
            band = band_candidates(
                vectors, embedded_rows, use, low=search.verify_from, high=search.threshold,
                block_size=search.block_size, labels=labels, per_image=search.verify_per_image, index=index,
                partitioned=partitioned, progress=bar.update,
            )  # fmt: skip
        if not nearest:
            band = top_per_image(fresh(band, labels), search.verify_per_image)
        parts.append(band)
    if partial_on:
        assert regions is not None
        with progress("partial copies: propose", int(embedded_rows.size), "img") as bar:
            parts.append(
                partial_candidates(
                    vectors, regions, embedded_rows, use, propose=search.partial_propose, top_k=search.partial_top_k,
                    margin=search.partial_margin, per_image=search.partial_per_image, index=index, progress=bar.update,
                )  # fmt: skip
            )
    del index
    cands = Candidates.concat(parts)
    del parts
    cands = fresh(cands, labels)  # pairs the direct links already join need no second look
    return cands


PROPOSALS = "second_look.proposals.npz"


def _proposal_key(cfg: RunConfig, shards: Sequence[Shard], direct: Edges, use: np.ndarray, n_rows: int) -> str:
    """What the proposals depend on: the features (the shards as read and the settings that
    compute them), the direct links, which rows take part, and the search settings."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.stage_key(), repr(cfg.search), n_rows, [(s.shard_id, s.stamp) for s in shards]]).encode())
    for part in (direct.i, direct.j, use):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def _load_proposals(path: Path, key: str) -> Candidates | None:
    try:
        with np.load(path) as saved:
            if str(saved["key"]) != key:
                return None
            return Candidates(saved["i"], saved["j"], saved["score"], saved["window"])
    except (OSError, ValueError, KeyError):  # none yet, or a damaged file: proposed again
        return None


def _save_proposals(path: Path, key: str, cands: Candidates) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, key=np.array(key), i=cands.i, j=cands.j, score=cands.score, window=cands.window)


@contextmanager
def _work_folder(work_dir: Path | None) -> Iterator[Path]:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        yield work_dir
        return
    with tempfile.TemporaryDirectory(prefix="dedup-second-look-") as tmp:
        yield Path(tmp)


def verify_candidates(
    rows_of: FeatureRows,
    cands: Candidates,
    labels: np.ndarray,
    cfg: RunConfig,
    *,
    shards: Sequence[Shard],
    boxes: np.ndarray | None,
    root: Path,
    executor: Executor | None = None,
    progress: ProgressFactory = silent,
    on_phase: Callable[[str], object] | None = None,
) -> tuple[Edges, dict[str, int]]:
    """Spill ``cands`` by shard under ``root``, run the read and check tasks, gather the edges:
    what :func:`second_look` does after proposing, and what ``check`` calls with its own
    proposals (pairs against an index)."""
    stats = {"candidates": len(cands), "global": 0, "partial": 0, "confirmed": 0, "unreadable": 0, "checked": 0}
    is_partial = cands.window >= 0
    stats["partial"] = int(is_partial.sum())
    stats["global"] = len(cands) - stats["partial"]
    involved = np.unique(np.concatenate([cands.i, cands.j]))
    ids = rows_of.take(["sample_id", "shard"], involved)
    index_of = {s.shard_id: k for k, s in enumerate(shards)}
    shard_idx = np.array([index_of.get(sh, -1) for sh in ids.column("shard").to_pylist()], np.int32)
    sample_ids = np.array(ids.column("sample_id").to_pylist(), dtype=str) if involved.size else np.zeros(0, str)
    del ids
    si = shard_idx[np.searchsorted(involved, cands.i)]
    sj = shard_idx[np.searchsorted(involved, cands.j)]
    # A row whose shard is not among ``shards`` cannot be re-read: its pairs are not confirmed.
    known = (si >= 0) & (sj >= 0)
    stats["unreadable"] += int(np.unique(involved[shard_idx < 0]).size)
    table = np.zeros(int(known.sum()), CANDIDATE_DTYPE)
    for name, values in (("i", cands.i), ("j", cands.j), ("score", cands.score), ("window", cands.window), ("si", si), ("sj", sj)):
        table[name] = values[known]
    table["li"], table["lj"] = labels[table["i"]], labels[table["j"]]
    home = np.where(table["i"] < table["j"], table["si"], table["sj"])  # the shard of the lower row
    table = table[np.lexsort((table["window"], table["j"], table["i"], home))]
    home = np.sort(home, kind="stable")
    names = tuple(shard_file_name(s) for s in shards)

    # What each shard must re-read: its rows that some candidate names.
    ends = np.unique(np.concatenate([table["i"], table["j"]]))
    at = np.searchsorted(involved, ends)
    end_shard = shard_idx[at]
    key = _digest(table, ends, sample_ids[at], boxes[ends] if boxes is not None else None, names, cfg)
    _start(root, key)
    read_shards: list[Shard] = []
    for k in np.unique(end_shard).tolist():
        sel = end_shard == k
        path = root / "wanted" / f"{names[k]}.npz"
        if not path.is_file():
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                box = boxes[ends[sel]] if boxes is not None else np.full((int(sel.sum()), 4), np.nan, np.float32)
                np.savez(fh, rows=ends[sel], sample_ids=sample_ids[at][sel], boxes=box)
        read_shards.append(shards[k])
    check_shards: list[Shard] = []
    bounds = np.searchsorted(home, np.arange(len(shards) + 1))
    for k in range(len(shards)):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        if lo == hi:
            continue
        path = root / "candidates" / f"{names[k]}.npy"
        if not path.is_file():
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, table[lo:hi])
        check_shards.append(shards[k])
    del table, home
    runner = executor or LocalExecutor(workers=cfg.workers, threads=cfg.local_threads())
    reader = ReadStep(config=cfg, root=root)
    checker = CheckStep(config=cfg, root=root, names=names)
    read_markers = Markers(root / "done-read", outputs=reader.paths)
    check_markers = Markers(root / "done-check", outputs=checker.paths)
    # Once every check task is done the features are deleted (they are ~120 KB an image): a
    # rerun then needs no read task either, and takes their stats from the markers' record.
    checks_done = all(check_markers.read(s) is not None for s in check_shards)
    if checks_done:
        read_markers = Markers(root / "done-read")
    with progress("second look: read", int(ends.size), "img") as bar:
        done = runner.run(reader, read_shards, markers=read_markers, on_progress=bar.update)
    stats["unreadable"] += sum(int(done[s.shard_id].get("unreadable", 0)) for s in read_shards)
    stats["looked"] = int(ends.size)
    if on_phase is not None:
        on_phase("second look: read")
    with progress("second look: verify", int(len(cands)), "pair") as bar:
        done = runner.run(checker, check_shards, markers=check_markers, on_progress=bar.update)
    for s in check_shards:
        stats["checked"] += int(done[s.shard_id].get("checked", 0))
    shutil.rmtree(root / "features", ignore_errors=True)
    found = read_edges(root, check_shards)
    edges = Edges(found["i"], found["j"], found["score"].astype(np.float32), found["signal"].astype(np.int8))
    stats["confirmed"] = len(edges)
    return edges, stats


def _digest(table: np.ndarray, ends: np.ndarray, ids: np.ndarray, boxes: np.ndarray | None, names: tuple[str, ...], cfg: RunConfig) -> str:
    """What the tasks' results depend on: their candidates, images, boxes and settings."""
    h = hashlib.sha256()
    for part in (table, ends, np.asarray(ids, str), boxes if boxes is not None else np.zeros(0)):
        h.update(np.ascontiguousarray(part).tobytes())
    h.update(json.dumps([names, repr(cfg.search), repr(cfg.fingerprint)]).encode())
    return h.hexdigest()


def _start(root: Path, key: str) -> None:
    """Keep ``root`` (and its finished tasks) when it holds these candidates; otherwise empty it."""
    stamp = root / "key.json"
    try:
        if json.loads(stamp.read_text(encoding="utf-8")).get("key") == key:
            return
    except (OSError, ValueError):
        pass
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    atomic_write_text(stamp, json.dumps({"key": key}) + "\n")
