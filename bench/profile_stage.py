"""Where the per-shard stage spends its time: ms per image per core, stage by stage and signal by signal.

Usage::

    python bench/profile_stage.py [--data bench/data/quality] [--preset default] [--limit N] [--rounds 3]

Reads the images of the quality bench (``bench/quality_data.py``; ``make bench-quality`` builds it),
into memory first, then times each step of :func:`dedup.fingerprint.fingerprint` and of
:class:`dedup.featurize.FeatureStep` on its own, one thread (ONNX Runtime with one intra-op
thread), as the run chains them for the preset: read, decode, SHA-256 of the bytes and of the
pixels, pHash, PDQ's input and its 8 orientations, trim, the model input, the model, its regions,
and the checkpoint write. Each step runs ``--rounds`` times over all the images and the fastest
round is kept (the others met a noisy neighbour on a shared machine). Then the whole step
(:class:`~dedup.featurize.FeatureStep` over the same files, one thread) for the total, and beside
it the decode line: bare decode loops over the same JPEG files (Pillow at full size, Pillow with
``draft`` to the smallest size the preset needs, simplejpeg the same), to show what decoding
alone costs. Prints a markdown table (kept in ``docs/speed.md``).

A step the preset turns off is shown as ``off`` and not timed; the step functions come from
:mod:`dedup.fingerprint`, so the table follows the code it profiles.
"""

from __future__ import annotations

import os

# One thread everywhere: the table is per core (set before numpy / onnxruntime load)
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import hashlib
import io
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "bench" / "data" / "quality"


def _images(data: Path, limit: int | None) -> list[Path]:
    folder = data / "images"
    if not folder.is_dir():
        raise SystemExit(f"no images in {folder}: build the bench first (python bench/quality_data.py --out {data})")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return files[:limit] if limit else files


def _best(fn: Callable[[], object], rounds: int) -> float:
    """The fastest of ``rounds`` calls, in CPU seconds of this process (on a shared machine the
    wall clock counts the neighbours' work too; the CPU time is this code's own)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def profile(
    data: Path,
    preset: str,
    *,
    model: str | None = None,
    limit: int | None = None,
    rounds: int = 3,
    chunk: int = 250,
    config: Path | None = None,
) -> list[tuple[str, float | None, str]]:
    """``(step, ms per image, note)`` rows; ``None`` for a step the preset has off.

    The images go through in chunks of ``chunk`` (each step over a chunk, the fastest of
    ``rounds``, summed over the chunks), so memory stays small."""
    from dedup import fingerprint as fp
    from dedup.config import load_config
    from dedup.embed import build_embedder

    cfg = load_config(preset, config)
    if model is not None:
        cfg = cfg.with_overrides({"embed.model": model})
    fcfg = cfg.features() if hasattr(cfg, "features") else cfg.fingerprint
    files = _images(data, limit)
    n = len(files)
    total: dict[str, list[Any]] = {}  # name -> [seconds, note, per]

    def add(name: str, seconds: float | None, note: str = "", per: int | None = None) -> None:
        got = total.setdefault(name, [None, note, 0])
        if seconds is not None:
            got[0] = (got[0] or 0.0) + seconds
            got[2] += per if per is not None else size

    embedder = build_embedder(cfg.embed, threads=1)
    prepare = embedder.preprocess if embedder is not None else None
    jpegs: list[bytes] = []
    for start in range(0, n, chunk):
        part = files[start : start + chunk]
        size = len(part)
        blobs: list[bytes] = []
        add("read (file bytes)", _best(lambda: blobs.__setitem__(slice(None), [p.read_bytes() for p in part]), rounds))
        jpegs += [b for b in blobs if b[:3] == b"\xff\xd8\xff"]
        imgs: list[Image.Image] = []
        add("decode (RGB, full size)", _best(lambda: imgs.__setitem__(slice(None), [fp.decode(b, max_pixels=fcfg.max_pixels) for b in blobs]), rounds))
        add("SHA-256 of the bytes", _best(lambda: [hashlib.sha256(b).digest() for b in blobs], rounds))
        if fcfg.pdq and hasattr(fp, "pixel_sha256"):  # lazy since issue 25's third session
            add("SHA-256 of the pixels", None, "global stage, candidates only (dedup.pixels)")
        else:
            add("SHA-256 of the pixels", _best(lambda: [fp._pixel_sha256(np.asarray(im)) for im in imgs], rounds))
        if fcfg.phash:
            add("pHash", _best(lambda: [fp._phash(im) for im in imgs], rounds))
        else:
            add("pHash", None, "off: no search uses it")
        lumas: list[np.ndarray] = []
        if fcfg.pdq:
            add(f"PDQ input (luma within {fcfg.pdq_side} px)", _best(lambda: lumas.__setitem__(slice(None), [fp._pdq_input(im, fcfg.pdq_side) for im in imgs]), rounds))
            if hasattr(fp, "_pdq_hashes"):
                add("PDQ, 8 orientations" if fcfg.pdq_dihedral else "PDQ",
                    _best(lambda: [fp._pdq_hashes(x, dihedral=fcfg.pdq_dihedral) for x in lumas], rounds))
            elif fcfg.pdq_dihedral:  # the code before issue 25
                import pdqhash

                add("PDQ, 8 orientations", _best(lambda: [[fp._pack_bits(h) for h in pdqhash.compute_dihedral(x)[0]] for x in lumas], rounds))
            else:
                add("PDQ", _best(lambda: [fp._pdq(x) for x in lumas], rounds))
        else:
            add("PDQ", None, "off in the preset")
        crops: list[Image.Image] = imgs
        if prepare is not None and fcfg.trim:
            boxes: list[Any] = []
            add("trim (margins box)", _best(lambda: boxes.__setitem__(slice(None), [fp.trim_box(im) for im in imgs]), rounds))
            crops = [im if box is None else im.crop(box) for im, box in zip(imgs, boxes, strict=True)]
        elif prepare is not None:
            add("trim", None, "off in the preset")
        inputs: list[np.ndarray] = []
        if prepare is not None:
            add("model input", _best(lambda: inputs.__setitem__(slice(None), [prepare(im) for im in crops]), rounds))
        if embedder is not None and inputs:
            _time_model(embedder, inputs, cfg.embed.batch(), rounds, add)
        else:
            add("model", None, "no model (--model none)")
    rows: list[tuple[str, float | None, str]] = [
        (name, None if sec is None else 1000 * sec / per, note) for name, (sec, note, per) in total.items()
    ]

    def add_row(name: str, seconds: float | None, note: str = "", per: int | None = None) -> None:
        rows.append((name, None if seconds is None else 1000 * seconds / (per or n), note))

    _time_write(cfg, files, rounds, add_row)
    _time_step(cfg, data, files, add_row)
    _decode_line(jpegs, fcfg, cfg, embedder, rounds, rows)
    return rows


def _time_model(embedder: Any, inputs: list[np.ndarray], batch: int, rounds: int, add: Callable[..., None]) -> None:
    batches = [np.stack(inputs[i : i + batch]) for i in range(0, len(inputs), batch)]
    with_regions = bool(getattr(embedder, "regions", False))
    glob = _best(lambda: [embedder.embed(b) for b in batches], rounds)
    add(f"model ({embedder.name}, batch {batch})", glob)
    if with_regions:
        both = _best(lambda: [embedder.embed_regions(b) for b in batches], rounds)
        add("regions (extra outputs + pooling)", max(0.0, both - glob), "model with regions, less the model alone")
    else:
        add("regions", None, "off in the preset")


def _time_write(cfg: Any, files: Sequence[Path], rounds: int, add: Callable[..., None]) -> None:
    """The checkpoint write: rows to a zstd parquet and the embeddings to .npy, as FeatureStep does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dedup._types import Sample, Shard, ShardKind
    from dedup.featurize import SCHEMA, _row
    from dedup.fingerprint import Features

    shard = Shard(source="bench", path="bench", kind=ShardKind.FOLDER, shard_id="00000")
    rng = np.random.default_rng(0)
    feats = [
        Features(status="ok", width=512, height=384, sha256=rng.bytes(32), pixel_sha256=rng.bytes(32),
                 pdq=rng.bytes(32), pdq_quality=100, pdq_variants=rng.bytes(224) if cfg.fingerprint.pdq_dihedral else None)
        for _ in files
    ]
    samples = [Sample(sample_id=p.name, key=p.stem) for p in files]
    emb = rng.standard_normal((len(files), 128)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        def write() -> None:
            rows = [_row(s, shard, f, True) for s, f in zip(samples, feats, strict=True)]
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), Path(tmp) / "x.parquet", compression="zstd")
            np.save(Path(tmp) / "x.npy", emb)

        add("write (rows + parquet + npy)", _best(write, rounds))


def _time_step(cfg: Any, data: Path, files: Sequence[Path], add: Callable[..., None]) -> None:
    """The whole per-shard step, one thread, on the same files (one folder batch)."""
    from dedup.featurize import FeatureStep

    from dataclasses import replace

    from dedup.sources import discover

    (shard,) = discover([str(data / "images")], folder_batch=10**9)
    shard = replace(shard, members=tuple(p.name for p in files))
    with tempfile.TemporaryDirectory() as tmp:
        step = FeatureStep(config=cfg, out_dir=Path(tmp), threads=1)
        step(shard)  # warm: the model is built and the files are in the page cache
        t0 = time.process_time()
        step(shard)
        add("**whole step (FeatureStep, 1 thread)**", time.process_time() - t0, "read to write, as the run does")


def _decode_line(jpegs: list[bytes], fcfg: Any, cfg: Any, embedder: Any, rounds: int, rows: list[tuple[str, float | None, str]]) -> None:
    """Bare decode loops over the JPEG files: what decoding alone costs, at full and reduced size."""
    m = len(jpegs)
    if not m:
        return
    side = min([fcfg.pdq_side] + ([embedder.size] if embedder is not None else []))

    def pil(draft: int | None, mode: str = "RGB") -> None:
        for b in jpegs:
            with Image.open(io.BytesIO(b)) as im:
                if draft is not None:
                    im.draft(mode, (draft, draft))
                im.load()

    def add(name: str, seconds: float) -> None:
        rows.append((name, 1000 * seconds / m, f"decode line: {m} JPEGs"))

    add("bare Pillow decode, full size", _best(lambda: pil(None), rounds))
    add(f"bare Pillow `draft` to >= {side} px, RGB", _best(lambda: pil(side), rounds))
    add(f"bare Pillow `draft` to >= {side} px, luma", _best(lambda: pil(side, "L"), rounds))
    add("bare Pillow `draft` to >= 64 px, luma (PDQ's own 64 x 64)", _best(lambda: pil(64, "L"), rounds))
    try:
        import simplejpeg
    except ImportError:
        rows.append(("bare simplejpeg", None, "simplejpeg not installed (pip install -e '.[dev]')"))
        return
    add("bare simplejpeg, full size", _best(lambda: [simplejpeg.decode_jpeg(b, colorspace="RGB") for b in jpegs], rounds))
    add(f"bare simplejpeg to >= {side} px, RGB",
        _best(lambda: [simplejpeg.decode_jpeg(b, colorspace="RGB", min_height=side, min_width=side) for b in jpegs], rounds))
    add(f"bare simplejpeg to >= {side} px, luma",
        _best(lambda: [simplejpeg.decode_jpeg(b, colorspace="GRAY", min_height=side, min_width=side) for b in jpegs], rounds))


def table(rows: Sequence[tuple[str, float | None, str]], header: str) -> str:
    out = [header, "", "| step | ms / image / core | note |", "|---|---:|---|"]
    for name, ms, note in rows:
        out.append(f"| {name} | {'off' if ms is None else f'{ms:.2f}'} | {note} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--preset", default="default", help="bundled preset whose steps are profiled")
    ap.add_argument("--model", default=None, help="the preset with this embed.model (none: the hash path)")
    ap.add_argument("--config", type=Path, default=None, help="a TOML file laid over the preset (as `dedup run --config`)")
    ap.add_argument("--limit", type=int, default=None, help="profile the first N images only")
    ap.add_argument("--rounds", type=int, default=3, help="passes per step; the fastest is kept")
    ap.add_argument("--chunk", type=int, default=250, help="images held in memory at once")
    args = ap.parse_args(argv)
    t0 = time.time()
    load = os.getloadavg()[0]
    rows = profile(
        args.data, args.preset, model=args.model, limit=args.limit, rounds=args.rounds, chunk=args.chunk, config=args.config
    )
    n = len(_images(args.data, args.limit))
    over = f" --config {args.config.name}" if args.config else ""
    header = (f"preset `{args.preset}`{f' --model {args.model}' if args.model else ''}{over}, {n} images of {args.data.name}, CPU ms, one thread, fastest of {args.rounds} "
              f"(load {load:.1f} → {os.getloadavg()[0]:.1f}, {time.time() - t0:.0f} s)")
    print(table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
