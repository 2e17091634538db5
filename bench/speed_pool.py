"""Threads or processes for a local run's shards: same-run ratios of time, CPU and peak memory.

Runs ``dedup run IMAGES`` with ``pool = "processes"`` and ``pool = "threads"`` (RunConfig.pool)
in alternating rounds (processes first in odd rounds, threads first in even ones), each in a
child process measured as ``bench/e2e.py`` measures a run (wall clock, CPU seconds of the whole
process tree, peak of its summed RSS), and prints one table per preset with each round's
ratio threads / processes. The two manifests of a round must be byte for byte equal: the
script says so, and fails when they are not.

    python bench/speed_pool.py --data bench/data/quality-v2/test/images             # default preset
    python bench/speed_pool.py --data DIR --args "--model none" --rounds 3        # the hash path

The machine is shared: compare the ratios of one round, not timings across runs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import dedup_command  # noqa: E402
from e2e import RunStats, run_measured  # noqa: E402

POOLS = ("processes", "threads")


def measure(images: Path, pool: str, args: list[str], work: Path) -> tuple[RunStats, bytes]:
    """One run of ``dedup run images`` with ``pool``; its stats and its manifest's bytes."""
    config = work / f"{pool}.toml"
    config.write_text(f'pool = "{pool}"\n')
    out = work / f"out-{pool}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*dedup_command(), "run", str(images), "--out", str(out), "--quiet", "--config", str(config), *args]
    stats = run_measured(cmd, work / f"{pool}.log")
    if stats.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({stats.returncode}):\n{(work / f'{pool}.log').read_text()[-2000:]}")
    manifest = (out / "manifest.parquet").read_bytes()
    shutil.rmtree(out, ignore_errors=True)
    return stats, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of images (or any source dedup reads)")
    parser.add_argument("--args", default="", help='more `dedup run` arguments, shell-quoted (e.g. "--model none")')
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="--workers for both (default: one per core)")
    ns = parser.parse_args(argv)
    args = shlex.split(ns.args) + (["--workers", str(ns.workers)] if ns.workers else [])
    n_images = sum(1 for p in ns.data.rglob("*") if p.is_file()) if ns.data.is_dir() else None
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="speed-pool-") as tmp:
        work = Path(tmp)
        for k in range(ns.rounds):
            order = POOLS if k % 2 == 0 else POOLS[::-1]
            got = {pool: measure(ns.data, pool, args, work) for pool in order}
            same = got["threads"][1] == got["processes"][1]
            if not same:
                print(f"round {k + 1}: the manifests DIFFER between threads and processes", file=sys.stderr)
                return 1
            p, t = got["processes"][0], got["threads"][0]
            rows.append(
                f"| {k + 1} ({order[0]} first) | {p.wall_seconds:.1f} | {t.wall_seconds:.1f} | "
                f"{p.wall_seconds / t.wall_seconds:.2f} | {p.cpu_seconds:.1f} | {t.cpu_seconds:.1f} | "
                f"{p.cpu_seconds / t.cpu_seconds:.2f} | {p.tree_peak_rss_mib:.0f} | {t.tree_peak_rss_mib:.0f} | "
                f"{t.tree_peak_rss_mib / p.tree_peak_rss_mib:.2f} | yes |"
            )
            print(rows[-1], flush=True)
    print(f"\n`dedup run {ns.data} {shlex.join(args)}` ({n_images or '?'} files)\n")
    print(
        "| round | processes s | threads s | speed × (p/t) | processes CPU s | threads CPU s | CPU × (p/t) "
        "| processes peak MiB | threads peak MiB | memory × (t/p) | manifests equal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
