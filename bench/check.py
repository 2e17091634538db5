"""CI-gate benchmark: ``dedup check`` of a small drop against baselines of growing size.

Builds once (cached in ``bench/data/check/``) generated images (``tests/_data.natural_image``,
160x120 JPEG): a baseline ``base-a/`` of ``--baseline`` images, ``base-b/`` of as many more, and
a drop of ``--drop`` images (4 % edited or exact copies of baseline images, 2 % byte copies of
other drop images, the rest new). Then, each step a child process timed wall-clock (start-up
and model load included, as a CI job sees them):

1. ``dedup run base-a --out base1 --preset ci``                   the baseline (N images)
2. ``dedup check drop --against base1``                           the gate (D images)
3. ``dedup index add base-b --index base2`` (base2 = a copy of base1)  the baseline doubled
4. ``dedup check drop --against base2``                           the gate against 2N
5. ``dedup run base-a base-b --out full2``                        2N from scratch (``--skip-full``: not)

and prints the timings, check vs run, check at 2N vs at N, and whether step 3's manifest is
byte for byte step 5's. What it shows: the check costs what the drop costs; the baseline's
size barely moves it.

    python bench/check.py                       # 4,000 + 4,000 baseline images, a drop of 400
    python bench/check.py --baseline 2000 --drop 200 --skip-full --json bench/out/check.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_TESTS = str(REPO / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from _data import edited_copies, natural_image  # noqa: E402
from _common import dedup_command  # noqa: E402

DATA_VERSION = 1  # bump when the build changes, so cached data is rebuilt
DEFAULT_DATA = REPO / "bench" / "data" / "check"
DEFAULT_OUT = REPO / "bench" / "out" / "check"
SIZE = (160, 120)
DROP_SEED = 10_000_000  # drop originals use seeds far from the baseline's


def build(data: Path, n: int, d: int, *, rebuild: bool = False) -> dict[str, Any]:
    """Write ``base-a/``, ``base-b/`` (``n`` images each) and ``drop/`` (``d``) under ``data``."""
    marker = data / "build.json"
    want = {"version": DATA_VERSION, "baseline": n, "drop": d, "size": list(SIZE)}
    if not rebuild and marker.is_file() and json.loads(marker.read_text()).get("params") == want:
        return json.loads(marker.read_text())
    if data.exists():
        shutil.rmtree(data)
    rng = np.random.default_rng(0)
    for name, first in (("base-a", 0), ("base-b", n)):
        folder = data / name
        folder.mkdir(parents=True)
        for i in range(first, first + n):
            natural_image(i, SIZE).save(folder / f"img_{i:06d}.jpg", quality=90)
    drop = data / "drop"
    drop.mkdir(parents=True)
    n_base = max(1, round(0.04 * d))
    n_internal = max(1, round(0.02 * d))
    originals = d - n_base - n_internal
    for i in range(originals):
        natural_image(DROP_SEED + i, SIZE).save(drop / f"new_{i:06d}.jpg", quality=90)
    picks = rng.choice(n, size=n_base, replace=False)
    for k, i in enumerate(sorted(int(p) for p in picks)):
        if k % 3 == 0:  # a third byte for byte, the rest edited (recompressed, resized, brighter)
            shutil.copy(data / "base-a" / f"img_{i:06d}.jpg", drop / f"from_base_{i:06d}.jpg")
        else:
            edits = dict(edited_copies(natural_image(i, SIZE), rng))
            edits[("jpeg", "resize", "brightness")[k % 3]].convert("RGB").save(drop / f"from_base_{i:06d}.jpg", quality=90)
    for k in range(n_internal):
        shutil.copy(drop / f"new_{k:06d}.jpg", drop / f"new_{k:06d}_again.jpg")
    info = {"params": want, "baseline_copies": n_base, "internal_copies": n_internal}
    marker.write_text(json.dumps(info, indent=2) + "\n")  # last: marks a finished build
    return info


def timed(args: Sequence[str], *, ok: Sequence[int] = (0,)) -> tuple[float, str]:
    """Run ``dedup ARGS``; return (wall seconds, stdout)."""
    cmd = [*dedup_command(), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=int, default=4000, help="images in base-a (and in base-b); default 4000")
    ap.add_argument("--drop", type=int, default=400, help="images in the drop; default 400")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"cached images (default {DEFAULT_DATA.relative_to(REPO)})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folders (default {DEFAULT_OUT.relative_to(REPO)}); replaced")
    ap.add_argument("--rebuild", action="store_true", help="regenerate the images")
    ap.add_argument("--skip-full", action="store_true", help="skip step 5 (2N from scratch)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here as JSON")
    opts = ap.parse_args(argv)

    t0 = time.perf_counter()
    info = build(opts.data, opts.baseline, opts.drop, rebuild=opts.rebuild)
    print(f"data: {opts.data} (built or reused in {time.perf_counter() - t0:.1f} s); cores: {os.cpu_count()}")
    if opts.out.exists():
        shutil.rmtree(opts.out)
    opts.out.mkdir(parents=True)
    a, b, drop = (str(opts.data / x) for x in ("base-a", "base-b", "drop"))
    base1, base2, full2 = (opts.out / x for x in ("base1", "base2", "full2"))
    n, d = opts.baseline, opts.drop

    rows: list[tuple[str, int, float, str]] = []
    run1, _ = timed(["run", a, "--out", str(base1), "--preset", "ci", "--quiet"])
    rows.append((f"dedup run base-a (N = {n})", n, run1, ""))
    checks: list[dict[str, Any]] = []
    for label, base in (("N", base1), ("2N", base2)):
        if label == "2N":
            shutil.copytree(base1, base2)
            add_s, _ = timed(["index", "add", b, "--index", str(base2), "--quiet"])
            rows.append((f"dedup index add base-b (N -> 2N = {2 * n})", n, add_s, "decodes base-b only"))
        seconds, stdout = timed(["check", drop, "--against", str(base), "--json", "--quiet"], ok=(0, 1))
        body = json.loads(stdout)
        inner = body["seconds"]
        checks.append({"baseline": body["baseline"]["samples"], "seconds": seconds, "result": body})
        rows.append((
            f"dedup check drop (D = {d}) --against {label}",
            d,
            seconds,
            f"inside: open index + plan {inner['open_index']:.2f} s, featurize {inner['featurize']:.2f} s, search {inner['search']:.3f} s",
        ))
    full_s = None
    identical = None
    if not opts.skip_full:
        full_s, _ = timed(["run", a, b, "--out", str(full2), "--preset", "ci", "--quiet"])
        rows.append((f"dedup run base-a base-b (2N = {2 * n}, from scratch)", 2 * n, full_s, ""))
        identical = (base2 / "manifest.parquet").read_bytes() == (full2 / "manifest.parquet").read_bytes()

    width = max(len(r[0]) for r in rows)
    print(f"\n{'step':<{width}}  {'decoded':>7}  {'wall s':>7}")
    for name, decoded, seconds, note in rows:
        print(f"{name:<{width}}  {decoded:>7}  {seconds:>7.1f}  {note}")
    c1, c2 = checks[0]["seconds"], checks[1]["seconds"]
    r = checks[0]["result"]
    print()
    print(f"baseline {n} images, drop {d} images ({info['baseline_copies']} copies of baseline images, "
          f"{info['internal_copies']} internal copies)")
    print(f"run time (N = {n}): {run1:.1f} s   check time (D = {d}): {c1:.1f} s   ratio run/check: {run1 / c1:.1f}x")
    print(f"check against 2N = {2 * n}: {c2:.1f} s   check 2N / check N: {c2 / c1:.2f}   "
          f"(featurize {checks[1]['result']['seconds']['featurize'] / max(1e-9, checks[0]['result']['seconds']['featurize']):.2f}, "
          f"search {checks[1]['result']['seconds']['search'] / max(1e-9, checks[0]['result']['seconds']['search']):.2f})")
    if full_s is not None:
        print(f"run 2N from scratch: {full_s:.1f} s   run 2N / run N: {full_s / run1:.2f}   "
              f"run N + index add N == run 2N (manifest bytes): {identical}")
    print(f"verdict: {'PASSED' if r['passed'] else 'FAILED'}; duplicates of the baseline "
          f"{r['duplicating_baseline']['samples']} ({r['duplicating_baseline']['share']:.1%}), within the drop "
          f"{r['duplicated_within_drop']['samples']} ({r['duplicated_within_drop']['share']:.1%}), largest cluster "
          f"{r['largest_cluster']['size']}")
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({
            "baseline": n, "drop": d, "cores": os.cpu_count(), "run_seconds": run1,
            "check_seconds": c1, "add_seconds": rows[2][2], "check_2x_seconds": c2,
            "run_2x_seconds": full_s, "add_equals_run": identical,
            "check": checks[0]["result"], "check_2x": checks[1]["result"],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
