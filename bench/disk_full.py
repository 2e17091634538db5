"""A run into a file system too small for it: refused early, or stopped cleanly, then resumed.

Builds (or reuses) ``bench/scale.py``'s N precomputed embeddings, runs ``dedup run`` once on the
normal disk as the reference, then into a tmpfs mounted with a size too small for the run (needs
root, as ``mount`` does):

1. with the disk estimate on (the default): the run must refuse before it starts, exit 2, one
   ``Error:`` line naming the sizes and the ``--work`` hint;
2. with ``--no-disk-check``, for each size asked (``--small``; by default one that fills during the
   per-shard checkpoints and one that fills during the partitioned search's scratch): exit 2, one
   ``Error:`` line, no traceback; then the tmpfs is grown (``mount -o remount,size=``) and the same
   command rerun: it must finish and its ``manifest.parquet`` and ``keep.parquet`` must be byte for
   byte the reference's.

Prints one row per attempt: the size of the file system, exit code, wall seconds, the stderr lines
(count and the error), what OUT held when it stopped, and whether the resumed outputs match.

    sudo python bench/disk_full.py                 # N = 1M, sizes 0.5 GB and 1.3 GB
    python bench/disk_full.py --n 100k --small 0.05 --small 0.13
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (bench/scale.py: the same vectors as the scale table)

REPO = Path(__file__).resolve().parents[1]


def dedup(data: Path, out: Path, threshold: float, extra: list[str]) -> tuple[int, float, list[str]]:
    exe = Path(sys.executable).with_name("dedup")
    cmd = [str(exe), "run", str(data), "--out", str(out), "--threshold", str(threshold), "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, time.perf_counter() - t0, lines


def mount(point: Path, size_bytes: int, *, remount: bool = False) -> None:
    opts = f"size={size_bytes}" if not remount else f"remount,size={size_bytes}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], check=True)


def held(folder: Path) -> int:
    return scale.usage(folder)[0] if folder.exists() else 0


def same_outputs(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in ("manifest.parquet", "keep.parquet"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=scale.parse_n, default=1_000_000)
    ap.add_argument("--small", type=float, action="append", help="tmpfs sizes in GB to fill (repeatable; default 0.5 and 1.3)")
    ap.add_argument("--room", type=float, default=4.0, help="GB the tmpfs is grown to before the rerun")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--data", type=Path, default=scale.DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "disk_full")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: it mounts a tmpfs of a chosen size (sudo python bench/disk_full.py)", file=sys.stderr)
        return 2
    sizes = args.small or [0.5, 1.3]
    data = args.data / f"{args.n}"
    scale.build(data, args.n, threshold=args.threshold)
    input_bytes = sum(p.stat().st_size for p in (data / "img_emb").glob("*.npy"))
    args.out.mkdir(parents=True, exist_ok=True)
    ref = args.out / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    code, wall, _ = dedup(data, ref, args.threshold, [])
    if code != 0:
        print(f"reference run failed (exit {code})", file=sys.stderr)
        return 1
    print(f"N = {args.n:,}: input vectors {input_bytes / 1e9:.2f} GB; reference run {wall:.1f} s, OUT {held(ref) / 1e9:.2f} GB")
    rows: list[tuple[str, ...]] = []
    ok = True
    for size in sizes:
        point = args.out / f"fs-{size:g}GB"
        point.mkdir(exist_ok=True)
        mount(point, int(size * 1e9))
        try:
            out = point / "out"
            for label, extra in (("estimate on", []), ("--no-disk-check", ["--no-disk-check"])):
                if label == "estimate on" and size != sizes[0]:
                    continue
                code, wall, lines = dedup(data, out, args.threshold, extra)
                errors = [line for line in lines if line.startswith("Error:")]
                clean = code == 2 and len(errors) == 1 and not any("Traceback" in line for line in lines)
                ok &= clean
                rows.append((f"{size:g} GB", label, str(code), f"{wall:.1f}", str(len(lines)), f"{held(out) / 1e9:.2f}", errors[0] if errors else " | ".join(lines[-2:])))
            mount(point, int(args.room * 1e9), remount=True)
            code, wall, lines = dedup(data, out, args.threshold, ["--no-disk-check"])
            same = code == 0 and same_outputs(out, ref)
            ok &= same
            rows.append((f"{size:g} → {args.room:g} GB", "rerun", str(code), f"{wall:.1f}", str(len(lines)), f"{held(out) / 1e9:.2f}",
                         "manifest + keep list byte-identical to the reference" if same else "OUTPUTS DIFFER"))  # fmt: skip
        finally:
            subprocess.run(["umount", str(point)], check=False)
    head = ("file system", "run", "exit", "wall s", "stderr lines", "OUT GB", "what it said")
    print(" | ".join(head))
    for row in rows:
        print(" | ".join(row))
    print("all clean" if ok else "NOT CLEAN: see the rows above")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
