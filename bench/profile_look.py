"""The second look's CPU: per phase (read + ORB, the per-pair check) and inside each (issue 25).

Usage::

    python bench/profile_look.py --run OUT [--pairs 2000] [--rounds 2] [--baseline REV]

``OUT`` is a finished ``dedup run`` with the default preset (the second look on): its work
folder holds the candidate pairs and the rows each shard re-read
(``OUT/.work/<key>/second_look/{candidates,wanted}``). A seeded sample of ``--pairs`` candidates
(all with 0) is replayed in this process, one thread (OpenCV and faiss on one thread, as the
check pool's threads run them):

- **read**: each image of the sample read back from its source (:mod:`dedup.sources.readback`)
  and turned into local features as a read task does (:func:`dedup.second_look.tasks.look`:
  decode at 512 px, trim box, ORB, the 320 px grey copy);
- **check**: :func:`dedup.second_look.geometry.confirms` over every sampled pair (no pair
  skipped as already joined: every pair is paid for here);
- with ``--propose``, **propose**: the run's band and partial proposals made again from its
  checkpoints (all its images, not the sample).

``--check-only`` makes the features once (this tree's code) and times the check alone.

Each phase's CPU seconds (``time.process_time``, the fastest of ``--rounds``) per image or
pair, then a cProfile pass split into the parts that cost (descriptor matching, RANSAC, warps,
the agreement's pixel arithmetic, its edge maps, ...), with how often each ran.

``--baseline REV`` (a git revision, e.g. ``main``) loads that revision's
``dedup/second_look/geometry.py`` beside the working tree's and times both over the same
images and pairs in alternating rounds (``A B B A ...``): the same-process A/B of a faster
kernel. It fails unless both give the same features (points, descriptors, grey copy) and the
same decision for every pair.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# cProfile's leaf functions (tottime), by the part of the work they are: the first pattern
# found in "file:function" names the part; the rest is "python (the kernel's own code)".
_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("read bytes (sources)", ("sources/", "readback", "posix.read", "io.open", "'read' of", "_io.")),
    ("decode (Pillow)", ("ImageFile", "'decode' of", "Image.py:load", "JpegImagePlugin", "PngImagePlugin", "WebPImagePlugin", "draft")),
    ("grey + resize to 512 (Pillow)", ("'convert' of", "'resize' of", "Image.py:resize", "Image.py:convert")),
    ("trim box", ("trim_box", "trim_borders", "crop")),
    ("ORB detect + describe", ("detectAndCompute", "ORB_create", "KeyPoint_convert")),
    ("descriptor matching (faiss)", ("faiss", "IndexBinary", "swig")),
    ("RANSAC similarity", ("estimateAffinePartial2D",)),
    ("RANSAC homography", ("findHomography",)),
    ("blur (pair's grey copies)", ("GaussianBlur",)),
    ("warp", ("warpAffine", "warpPerspective")),
    ("edge maps (Sobel, hypot, dilate)", ("Sobel", "hypot", "'dilate'", "cv2.dilate", "_edges")),
    ("opening of disagreement", ("morphologyEx",)),
    ("agreement arithmetic (numpy)", ("numpy", "einsum", "count_nonzero", "maximum", "logical_and", "'sum' of", "'astype'", "allclose", "isclose", "inv", "'abs'", "absolute")),
    ("cv2 resize (320 px copy)", ("cv2.resize",)),
)


def _part(name: str) -> str:
    for part, patterns in _PARTS:
        if any(p in name for p in patterns):
            return part
    return "python lines and numpy operators (the kernel's own)"


def _breakdown(prof: cProfile.Profile) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds of tottime per part, and call counts of the kernel's own functions."""
    stats = pstats.Stats(prof)
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    for (file, _line, func), (_cc, nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        name = f"{file}:{func}" if file != "~" else func
        seconds[_part(name)] = seconds.get(_part(name), 0.0) + tt
        if "geometry" in file or func.startswith(("<built-in method cv2.", "<method 'search'")):
            key = func if file == "~" else f"{Path(file).stem}.{func}"
            calls[key] = calls.get(key, 0) + nc
    return seconds, calls


def _geometry_at(rev: str, where: Path) -> ModuleType:
    """``dedup/second_look/geometry.py`` as of git revision ``rev``, imported as a module of
    its own (it imports only the base layer, which both revisions share)."""
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:dedup/second_look/geometry.py"], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = where / f"geometry_{rev.replace('/', '_')}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"_geometry_{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _second_look_dir(run: Path) -> Path:
    found = sorted(p for p in (run / ".work").glob("*/second_look") if (p / "candidates").is_dir() and (p / "wanted").is_dir())
    if not found:
        raise SystemExit(f"no second look under {run}/.work/*/second_look: run `dedup run ... --out {run}` with the default preset first")
    return found[0]


def _load(run: Path, pairs: int, seed: int) -> tuple[np.ndarray, dict[int, tuple[str, str, np.ndarray]], Any, list[Any]]:
    """The sampled candidates, what each of their rows is (sample id, shard file name, trim box),
    the run's config and shards."""
    import json

    import pyarrow.parquet as pq

    from dedup.config import RunConfig, from_dict
    from dedup.sources.readback import rediscover

    root = _second_look_dir(run)
    cands = np.concatenate([np.load(f) for f in sorted((root / "candidates").glob("*.npy"))])
    if pairs and cands.size > pairs:
        cands = cands[np.sort(np.random.default_rng(seed).choice(cands.size, pairs, replace=False))]
    rows: dict[int, tuple[str, str, np.ndarray]] = {}
    for f in sorted((root / "wanted").glob("*.npz")):
        with np.load(f) as w:
            for r, sid, box in zip(w["rows"].tolist(), w["sample_ids"].tolist(), w["boxes"], strict=True):
                rows[int(r)] = (str(sid), f.stem, box)
    need = set(cands["i"].tolist()) | set(cands["j"].tolist())
    rows = {r: v for r, v in rows.items() if r in need}
    cfg_path = run / "config.json"
    cfg = from_dict(RunConfig, json.loads(cfg_path.read_text(encoding="utf-8"))) if cfg_path.exists() else RunConfig()
    shards = rediscover(pq.read_table(run / "manifest.parquet", columns=["source"]).column("source").to_pylist())
    return cands, rows, cfg, shards


def _propose_cpu(run: Path, cfg: Any, shards: list[Any], rounds: int) -> tuple[float, int]:
    """CPU seconds of proposing (:func:`dedup.second_look.look._propose`: band and partial
    candidates from the run's own checkpoints, reused, and its direct links, searched again),
    the fastest of ``rounds``, and how many pairs it proposed."""
    from dedup import pipeline
    from dedup._progress import silent
    from dedup.cluster import components
    from dedup.featurize import FeatureStep
    from dedup.rows import as_rows
    from dedup.second_look import RegionFiles, look
    from dedup.signals import find_edges

    work = _second_look_dir(run).parent
    rows, vectors, _ = pipeline.featurize(shards, work, cfg, lazy=True)
    rows_of = as_rows(rows)
    edges, _ = find_edges(rows_of, vectors, cfg)
    step = FeatureStep(config=cfg, out_dir=work / pipeline.FEATURES)
    regions = RegionFiles.of([step.regions_path(s) for s in shards]) if cfg.search.partial else None
    embedded = np.flatnonzero(rows_of.flags("embedded"))
    use = (rows_of.flags("has_image") & rows_of.equals("status", "ok"))[embedded]
    labels = components(rows_of.num_rows, edges)
    best, n = float("inf"), 0
    with tempfile.TemporaryDirectory(prefix="profile-look-propose-") as tmp:
        for _ in range(max(1, rounds)):
            s, cands = _cpu(lambda: look._propose(vectors, embedded, use, labels, cfg, regions=regions, work=Path(tmp), progress=silent))
            best, n = min(best, s), len(cands)  # type: ignore[arg-type]
    return best, n


def _read_bytes(rows: dict[int, tuple[str, str, np.ndarray]], shards: list[Any]) -> dict[int, bytes]:
    from dedup.executors.base import shard_file_name
    from dedup.sources.readback import stream_images

    by_name = {shard_file_name(s): s for s in shards}
    row_of = {sid: r for r, (sid, _, _) in rows.items()}
    wanted = {sid: by_name[name].shard_id for sid, name, _ in rows.values()}
    return {row_of[sid]: data for sid, data in stream_images(shards, wanted)}


def _cpu(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def _features(geometry: ModuleType, blobs: dict[int, bytes], boxes: dict[int, np.ndarray], cfg: Any) -> dict[int, Any]:
    """:func:`dedup.second_look.tasks.look` with ``geometry``'s ``local_features``."""
    from dedup.second_look import tasks

    saved = tasks.local_features
    tasks.local_features = geometry.local_features
    try:
        return {r: tasks.look(data, boxes[r], cfg) for r, data in blobs.items()}
    finally:
        tasks.local_features = saved


def _decisions(geometry: ModuleType, cands: np.ndarray, feats: dict[int, Any], search: Any) -> np.ndarray:
    out = np.zeros(cands.size, bool)
    for k, (i, j, w) in enumerate(zip(cands["i"].tolist(), cands["j"].tolist(), cands["window"].tolist(), strict=True)):
        q, t = feats.get(j), feats.get(i)
        out[k] = bool(q) and bool(t) and geometry.confirms(q, t, search, partial=w >= 0)
    return out


def _same_features(a: dict[int, Any], b: dict[int, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for r, x in a.items():
        y = b[r]
        if (x is None) != (y is None):
            return False
        if x is not None and not (
            np.array_equal(x.points, y.points) and np.array_equal(x.descriptors, y.descriptors)
            and np.array_equal(x.grey, y.grey) and x.scale == y.scale
        ):  # fmt: skip
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished default-preset run's output folder")
    ap.add_argument("--pairs", type=int, default=2000, help="candidate pairs sampled (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="timed passes per phase (per side with --baseline); the fastest is kept")
    ap.add_argument("--baseline", default=None, help="git revision whose geometry.py is timed beside this one (A/B)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    ap.add_argument("--propose", action="store_true", help="also time proposing, from the run's checkpoints (all its images)")
    ap.add_argument("--check-only", action="store_true", help="time the check only (features made once, by this tree)")
    args = ap.parse_args(argv)

    from dedup.second_look import geometry

    geometry.one_thread_each()
    geometry._cv2()  # OpenCV on one thread, as in the check pool
    t_start, load = time.time(), os.getloadavg()[0]
    cands, rows, cfg, shards = _load(args.run, args.pairs, args.seed)
    read_s, blobs = _cpu(lambda: _read_bytes(rows, shards))
    assert isinstance(blobs, dict)
    boxes = {r: box for r, (_, _, box) in rows.items()}
    n_img, n_pair = len(blobs), int(cands.size)
    print(f"{args.run}: {n_pair} candidate pairs ({int((cands['window'] >= 0).sum())} partial), {n_img} images re-read "
          f"({len(rows) - n_img} unreadable); reading their bytes: {read_s:.2f} CPU s", flush=True)

    if args.propose:
        s, proposed = _propose_cpu(args.run, cfg, shards, args.rounds)
        print(f"propose (whole run, band + partial): {s:.2f} CPU s, {proposed} pairs", flush=True)

    sides: list[tuple[str, ModuleType]] = [("this tree", geometry)]
    with tempfile.TemporaryDirectory(prefix="profile-look-") as tmp:
        if args.baseline:
            sides.insert(0, (f"{args.baseline}", _geometry_at(args.baseline, Path(tmp))))
        best_read = {name: float("inf") for name, _ in sides}
        best_check = {name: float("inf") for name, _ in sides}
        feats: dict[str, dict[int, Any]] = {}
        decisions: dict[str, np.ndarray] = {}
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for name, mod in order:
                if args.check_only and feats:
                    feats[name] = next(iter(feats.values()))
                    continue
                s, got = _cpu(lambda mod=mod: _features(geometry if args.check_only else mod, blobs, boxes, cfg))
                best_read[name] = min(best_read[name], s)
                feats[name] = got  # type: ignore[assignment]
            for name, mod in order:
                s, got = _cpu(lambda mod=mod, name=name: _decisions(mod, cands, feats[name], cfg.search))
                best_check[name] = min(best_check[name], s)
                decisions[name] = got  # type: ignore[assignment]
        names = [name for name, _ in sides]
        same_f = all(_same_features(feats[names[0]], feats[x]) for x in names[1:])
        same_d = all(np.array_equal(decisions[names[0]], decisions[x]) for x in names[1:])
        print(f"\nCPU s, one thread, fastest of {args.rounds} (alternating rounds)\n")
        print("| phase | " + " | ".join(names) + (" | ratio |" if len(names) > 1 else ""))
        print("|---|" + "---:|" * (len(names) + (len(names) > 1)))
        phases = [("read + ORB", best_read, n_img, "image"), ("check", best_check, n_pair, "pair")]
        if args.check_only:  # the features were made once, by this tree, and both sides checked them
            phases = phases[1:]
            print(f"| read + ORB (once, this tree) | {best_read[names[0]]:.2f} s ({1000 * best_read[names[0]] / max(n_img, 1):.2f} ms an image) |"
                  + " |" * len(names))  # fmt: skip
        for label, best, per, unit in phases:
            cells = [f"{best[x]:.2f} s ({1000 * best[x] / max(per, 1):.2f} ms a{'n' if unit[0] in 'aeiou' else ''} {unit})" for x in names]
            ratio = f" {best[names[0]] / best[names[-1]]:.2f}x |" if len(names) > 1 else ""
            print(f"| {label} | " + " | ".join(cells) + " |" + ratio)
        confirmed = int(decisions[names[-1]].sum())
        print(f"\nconfirmed {confirmed} of {n_pair}; features identical: {same_f}; decisions identical: {same_d}")

        if not args.no_profile:
            for name, mod in sides:
                for label, fn, per in (
                    ("read + ORB", lambda mod=mod: _features(mod, blobs, boxes, cfg), n_img),
                    ("check", lambda mod=mod, name=name: _decisions(mod, cands, feats[name], cfg.search), n_pair),
                ):
                    if label == "read + ORB" and args.check_only and mod is not geometry:
                        continue
                    prof = cProfile.Profile(time.thread_time)
                    prof.enable()
                    fn()
                    prof.disable()
                    seconds, calls = _breakdown(prof)
                    total = sum(seconds.values())
                    print(f"\n{label}, {name}: cProfile tottime by part ({total:.2f} s with the profiler's own overhead)\n")
                    print(f"| part | ms a{'n image' if per == n_img and label.startswith('read') else ' pair'} | share |")
                    print("|---|---:|---:|")
                    for part, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
                        if s >= 0.0005 * total:
                            print(f"| {part} | {1000 * s / max(per, 1):.3f} | {s / total:.1%} |")
                    if label == "check":
                        print("\ncalls per pair: " + ", ".join(f"{k} {v / max(per, 1):.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:14]))
    print(f"\n(load {load:.1f} -> {os.getloadavg()[0]:.1f}, {time.time() - t_start:.0f} s wall)")
    return 0 if (same_f and same_d) else 1


if __name__ == "__main__":
    sys.exit(main())
