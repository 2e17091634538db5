"""End-to-end benchmark: ``dedup run`` over a real img2dataset output with planted duplicates.

Builds once (cached in ``bench/data/e2e/``) an img2dataset webdataset output of ``--n`` real
images in exactly 3 shards: distinct public-domain openclipart drawings (see ``realdata.py``)
as JPEG on white, plus planted duplicates (heavy-tailed: most drawings unique, a few with many
copies; exact byte copies under other URLs and edited copies), a few URLs that answer 404 and
one that serves undecodable bytes. Everything is served over loopback (127.0.0.1, used as an
HTTP proxy so the URLs look like ordinary web URLs) and downloaded by img2dataset for real.

Then runs ``dedup run <shards> --out <out>`` as a child process and prints: samples in the input,
manifest rows, failed rows, clusters of more than one sample, pairwise precision / recall of the
manifest's clusters against the planted truth, recall per kind of copy, wall time and peak RSS.

    python bench/e2e.py                 # ~1,300 images; the first run builds the data (~1 min)
    python bench/e2e.py --n 300 --rebuild --out bench/out/e2e-300 --json bench/out/e2e-300.json

The contract it checks: ``OUT/manifest.parquet`` with one row per input sample and columns
``sample_id, key, url, caption, status, error, cluster_id, cluster_size, keep, reason,
duplicate_of, similarity, signal``, plus ``OUT/report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "bench", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _data import EDIT_NAMES, GroundTruth, heavy_tailed_copies, pairwise_scores, plant_copies, serve_and_download  # noqa: E402
from realdata import clipart_caption, clipart_jpeg, clipart_name, distinct_originals, fetch_openclipart  # noqa: E402
from _common import dedup_command  # noqa: E402

DATA_VERSION = 2  # bump when the build changes, so cached data is rebuilt
DEFAULT_DATA = REPO / "bench" / "data" / "e2e"
DEFAULT_OUT = REPO / "bench" / "out" / "e2e"
N_SHARDS = 3
MANIFEST_COLUMNS = (
    *("sample_id", "key", "url", "caption", "status", "error", "cluster_id", "cluster_size"),
    *("keep", "reason", "duplicate_of", "similarity", "signal"),
)  # the columns the contract promises (DESIGN.md)


@dataclass(frozen=True, slots=True)
class BuiltData:
    """A cached benchmark dataset: the img2dataset output folder and its ground truth."""

    shards_dir: Path
    truth: GroundTruth
    meta: dict[str, Any]


def build(data_dir: Path, n: int, *, seed: int = 0, rebuild: bool = False, max_side: int = 512) -> BuiltData:
    """Build (or load from ``data_dir``) ``n`` samples in :data:`N_SHARDS` img2dataset shards.

    Composition: 25 % planted copies (:func:`heavy_tailed_copies`; 35 % of them exact byte copies,
    the rest edits from :data:`_data.EDIT_NAMES`), ``max(2, n // 200)`` 404s and one corrupt
    download; the rest are distinct openclipart originals, downscaled to ``max_side`` and encoded
    as JPEG (quality 90). The truth goes to ``data_dir/truth.json``, written last: it marks a
    finished build.
    """
    truth_file = data_dir / "truth.json"
    if not rebuild and truth_file.exists():
        saved = json.loads(truth_file.read_text())
        if saved["meta"].get("version") == DATA_VERSION and saved["meta"]["n"] == n and saved["meta"]["seed"] == seed:
            return BuiltData(data_dir / "i2d", GroundTruth(saved["group"], saved["kind"]), saved["meta"])
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    start = time.perf_counter()
    n_missing, n_corrupt = max(2, n // 200), 1
    n_copies = round(0.25 * n)
    n_originals = n - n_copies - n_missing - n_corrupt
    paths = distinct_originals(fetch_openclipart(), n_originals, seed)
    originals = [clipart_jpeg(p, max_side=max_side) for p in paths]
    rng = np.random.default_rng(seed)
    copies = heavy_tailed_copies(n_originals, n_copies, rng)
    items = plant_copies(
        originals,
        copies,
        rng,
        n_missing=n_missing,
        n_corrupt=n_corrupt,
        prefix="clipart",
        captions=[clipart_caption(p) for p in paths],
    )
    prepared = time.perf_counter() - start
    result, truth = serve_and_download(
        items,
        data_dir,
        rng,
        number_sample_per_shard=math.ceil(n / N_SHARDS),
        # One worker process is fastest here: spawning workers (each imports cv2, albumentations,
        # pandas) costs more than the loopback downloads they would share (1,300 images: 3.1 s
        # with 1 process x 8 threads, 4.8 s with 2 x 16, 7.7 s with 3 x 16 on 2 cores).
        processes_count=1,
        thread_count=8,
    )
    if len(result.shards) != N_SHARDS:
        raise RuntimeError(f"expected {N_SHARDS} shards, img2dataset wrote {len(result.shards)}")
    sources = {it.url: clipart_name(paths[it.group]) for it in items if it.kind == "original"}
    meta = {
        "version": DATA_VERSION,
        "n": n,
        "seed": seed,
        "originals": n_originals,
        "copies": n_copies,
        "missing": n_missing,
        "corrupt": n_corrupt,
        "bytes": sum(p.stat().st_size for p in result.shards),
        "prepare_seconds": round(prepared, 2),
        "img2dataset_seconds": round(result.seconds, 2),
    }
    payload = {"meta": meta, "group": dict(truth), "kind": truth.kind, "original_png": sources}
    tmp = truth_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, truth_file)
    return BuiltData(result.out_dir, truth, meta)


# ------------------------------------------------------------------------------------ running


@dataclass(frozen=True, slots=True)
class RunStats:
    """How one ``dedup run`` child went."""

    returncode: int
    wall_seconds: float
    max_rss_mib: float  # largest single process of the child's tree (getrusage RUSAGE_CHILDREN)
    tree_peak_rss_mib: float  # peak of the summed RSS of the whole tree, sampled every 0.1 s
    cpu_seconds: float


_LAUNCHER = """
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "maxrss_kib": ru.ru_maxrss, "cpu": ru.ru_utime + ru.ru_stime}, fh)
sys.exit(rc)
"""


def _tree_rss_kib(root_pid: int) -> int:
    """Summed VmRSS (KiB) of ``root_pid`` and all its descendants, from /proc (0 elsewhere)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{name}/statm") as fh:
                pages = int(fh.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        pid = int(name)
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[pid] = pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    total, todo = 0, [root_pid]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run_measured(cmd: Sequence[str], log_path: Path) -> RunStats:
    """Run ``cmd`` under a tiny launcher that reports its children's rusage; sample tree RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage.json"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(report), *cmd], stdout=log, stderr=subprocess.STDOUT
            )
            peak = 0
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, _tree_rss_kib(proc.pid))
                    stop.wait(0.1)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            proc.wait()
            wall = time.perf_counter() - start
            stop.set()
            sampler.join()
        usage = (
            json.loads(report.read_text()) if report.exists() else {"rc": proc.returncode, "maxrss_kib": 0, "cpu": 0.0}
        )
    return RunStats(int(usage["rc"]), wall, usage["maxrss_kib"] / 1024, peak / 1024, float(usage["cpu"]))


# ------------------------------------------------------------------------------------ scoring


def sidecar_rows(shards_dir: Path) -> list[dict[str, Any]]:
    """The img2dataset sidecar rows (one per input URL) of every shard."""
    rows: list[dict[str, Any]] = []
    for side in sorted(shards_dir.glob("*.parquet")):
        rows.extend(pq.read_table(side, columns=["key", "url", "status"]).to_pylist())
    return rows


def score(manifest: Path, shards_dir: Path, truth: GroundTruth) -> dict[str, Any]:
    """Compare a manifest with the planted truth (joined on URL, falling back to key → URL)."""
    side = sidecar_rows(shards_dir)
    url_of_key = {r["key"]: r["url"] for r in side}
    table = pq.read_table(manifest)
    rows = table.to_pylist()
    cols = set(table.column_names)
    predicted: dict[str, Any] = {}
    status: dict[str, str] = {}
    for r in rows:
        url = r.get("url") or url_of_key.get(str(r.get("key")))
        if url is None:
            continue
        ok = r.get("status") == "ok"
        status[url] = str(r.get("status"))
        size = r.get("cluster_size") or 1
        predicted[url] = r.get("cluster_id") if ok and size > 1 else None
    precision, recall = pairwise_scores(predicted, truth)

    # Per kind of copy: is the copy in the same predicted cluster as its group's original?
    original_of = {truth[u]: u for u, k in truth.kind.items() if k == "original"}
    found: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for url, kind in truth.kind.items():
        if kind == "original" or url in truth.failed or url not in predicted:
            continue
        total[kind] += 1
        orig = original_of.get(truth[url])
        if predicted[url] is not None and orig is not None and predicted.get(orig) == predicted[url]:
            found[kind] += 1
    clusters = Counter(v for v in predicted.values() if v is not None)
    return {
        "input_samples": len(side),
        "manifest_rows": len(rows),
        "missing_columns": sorted(set(MANIFEST_COLUMNS) - cols),
        "failed_rows": sum(1 for r in rows if r.get("status") != "ok"),
        "failed_expected": len(truth.failed),
        "planted_failures_failed": sum(1 for u in truth.failed if status.get(u) not in (None, "ok")),
        "clusters_gt1": len(clusters),
        "true_groups_gt1": sum(1 for m in truth.groups().values() if len(m) > 1),
        "removed": sum(1 for r in rows if r.get("status") == "ok" and r.get("keep") is False),
        "removable_planted": sum(len(m) - 1 for m in truth.groups().values()),
        "pair_precision": precision,
        "pair_recall": recall,
        "recall_by_kind": {k: (found[k], total[k]) for k in ("exact", *EDIT_NAMES) if total[k]},
    }


def _print_table(results: Mapping[str, Any], stats: RunStats, data: BuiltData) -> None:
    lines = [
        ("input samples (sidecars)", f"{results['input_samples']}"),
        ("manifest rows", f"{results['manifest_rows']}"),
        (
            "failed rows (planted; of them failed)",
            f"{results['failed_rows']} ({results['failed_expected']}; {results['planted_failures_failed']})",
        ),
        ("clusters of size > 1 (planted)", f"{results['clusters_gt1']} ({results['true_groups_gt1']})"),
        ("removed, keep=false (planted copies)", f"{results['removed']} ({results['removable_planted']})"),
        ("pairwise precision", f"{results['pair_precision']:.4f}"),
        ("pairwise recall", f"{results['pair_recall']:.4f}"),
    ]
    for kind, (hit, tot) in results["recall_by_kind"].items():
        lines.append((f"  recall of '{kind}' copies", f"{hit}/{tot}"))
    lines += [
        ("wall time", f"{stats.wall_seconds:.1f} s"),
        ("cpu time (user + sys)", f"{stats.cpu_seconds:.1f} s"),
        ("peak RSS, largest process", f"{stats.max_rss_mib:.0f} MiB"),
        ("peak RSS, whole process tree", f"{stats.tree_peak_rss_mib:.0f} MiB"),
        ("input size (tars)", f"{data.meta['bytes'] / 2**20:.1f} MiB"),
    ]
    if results["missing_columns"]:
        lines.append(("manifest columns missing", ", ".join(results["missing_columns"])))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, build or load the data, run ``dedup run``, print the table."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1300, help="samples in the input, failed ones included (default 1300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached dataset")
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"dataset cache (default {DEFAULT_DATA.relative_to(REPO)})"
    )
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"dedup's output folder (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    ap.add_argument("--dedup", default=None, help="the command to run instead of `dedup` (e.g. 'python -m dedup')")
    ap.add_argument("--args", default="", help="extra arguments for `dedup run`, as one shell-quoted string")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here as JSON")
    ap.add_argument("--build-only", action="store_true", help="build the dataset and stop")
    opts = ap.parse_args(argv)

    t0 = time.perf_counter()
    data = build(opts.data, opts.n, seed=opts.seed, rebuild=opts.rebuild)
    kinds = Counter(data.truth.kind.values())
    print(
        f"data: {data.shards_dir} ({len(data.truth)} URLs: {kinds['original']} originals, "
        f"{sum(v for k, v in kinds.items() if k not in ('original', 'missing', 'corrupt'))} copies, "
        f"{kinds['missing']} 404, {kinds['corrupt']} corrupt; ready in {time.perf_counter() - t0:.1f} s, "
        f"img2dataset took {data.meta['img2dataset_seconds']} s when built)"
    )
    if opts.build_only:
        return 0
    if opts.out.exists():
        shutil.rmtree(opts.out)
    cmd = [
        *(shlex.split(opts.dedup) if opts.dedup else dedup_command()),
        "run",
        str(data.shards_dir),
        "--out",
        str(opts.out),
    ]
    cmd += shlex.split(opts.args)
    log = opts.out.with_name(opts.out.name + ".log")
    print("run:", shlex.join(cmd))
    stats = run_measured(cmd, log)
    if stats.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        print(f"dedup run failed with exit code {stats.returncode}; log {log} ends with:\n{tail}", file=sys.stderr)
        return 1
    manifest = opts.out / "manifest.parquet"
    if not manifest.exists():
        print(f"{manifest} was not written (log: {log})", file=sys.stderr)
        return 1
    results = score(manifest, data.shards_dir, data.truth)
    if not (opts.out / "report.json").exists():
        print(f"warning: {opts.out / 'report.json'} was not written", file=sys.stderr)
    _print_table(results, stats, data)
    if opts.json is not None:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps({"results": results, "run": asdict(stats), "data": data.meta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
