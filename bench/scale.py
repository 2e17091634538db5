"""Scale benchmark: ``dedup run`` over N precomputed embeddings in clip-retrieval layout, checked
against exact brute-force search.

Builds (cached under ``bench/data/scale/<N>/``) N structured unit vectors of dim 512 — topics and
sub-topics, so k-means partitions cut through dense regions — with planted near-duplicate groups
of heavy-tailed sizes (cliques whose pair cosines sit just above the threshold, chains whose
neighbours are just above it but whose ends are far below, and near-miss pairs just below it),
written as clip-retrieval writes them: ``img_emb/img_emb_K.npy`` (float16) beside
``metadata/metadata_K.parquet`` (``image_path, caption, url``), several files.

Then runs ``dedup run DATA --out OUT --threshold 0.95 --quiet`` as a child process and checks the
manifest against brute force on a sample of query rows (most of them members of planted groups):

* ``recall``: of the pairs at or above the threshold (exact search over all N), the share whose
  two samples ended in the same cluster (what connected components over exact search give: 1.0);
* ``far_below``: of the cluster-mates of the queries, the share whose cosine to the query is more
  than 0.1 under the threshold (chaining: planted chains put some there by design).

Prints, per N: wall time, peak RSS of the run, embedding edges, recall, far-below share, and the
machine load; then, per N, each phase's wall time and peak RSS, which the run reports itself
(``DEDUP_PHASES=1``: the kernel's high-water mark, reset per phase). The run's peak is the
largest phase peak. ``wait4``'s ``ru_maxrss`` is kept in the JSON only and is not the run's
peak: Linux starts a child's maximum at the RSS its parent had when it forked (after this process
has built 10M vectors it said ~12 GiB whatever the run used), and the per-phase resets lower it.

    python bench/scale.py                      # N = 100k and 1M
    python bench/scale.py --n 100k --n 1m --n 10m --json bench/out/scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import echo_phases  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "bench" / "data" / "scale"
DEFAULT_OUT = REPO / "bench" / "out" / "scale"
DATA_VERSION = 1  # bump when the build changes, so cached data is rebuilt
DIM = 512
TOPICS = 100
SUBTOPICS = 20


# --------------------------------------------------------------------------- data


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@dataclass(frozen=True)
class Space:
    """Topic structure: a vector is ``0.5 topic + 0.5 subtopic + noise``, normalised; two vectors
    of one sub-topic have cosine ~0.33, of one topic ~0.17, otherwise ~0."""

    topics: np.ndarray  # (TOPICS, DIM)
    subtopics: np.ndarray  # (TOPICS, SUBTOPICS, DIM)

    @classmethod
    def make(cls, seed: int, dim: int = DIM) -> Space:
        rng = np.random.default_rng(seed)
        return cls(_unit(rng.standard_normal((TOPICS, dim))), _unit(rng.standard_normal((TOPICS * SUBTOPICS, dim))).reshape(TOPICS, SUBTOPICS, dim))

    def sample(self, m: int, rng: np.random.Generator) -> np.ndarray:
        dim = self.topics.shape[1]
        t = rng.integers(0, TOPICS, m)
        s = rng.integers(0, SUBTOPICS, m)
        x = rng.standard_normal((m, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
        x += 0.5 * self.topics[t]
        x += 0.5 * self.subtopics[t, s]
        return _unit(x)


def _orthogonal_noise(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors orthogonal to each row of ``base``."""
    u = rng.standard_normal(base.shape, dtype=np.float32)
    u -= np.sum(u * base, axis=1, keepdims=True) * base
    return _unit(u)


def group_sizes(n_rows: int, rng: np.random.Generator, cap: int) -> np.ndarray:
    """Heavy-tailed group sizes (2 + Zipf(2.5) - 1, capped) adding up to about ``n_rows``."""
    sizes: list[np.ndarray] = []
    total = 0
    while total < n_rows:
        s = np.minimum(1 + rng.zipf(2.5, 100_000), cap)
        sizes.append(s)
        total += int(s.sum())
    out = np.concatenate(sizes)
    return out[: int(np.searchsorted(np.cumsum(out), n_rows)) + 1]


def plant(
    n: int, threshold: float, seed: int, space: Space, dup_share: float = 0.2, cap: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Planted groups: ``(group_of_row, kind_of_group, rows, batches)``, ``batches`` being
    ``(rows, vectors)`` pairs to write over the background. Kinds: 0 clique (pair cosines in
    [T+0.003, T+0.03]), 1 chain (neighbours in [T+0.003, T+0.02]), 2 near-miss pair (cosine in
    [T-0.02, T-0.002])."""
    rng = np.random.default_rng(seed + 1)
    sizes = group_sizes(int(n * dup_share), rng, cap)
    kind = rng.choice(3, size=sizes.shape[0], p=[0.86, 0.10, 0.04])
    kind[(kind == 1) & (sizes < 3)] = 0
    sizes[kind == 2] = 2
    total = int(sizes.sum())
    rows = rng.permutation(n)[:total].astype(np.int64)
    group_of_row = np.full(n, -1, np.int32)
    gid = np.repeat(np.arange(sizes.shape[0], dtype=np.int32), sizes)
    group_of_row[rows] = gid
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    dim = space.topics.shape[1]

    # cliques and near-miss pairs: members = (center + e * u) / sqrt(1 + e^2), u ⟂ center, so two
    # members have cosine 1 / (1 + e^2) (+- e^2 / sqrt(dim)); a near-miss pair is center + member.
    for k in (0, 2):
        groups = np.flatnonzero(kind == k)
        for chunk in np.array_split(groups, max(1, groups.size // 20_000)):
            if chunk.size == 0:
                continue
            centers = space.sample(chunk.size, rng)
            lo, hi = (threshold + 0.003, threshold + 0.03) if k == 0 else (threshold - 0.02, threshold - 0.002)
            cos = rng.uniform(lo, hi, chunk.size).astype(np.float32)
            member_rows = np.concatenate([rows[starts[g] : starts[g] + sizes[g]] for g in chunk])
            owner = np.repeat(np.arange(chunk.size), sizes[chunk])
            base = centers[owner]
            if k == 0:
                e = np.sqrt(1.0 / cos - 1.0)[owner, None]
                vecs = (base + e * _orthogonal_noise(base, rng)) / np.sqrt(1.0 + e * e)
            else:
                e = np.sqrt(1.0 / cos**2 - 1.0)[owner, None]
                vecs = (base + e * _orthogonal_noise(base, rng)) / np.sqrt(1.0 + e * e)
                first = np.concatenate([[True], owner[1:] != owner[:-1]])
                vecs[first] = base[first]  # the pair: center and one step away
            batches.append((member_rows, vecs.astype(np.float16)))

    # chains: each member one step (cosine in [T+0.003, T+0.02]) from the previous one.
    groups = np.flatnonzero(kind == 1)
    if groups.size:
        cur = space.sample(groups.size, rng)
        cos = rng.uniform(threshold + 0.003, threshold + 0.02, groups.size).astype(np.float32)
        e = np.sqrt(1.0 / cos**2 - 1.0)[:, None]
        for step in range(int(sizes[groups].max())):
            alive = sizes[groups] > step
            if step:
                cur = (cur + e * _orthogonal_noise(cur, rng)) / np.sqrt(1.0 + e * e)
            batches.append((rows[starts[groups[alive]] + step], cur[alive].astype(np.float16)))
    dim = dim  # noqa: PLW0127 - documents that vectors have the space's dimension
    return group_of_row, kind, rows, batches


def rows_per_file(n: int) -> int:
    files = max(4, math.ceil(n / 1_000_000))
    return math.ceil(n / files)


def build(data: Path, n: int, *, threshold: float = 0.95, seed: int = 0) -> None:
    """Write the clip-retrieval layout for ``n`` vectors under ``data`` (skipped if current)."""
    stamp = data / "built.json"
    want = {"version": DATA_VERSION, "n": n, "threshold": threshold, "seed": seed, "dim": DIM}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    shutil.rmtree(data, ignore_errors=True)
    (data / "img_emb").mkdir(parents=True)
    (data / "metadata").mkdir(parents=True)
    t0 = time.perf_counter()
    space = Space.make(seed)
    group_of_row, kind, _, batches = plant(n, threshold, seed, space)
    per_file = rows_per_file(n)
    rng = np.random.default_rng(seed + 2)
    maps: list[np.memmap] = []
    for f, start in enumerate(range(0, n, per_file)):
        stop = min(n, start + per_file)
        mm = np.lib.format.open_memmap(data / "img_emb" / f"img_emb_{f}.npy", mode="w+", dtype=np.float16, shape=(stop - start, DIM))
        for a in range(start, stop, 100_000):
            b = min(stop, a + 100_000)
            mm[a - start : b - start] = space.sample(b - a, rng).astype(np.float16)
        maps.append(mm)
        rows = pl.int_range(start, stop, eager=True).alias("row")
        meta = pl.DataFrame({"row": rows}).select(
            pl.format("{}.jpg", pl.col("row").cast(pl.String).str.zfill(9)).alias("image_path"),
            pl.format("synthetic photo number {} of the scale bench", pl.col("row")).alias("caption"),
            pl.format("https://img{}.example.com/photos/{}.jpg", pl.col("row") % 97, pl.col("row")).alias("url"),
        )
        meta.write_parquet(data / "metadata" / f"metadata_{f}.parquet")
    for rows, vecs in batches:
        f = rows // per_file
        for ff in np.unique(f):
            sel = f == ff
            maps[int(ff)][rows[sel] - ff * per_file] = vecs[sel]
    for mm in maps:
        mm.flush()
    del maps, batches
    np.savez(data / "truth.npz", group_of_row=group_of_row, kind=kind)
    stamp.write_text(json.dumps(want))
    print(f"built {n:,} vectors in {time.perf_counter() - t0:.1f} s: {data}", file=sys.stderr)


class Files:
    """Read access to the built vectors by global row, as float32 unit vectors."""

    def __init__(self, data: Path, n: int) -> None:
        self.per_file = rows_per_file(n)
        self.paths = [data / "img_emb" / f"img_emb_{f}.npy" for f in range(math.ceil(n / self.per_file))]

    def blocks(self, block: int = 200_000):
        for f, path in enumerate(self.paths):
            mm = np.load(path, mmap_mode="r")
            for a in range(0, mm.shape[0], block):
                yield f * self.per_file + a, _unit(np.asarray(mm[a : a + block], np.float32))
            del mm

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.shape[0], DIM), np.float32)
        f = rows // self.per_file
        for ff in np.unique(f):
            sel = np.flatnonzero(f == ff)
            mm = np.load(self.paths[int(ff)], mmap_mode="r")
            out[sel] = _unit(np.asarray(mm[rows[sel] - ff * self.per_file], np.float32))
            del mm
        return out


# --------------------------------------------------------------------------- run and check


@dataclass
class Result:
    n: int
    wall_s: float
    peak_rss_gib: float
    edges: int
    pairs_at_threshold: int
    queries: int
    exact_pairs: int
    recall: float
    far_below: float
    mates_checked: int
    load_before: str
    load_after: str
    exit_code: int
    phases: list[dict[str, float | str]] | None = None
    peak_rss_wait4_gib: float = float("nan")  # not the run's peak: see the module docstring
    input_vector_bytes: int = 0  # the img_emb/*.npy files (float16)
    disk_peak_bytes: int = 0  # OUT (checkpoints, scratch, outputs) at its largest during the run
    scratch_peak_bytes: int = 0  # the partitioned search's spill (OUT/.work/search) at its largest
    out_final_bytes: int = 0  # OUT after the run, checkpoints included (hard links counted once)
    checkpoint_bytes: int = 0  # OUT/.work/<stage>/ after the run


class DiskWatch:
    """Bytes allocated under a folder (``st_blocks``; a file hard-linked twice counted once),
    sampled every ``interval`` s on a thread: the peak of the whole folder and of one subfolder."""

    def __init__(self, folder: Path, sub: Path, interval: float = 0.25) -> None:
        import threading

        self.folder, self.sub, self.interval = folder, sub, interval
        self.peak = self.sub_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        total, sub = usage(self.folder, self.sub)
        self.peak = max(self.peak, total)
        self.sub_peak = max(self.sub_peak, sub)


def usage(folder: Path, sub: Path | None = None) -> tuple[int, int]:
    """(bytes allocated under ``folder``, of which under ``sub``), each inode once."""
    seen: set[tuple[int, int]] = set()
    total = inside = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(parent, name))
            except OSError:  # deleted while walking
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
            if sub is not None and parent.startswith(str(sub)):
                inside += st.st_blocks * 512
    return total, inside


def run_cli(data: Path, out: Path, threshold: float, extra: list[str]) -> tuple[float, float, int]:
    """``dedup run`` as a child process: (wall seconds, peak RSS GiB of that child, exit code)."""
    shutil.rmtree(out, ignore_errors=True)
    dedup = Path(sys.executable).with_name("dedup")
    cmd = [str(dedup), "run", str(data), "--out", str(out), "--threshold", str(threshold), "--quiet", *extra]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # DEDUP_PHASES: the run prints "[phase] NAME: S s, peak RSS G GiB ..." per global phase.
    proc = subprocess.Popen(cmd, env={**os.environ, "DEDUP_PHASES": "1"}, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    phases.clear()
    with DiskWatch(out, out / ".work" / "search") as watch:
        phases.extend(echo_phases(proc.stderr))
        # wait4: this child's own rusage (RUSAGE_CHILDREN would keep the largest child of the run)
        _, status, rusage = os.wait4(proc.pid, 0)
    disk.update(peak=watch.peak, scratch=watch.sub_peak)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return wall, rusage.ru_maxrss / (1 << 20), proc.returncode  # ru_maxrss is in KiB on Linux


phases: list[dict[str, float | str]] = []
disk: dict[str, int] = {}


def check(data: Path, out: Path, n: int, threshold: float, queries: int, seed: int = 7) -> dict[str, float | int]:
    """Recall of exact pairs and far-below share of cluster-mates, on a sample of query rows."""
    files = Files(data, n)
    group_of_row = np.load(data / "truth.npz")["group_of_row"]
    m = pl.read_parquet(out / "manifest.parquet", columns=["sample_id", "cluster_id"])
    parts = m.select(
        pl.col("sample_id").str.extract(r"img_emb_(\d+)/", 1).cast(pl.Int64).alias("f"),
        pl.col("sample_id").str.extract(r"/(\d+)$", 1).cast(pl.Int64).alias("r"),
        pl.col("cluster_id"),
    )
    rows = (parts["f"] * files.per_file + parts["r"]).to_numpy()
    cluster = np.full(n, -1, np.int64)
    cluster[rows] = parts["cluster_id"].fill_null(-1).to_numpy()
    del m, parts

    rng = np.random.default_rng(seed)
    members = np.flatnonzero(group_of_row >= 0)
    q = np.unique(
        np.concatenate(
            [rng.choice(members, min(members.size, int(queries * 0.7)), replace=False), rng.choice(n, int(queries * 0.3), replace=False)]
        )
    )
    qv = files.take(q)
    pair_q: list[np.ndarray] = []
    pair_r: list[np.ndarray] = []
    for start, block in files.blocks():
        qi, bj = np.nonzero(qv @ block.T >= threshold)
        pair_q.append(q[qi])
        pair_r.append(bj + start)
    a, b = np.concatenate(pair_q), np.concatenate(pair_r)
    a, b = a[a != b], b[a != b]
    recall = float(np.mean(cluster[a] == cluster[b])) if a.size else 1.0

    # far below: cluster-mates of the queries (up to 200 each) whose cosine to the query is
    # more than 0.1 under the threshold
    order = np.argsort(cluster, kind="stable")
    sorted_c = cluster[order]
    far = checked = 0
    for i, row in enumerate(q):
        lo, hi = np.searchsorted(sorted_c, cluster[row]), np.searchsorted(sorted_c, cluster[row], side="right")
        mates = order[lo:hi]
        mates = mates[mates != row]
        if mates.size == 0:
            continue
        if mates.size > 200:
            mates = rng.choice(mates, 200, replace=False)
        cos = files.take(np.sort(mates)) @ qv[i]
        far += int(np.sum(cos < threshold - 0.1))
        checked += int(mates.size)
    return {
        "queries": int(q.size),
        "exact_pairs": int(a.size),
        "recall": recall,
        "far_below": far / checked if checked else 0.0,
        "mates_checked": checked,
    }


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def parse_n(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", action="append", type=parse_n, help="vectors (100k, 1m, 10m); repeatable (default: 100k and 1m)")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--queries", type=int, default=1000, help="query rows checked against brute force")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the inputs are built (cached; 10m needs ~10 GiB)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the run outputs (they hold a copy of the vectors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("extra", nargs="*", help="more `dedup run` options, after --")
    args = ap.parse_args(argv)
    results: list[Result] = []
    for n in args.n or [100_000, 1_000_000]:
        data = args.data / f"{n}"
        build(data, n, threshold=args.threshold, seed=args.seed)
        out = args.out / f"{n}"
        before = _load()
        wall, wait4_rss, code = run_cli(data, out, args.threshold, args.extra)
        rss = max((float(p["peak_rss_gib"]) for p in phases), default=wait4_rss)
        after = _load()
        if code != 0:
            results.append(Result(n, wall, rss, 0, 0, 0, 0, float("nan"), float("nan"), 0, before, after, code, list(phases), wait4_rss))
            continue
        report = json.loads((out / "report.json").read_text())
        final, ckpt = usage(out, next((out / ".work").glob("[0-9a-f]*"), out / ".work"))
        input_bytes = sum(p.stat().st_size for p in (data / "img_emb").glob("*.npy"))
        checked = check(data, out, n, args.threshold, args.queries)
        edges = int(report["links_per_signal"].get("precomputed", 0))
        pairs = int(report["embedding_pairs_at"].get(f"{args.threshold:g}", {}).get("pairs", edges))
        results.append(
            Result(
                n, wall, rss, edges, pairs,
                int(checked["queries"]), int(checked["exact_pairs"]), float(checked["recall"]),
                float(checked["far_below"]), int(checked["mates_checked"]), before, after, code, list(phases), wait4_rss,
                input_bytes, disk["peak"], disk["scratch"], final, ckpt,
            )
        )  # fmt: skip
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{'N':>11} {'wall s':>8} {'peak RSS GiB':>13} {'edges':>11} {'recall':>8} {'far-below':>10}  load (1/5/15 min) before → after")
    for r in results:
        print(
            f"{r.n:>11,} {r.wall_s:>8.1f} {r.peak_rss_gib:>13.2f} {r.edges:>11,} {r.recall:>8.4f} {r.far_below:>10.4f}"
            f"  {r.load_before} → {r.load_after}" + (f"  (exit {r.exit_code})" if r.exit_code else "")
        )
    for r in results:
        if r.phases:
            print(f"{r.n:>11,} per phase: " + "; ".join(f"{p['phase']} {p['seconds']:.1f} s / {p['peak_rss_gib']:.2f} GiB" for p in r.phases))
    print()
    print(f"{'N':>11} {'input GB':>9} {'peak disk GB':>13} {'× input':>8} {'scratch peak GB':>16} {'× input':>8} {'OUT after GB':>13} {'× input':>8}"
          f" {'B/sample: peak':>15} {'scratch':>8} {'OUT':>6}")  # fmt: skip
    for r in results:
        if not r.input_vector_bytes:
            continue
        x = r.input_vector_bytes
        print(
            f"{r.n:>11,} {x / 1e9:>9.2f} {r.disk_peak_bytes / 1e9:>13.2f} {r.disk_peak_bytes / x:>8.2f} {r.scratch_peak_bytes / 1e9:>16.2f}"
            f" {r.scratch_peak_bytes / x:>8.2f} {r.out_final_bytes / 1e9:>13.2f} {r.out_final_bytes / x:>8.2f}"
            f" {r.disk_peak_bytes / r.n:>15.0f} {r.scratch_peak_bytes / r.n:>8.0f} {r.out_final_bytes / r.n:>6.0f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0 if all(r.exit_code == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
