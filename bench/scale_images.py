"""The whole pipeline on real images at scale: the quality bench's copies planted among distractors.

The labelled images of ``bench/quality_data.py`` (``bench/data/quality``: openclipart drawings and
Debian wallpaper photographs, their edited copies, partial copies and hard negatives; built there
when missing) are hard-linked into one folder among rendered distractors, up to ``--n`` images,
and ``dedup run`` (the default preset, as a child process) runs over it end to end. Distractors
are **rendered**, not real: 1/f colour noise with a few random shapes (:func:`distractor`),
each seed its own picture (~5 ms an image; the 1/f images of ``tests/_data.natural_image`` cost
~160 ms, too slow to make 100,000s of on two cores). They look alike to SSCD more than photos do,
so they feed the band of the second look with unrelated pairs: its cost at scale is measured on
pairs that must all be refused. Names are hashes, so planted and distractor files interleave
across the shards (``folder_batch`` 1000).

Prints: per phase (``DEDUP_PHASES=1``, :class:`dedup.pipeline.PhaseLog`) wall time, images per
second and peak RSS; the second look's pairs (proposed, checked, confirmed) and images re-read;
the run's peak RSS (the largest phase peak); and the planted images' pairwise precision and
recall (``bench/quality.py``'s :func:`score`) against the same images among fewer distractors
(``--reference-n``, 5,000 images: the quality set's ~4,000 and ~1,000 distractors). A planted image clustered with a distractor counts against precision.
``--executor ray`` runs the same data on a local Ray and compares the manifest's bytes with the
local run's.

    python bench/scale_images.py --n 20000                      # local, and the same copies at 5,000
    python bench/scale_images.py --n 20000 --executor ray       # then Ray: same manifest?
    python bench/scale_images.py --n 200000 --json bench/out/scale_images.json
    python bench/scale_images.py --n 20000 --reuse bench/out/scale_images/local-20000 --tag=-new  # global stages only
    python bench/scale_images.py --n 200000 --executor ray --reuse bench/out/scale_images/local-200000 --reuse-proposals
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dedup_command, echo_phases  # noqa: E402

from dedup.second_look.look import PROPOSALS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_VERSION = 1  # bump when the distractors change, so cached folders are rebuilt


def distractor(seed: int) -> bytes:
    """A rendered picture (JPEG q88, 320x240): 1/f colour noise and 3-8 random shapes."""
    rng = np.random.default_rng([seed, 77])
    h, w = 60, 80
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.sqrt(fx * fx + fy * fy), 1.0 / w) ** float(rng.uniform(1.0, 1.6))
    chans = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random((h, w)))
        chans.append(np.real(np.fft.ifft2(amp * phase)))
    field = np.stack(chans, -1)
    field = (field - field.mean()) / (field.std() + 1e-9)
    base = np.clip(rng.uniform(60, 190, 3) + field * rng.uniform(30, 60), 0, 255).astype(np.uint8)
    img = Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, 300), rng.integers(0, 220)
        x1, y1 = x0 + rng.integers(20, 160), y0 + rng.integers(20, 120)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(int(x), int(y)) for x, y in zip(rng.integers(0, 320, 5), rng.integers(0, 240, 5), strict=True)]
            draw.polygon(pts, fill=colour)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def _write_distractor(args: tuple[Path, int]) -> None:
    folder, seed = args
    name = hashlib.sha1(f"distractor-{seed}".encode()).hexdigest()[:16] + ".jpg"
    path = folder / name
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(distractor(seed))
        os.replace(tmp, path)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build(n: int, quality: Path, data: Path, *, workers: int) -> tuple[Path, pl.DataFrame]:
    """``data/mixed-<n>`` (the planted images and distractors up to ``n``; the first distractors
    of a larger set are those of a smaller one), cached; and the quality labels."""
    if not (quality / "labels.parquet").is_file():
        from quality_data import build as build_quality

        print(f"building the quality bench into {quality} (bench/quality_data.py) ...", file=sys.stderr, flush=True)
        build_quality(quality)
    labels = pl.read_parquet(quality / "labels.parquet")
    mixed = data / f"mixed-{n}"
    stamp = {"version": DATA_VERSION, "n": n, "labels": hashlib.sha256((quality / "labels.parquet").read_bytes()).hexdigest()}
    for folder in (mixed,):
        meta = folder.with_name(folder.name + ".json")
        if meta.is_file():
            if json.loads(meta.read_text()) == stamp:
                continue
            shutil.rmtree(folder, ignore_errors=True)  # another version: made again
        folder.mkdir(parents=True, exist_ok=True)  # an interrupted build goes on (files are named by seed)
        for f in labels["file"].to_list():
            _link(quality / "images" / f, folder / f)
        extra = max(0, n - labels.height)
        t0 = time.perf_counter()
        with Pool(workers) as pool:
            pool.map(_write_distractor, [(folder, s) for s in range(extra)], chunksize=256)
        print(f"rendered {extra} distractors in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        meta.write_text(json.dumps(stamp))
    return mixed, labels


def run_cli(src: Path, out: Path, extra: list[str], *, reuse: Path | None = None, reuse_proposals: bool = False) -> dict[str, Any]:
    """``dedup run`` (default preset) as a child process: wall time and its phases. ``reuse``:
    an earlier run over the same images whose per-shard features are hard-linked in first, so
    only the global stages run (their phases are what is compared; read + featurize is ~0);
    with ``reuse_proposals`` its second-look proposals too (used only where the run's own key
    matches: same features, direct links and settings)."""
    shutil.rmtree(out, ignore_errors=True)
    if reuse is not None:
        for stage in sorted((reuse / ".work").glob("*/shards")):
            for name in ("shards", "done"):
                if (stage.parent / name).is_dir():
                    dest = out / ".work" / stage.parent.name / name
                    shutil.copytree(stage.parent / name, dest, copy_function=os.link)
            # The second look's proposals (driver work that no executor changes), when that run
            # kept them: the run then proposes nothing and its read and check tasks start at once.
            proposals = stage.parent / PROPOSALS
            if proposals.is_file() and reuse_proposals:
                os.link(proposals, out / ".work" / stage.parent.name / PROPOSALS)
    cmd = [*dedup_command(), "run", str(src), "--out", str(out), "--quiet", *extra]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "DEDUP_PHASES": "1"}, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    phases = echo_phases(proc.stderr)
    # wait4: the run's own rusage, whose ru_maxrss is the largest of the run and its worker
    # processes (the per-shard steps and the second look's tasks run there; PhaseLog sees only
    # the driver). Started from this small process, the inherited start (see bench/scale.py) is small.
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"dedup run failed with exit code {code}")
    return {"wall_s": time.perf_counter() - t0, "phases": phases, "largest_process_gib": usage.ru_maxrss / (1 << 20)}


def evaluate(out: Path, labels: pl.DataFrame) -> dict[str, Any]:
    """Pairwise P / R of the planted images (bench/quality.py's score), a planted image
    clustered with a distractor counting as a false pair of each."""
    from quality import score

    m = pl.read_parquet(out / "manifest.parquet", columns=["key", "cluster_id"])
    planted = set(labels["file"].to_list())
    key = m["key"].to_list()
    cid = m["cluster_id"].to_list()
    assignment = {k: c for k, c in zip(key, cid, strict=True) if k in planted}
    s = score(labels, assignment)
    # distractors sharing a cluster with planted images: false pairs score() cannot see
    sizes: dict[Any, list[int]] = {}
    for k, c in zip(key, cid, strict=True):
        if c is not None:
            entry = sizes.setdefault(c, [0, 0])
            entry[0 if k in planted else 1] += 1
    mixed_pairs = sum(p * d for p, d in sizes.values())
    tp, pred = s["pairs"]["true_positive"], s["pairs"]["predicted"] + mixed_pairs
    return {
        "precision": tp / pred if pred else 1.0,
        "recall": s["recall"],
        "precision_planted_only": s["precision"],
        "partial_recall": s["partial_recall"],
        "copy_recall": s["copy_recall"],
        "planted_distractor_pairs": mixed_pairs,
        "distractor_only_clusters": sum(1 for p, d in sizes.values() if p == 0 and d > 1),
    }


def summarise(name: str, images: int, result: dict[str, Any], out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    second = report.get("shards", {}).get("second_look", {})
    phases = result["phases"]
    print(f"\n## {name}: {images:,} images, {result['wall_s']:.0f} s end to end ({images / result['wall_s']:.1f} img/s)")
    print("| phase | s | img/s | peak RSS GiB |\n| --- | ---: | ---: | ---: |")
    for p in phases:
        rate = images / p["seconds"] if p["seconds"] > 0 else float("inf")
        print(f"| {p['phase']} | {p['seconds']:.1f} | {rate:,.0f} | {p['peak_rss_gib']:.2f} |")
    peak = max((p["peak_rss_gib"] for p in phases), default=float("nan"))
    print(f"peak RSS: driver {peak:.2f} GiB (largest phase peak); largest process of the run {result['largest_process_gib']:.2f} GiB (wait4, workers included)")
    look = {p["phase"]: p["seconds"] for p in phases if p["phase"].startswith("second look")}
    spent = sum(look.values())
    print(
        f"second look: {second.get('candidates', 0):,} pairs proposed ({second.get('global', 0):,} band, "
        f"{second.get('partial', 0):,} partial), {second.get('checked', 0):,} checked, {second.get('confirmed', 0):,} confirmed; "
        f"{second.get('looked', 0):,} images re-read, {second.get('unreadable', 0)} unreadable; {spent:.1f} s "
        f"({1000 * spent / max(1, second.get('checked', 0)):.1f} ms a checked pair, reads included)"
    )
    return {"images": images, **result, "peak_rss_gib": peak, "second_look": second}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="images in all (planted + distractors); 200000 is the target")
    ap.add_argument("--quality", type=Path, default=REPO / "bench" / "data" / "quality", help="the quality bench (built when missing)")
    ap.add_argument("--data", type=Path, default=REPO / "bench" / "data" / "scale_images")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scale_images")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--reference-n", type=int, default=5_000, help="the same planted images among fewer distractors (0: no reference run)")
    ap.add_argument("--partition-above", type=int, default=None,
                    help="the default preset with search.partition_above lowered: the at-scale paths (partitioned band, "
                    "inverted-file partial proposals) on fewer images")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier run's OUT over the same images: its per-shard features are hard-linked in and only the "
                    "global stages run (to compare second-look settings or code without featurizing again)")
    ap.add_argument("--reuse-proposals", action="store_true",
                    help="with --reuse: also the second look's proposals that run kept (a Ray run of the same data then "
                    "runs the search and the per-shard tasks, not the driver's proposing again)")
    ap.add_argument("--tag", default="", help="appended to the run's folder name (OUT/<executor>-<n><tag>)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    mixed, labels = build(args.n, args.quality, args.data, workers=os.cpu_count() or 1)
    n_mixed = sum(1 for _ in mixed.iterdir())
    results: dict[str, Any] = {"n": n_mixed, "planted": labels.height, "executor": args.executor}
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load {load:.1f} at the start; distractors: rendered (see the docstring)")
    if args.reference_n and args.reference_n != args.n:
        ref, _ = build(args.reference_n, args.quality, args.data, workers=os.cpu_count() or 1)
        ref_out = args.out / f"local-{args.reference_n}"
        if (ref_out / "manifest.parquet").is_file() and (ref_out / "bench.json").is_file():  # measured before: reused
            results["reference"] = json.loads((ref_out / "bench.json").read_text())
            print(f"reference: {ref_out} (measured before)")
        else:
            n_ref = sum(1 for _ in ref.iterdir())
            results["reference"] = summarise("reference", n_ref, run_cli(ref, ref_out, []), ref_out)
            results["reference"]["quality"] = evaluate(ref_out, labels)
            (ref_out / "bench.json").write_text(json.dumps(results["reference"], default=str))
    out = args.out / f"{args.executor}-{args.n}" if args.partition_above is None else args.out / f"{args.executor}-{args.n}-p{args.partition_above}"
    out = out.with_name(out.name + args.tag)
    extra = ["--executor", "ray"] if args.executor == "ray" else []
    if args.partition_above is not None:
        preset = (REPO / "configs" / "default.toml").read_text()
        config = args.out / f"default-partition-above-{args.partition_above}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(preset.replace("[search]\n", f"[search]\npartition_above = {args.partition_above}\n", 1))
        extra += ["--config", str(config)]
        results["partition_above"] = args.partition_above
    results["run"] = summarise(f"mixed ({args.executor})", n_mixed, run_cli(mixed, out, extra, reuse=args.reuse, reuse_proposals=args.reuse_proposals), out)
    results["run"]["quality"] = evaluate(out, labels)
    (out / "bench.json").write_text(json.dumps(results["run"], default=str))
    print("\n| planted copies | P | R | partial R | planted-distractor pairs |\n| --- | ---: | ---: | ---: | ---: |")
    for name in ("reference", "run"):
        if name in results:
            q = results[name]["quality"]
            label = f"among {results[name]['images']:,}"
            print(f"| {label} | {q['precision']:.4f} | {q['recall']:.4f} | {q['partial_recall'] or 0:.4f} | {q['planted_distractor_pairs']} |")
    if args.executor == "ray":
        local = out.parent / out.name.replace("ray-", "local-", 1) / "manifest.parquet"
        if local.is_file():
            same = local.read_bytes() == (out / "manifest.parquet").read_bytes()
            results["same_manifest_as_local"] = same
            print(f"\nRay manifest byte-identical to the local run's: {same}")
        else:
            print(f"\n(no local run at {local} to compare with: run without --executor ray first)")
    print(f"load at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
