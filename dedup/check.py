"""``dedup check``: gate a new drop of data on its duplicates, inside itself and against a baseline.

::

    drop ─► plan (its shards the index lacks) ─► fingerprint + embed (work folder)
         ─► links inside the drop: the run's own search (find_edges) over the drop alone
         ─► links to the baseline: faiss range search of the drop's embeddings and PDQ/pHash
            codes against the index's faiss files, exact bytes/pixels against its hashes
         ─► numbers ─► limits (GateConfig) ─► pass / fail  [─► --update: index add of the drop]

The work grows with the drop: only the drop is decoded and embedded, and every search has the
drop's rows as queries against indexes read from disk (the baseline is never re-embedded nor
re-searched against itself). The baseline is read once, under a shared lock, and never written:
any number of checks can run against one index at once; ``update=True`` adds the drop through
:func:`dedup.add.add` (exclusive lock) when the gate passes, failing cleanly if the index
changed since it was read.

The signals and thresholds are the baseline's own (its config, in ``index/meta.json``), so a
check finds the links that ``index add`` would make. The numbers behind the limits:

* **duplicating the baseline**: ok drop samples with a direct link (any signal) to an ok
  baseline sample, over the drop's ok samples;
* **duplicated within the drop**: ok drop samples a run over the drop alone would drop as
  copies of another drop sample (a cluster of k counts k - 1), over the drop's ok samples;
* **largest cluster**: the largest cluster holding a drop sample once the drop joins the index:
  drop samples plus the members of every baseline cluster they link to.

Nothing here prints or exits: :func:`check` returns a :class:`CheckResult`, which
:mod:`dedup.check_report` renders (terminal, JSON, JUnit, Markdown).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from dedup._progress import ProgressFactory, silent
from dedup._types import Shard
from dedup.cluster import components
from dedup.config import GateConfig, KeepPolicy, RunConfig
from dedup.decisions import apply_decisions, cross_constraints, load_decisions
from dedup.add import AddPlan, add, indexed_size, plan_add
from dedup.signals import BASE_COLUMNS, cross_links, find_edges, refuse_mixed_vectors, vector_kinds
from dedup.store import Index, open_index, resolve_source
from dedup.manifest import build_manifest
from dedup.featurize import FeatureStep
from dedup.pipeline import FEATURES
from dedup.pixels import resolve_against, resolve_within
from dedup.rows import as_rows
from dedup.search import Candidates, CrossLinks, Edges, Signal
from dedup.second_look.look import verify_candidates
from dedup.second_look.propose import RegionFiles, band_candidates, fresh, load_trims, partial_candidates
from dedup.select import keepers

if TYPE_CHECKING:
    from dedup.executors.base import Executor

# The baseline columns a check reads (samples.parquet), all in one consistent snapshot.
BASELINE_COLUMNS = tuple(dict.fromkeys(("sample_id", "shard", *BASE_COLUMNS, "cluster_id")))


@dataclass(frozen=True, slots=True)
class Match:
    """A drop sample and its strongest link to another sample (in the baseline or the drop)."""

    sample_id: str
    url: str | None
    match_id: str
    match_url: str | None
    similarity: float
    signal: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_id": self.sample_id,
            "url": self.url,
            "match_id": self.match_id,
            "match_url": self.match_url,
            "similarity": round(self.similarity, 6),
            "signal": self.signal,
        }


@dataclass(frozen=True, slots=True)
class LimitResult:
    """One limit of the gate: the drop's value, the limit (negative: off) and the verdict."""

    name: str  # the GateConfig field
    label: str  # what it measures, for people
    value: float
    limit: float
    count: int  # the samples behind a share (the cluster size for max_cluster_size)
    is_share: bool

    @property
    def off(self) -> bool:
        return self.limit < 0

    @property
    def passed(self) -> bool:
        # A share is a ratio of counts: compare with a little slack so 5/100 meets 0.05.
        return self.off or self.value <= self.limit + 1e-12

    def show(self, value: float) -> str:
        return f"{value:.1%}" if self.is_share else f"{int(value)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "value": self.value,
            "count": self.count,
            "limit": None if self.off else self.limit,
            "passed": self.passed,
            "off": self.off,
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    source: str
    against: str
    baseline_samples: int
    baseline_generation: int
    samples: int  # the drop's rows (new shards only)
    ok: int
    failed: int
    new_shards: int
    known_shards: int  # shards of the source the index already holds: not checked
    duplicating_baseline: int
    duplicated_within_drop: int
    largest_cluster: int
    largest_cluster_drop_samples: int
    largest_cluster_example: str | None
    baseline_links_by_signal: dict[str, int]  # drop samples by the signal of their strongest baseline link
    limits: tuple[LimitResult, ...]
    baseline_matches: tuple[Match, ...]  # worst first (strongest signal, then similarity); at most ``top``
    drop_matches: tuple[Match, ...]
    updated: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(limit.passed for limit in self.limits)

    @property
    def failed_limits(self) -> tuple[LimitResult, ...]:
        return tuple(limit for limit in self.limits if not limit.passed)

    @property
    def share_duplicating_baseline(self) -> float:
        return self.duplicating_baseline / self.ok if self.ok else 0.0

    @property
    def share_duplicated_within_drop(self) -> float:
        return self.duplicated_within_drop / self.ok if self.ok else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "source": self.source,
            "against": self.against,
            "baseline": {"samples": self.baseline_samples, "generation": self.baseline_generation},
            "drop": {
                "samples": self.samples,
                "ok": self.ok,
                "failed": self.failed,
                "new_shards": self.new_shards,
                "known_shards": self.known_shards,
            },
            "duplicating_baseline": {
                "samples": self.duplicating_baseline,
                "share": self.share_duplicating_baseline,
                "by_signal": dict(sorted(self.baseline_links_by_signal.items())),
            },
            "duplicated_within_drop": {
                "samples": self.duplicated_within_drop,
                "share": self.share_duplicated_within_drop,
            },
            "largest_cluster": {
                "size": self.largest_cluster,
                "drop_samples": self.largest_cluster_drop_samples,
                "example": self.largest_cluster_example,
            },
            "limits": [limit.to_dict() for limit in self.limits],
            "baseline_matches": [m.to_dict() for m in self.baseline_matches],
            "drop_matches": [m.to_dict() for m in self.drop_matches],
            "updated": self.updated,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def check(
    source: str,
    against: str | Path,
    *,
    gate: GateConfig | None = None,
    top: int = 20,
    work: str | Path | None = None,
    update: bool = False,
    workers: int | None = None,
    batch_size: int | None = None,
    executor: Executor | None = None,
    progress: ProgressFactory | None = None,
    disk_check: bool = True,
) -> CheckResult:
    """Check the drop ``source`` against the index of the output folder ``against``.

    ``gate``: the limits (default: :class:`GateConfig`'s). ``top``: how many matches of each
    kind the result lists. ``work``: where the drop's features go (default: a temporary folder,
    removed afterwards; a folder of your own keeps them, and a rerun resumes from them).
    ``update``: add the drop to the index when the gate passes. ``disk_check`` (with ``update``):
    estimate the disk the add would need and stop before starting when the free space is short.

    Raises:
        IndexUnreadableError: ``against`` holds no readable index.
        SourceError: the drop cannot be read.
        IndexConflictError: a shard of the drop is in the index with other contents, or (with
            ``update``) the index changed while the check ran.
    """
    from dedup import pipeline

    limits_cfg = gate or GateConfig()
    prog = progress or silent
    started = time.perf_counter()
    base = open_index(against, columns=BASELINE_COLUMNS, search=True)
    cfg = base.config.with_overrides({"workers": workers, "embed.batch_size": batch_size})
    plan = plan_add(base, [source], folder_batch=cfg.folder_batch)
    if int(base.meta.get("embedded") or 0):
        refuse_mixed_vectors(
            str(base.meta.get("model", base.config.embed.model.value)), vector_kinds(plan.new, cfg),
            where=f"the index in {base.directory}", dim=base.meta.get("dim"),
        )
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dedup-check-") as tmp:
        work_dir = (Path(work) if work is not None else Path(tmp)) / cfg.stage_key()
        if update and disk_check and plan.new:
            need = pipeline.estimate_disk(plan.new, cfg, work_dir, Path(against), indexed=indexed_size(base))
            pipeline.check_free_space(need, Path(against), work_dir.parent, what="this check --update")
        table, vectors, _ = pipeline.featurize(plan.new, work_dir, cfg, executor=executor, progress=prog)
        table = table.combine_chunks()
        if cfg.search.exact and plan.new:
            # The pixel hashes the links need (dedup.pixels): the drop's within itself, then the
            # drop's and the index's rows that share a pixel key (index rows re-read from its
            # sources where their hash was never computed).
            threads = cfg.workers or os.cpu_count() or 1
            rows, _ = resolve_within(table, plan.new, max_pixels=cfg.fingerprint.max_pixels, executor=executor, workers=threads)
            rows, samples, _ = resolve_against(
                rows, plan.new, base.samples, [e.shard for e in base.catalog.shards],
                max_pixels=cfg.fingerprint.max_pixels, executor=executor, workers=threads,
            )  # fmt: skip
            table, base = rows.to_table(), replace(base, samples=samples)
        featurized = time.perf_counter()
        # The drop is featurized under the ids an add would give it (so --update reuses the
        # work); people read its samples by their ids in the drop.
        position = resolve_position(plan, source)
        # The direct links, once: inside the drop, and from it to the baseline (the signals table).
        edges, _ = find_edges(table, vectors, cfg.with_overrides({"search.report_thresholds": []}))
        links = cross_links(table, vectors, base, cfg)
        looked = second_look_against(
            base, plan.new, table, vectors, cfg, edges, links, work=work_dir, executor=executor, progress=prog
        )
        if looked is not None:
            edges, links = Edges.concat([edges, looked[0]]), CrossLinks.concat([links, looked[1]])
        with prog("search (drop)", 1, "step") as bar:
            result = _assess(base, table, edges, links, cfg, limits_cfg, top=top, strip=plan.prefix(position))
            bar.update(1)
        searched = time.perf_counter()
        updated = False
        if update and result["passed"] and plan.new:
            add(
                [source],
                against,
                workers=workers,
                batch_size=batch_size,
                work=work_dir,
                expect_generation=base.generation,
                executor=executor,
                progress=prog,
                disk_check=disk_check,
            )
            updated = True
    done = time.perf_counter()
    result.pop("passed")
    return CheckResult(
        source=source,
        against=str(against),
        baseline_samples=base.num_samples,
        baseline_generation=base.generation,
        samples=table.num_rows,
        new_shards=len(plan.new),
        known_shards=len(plan.known),
        updated=updated,
        seconds={
            "open_index": loaded - started,
            "featurize": featurized - loaded,
            "search": searched - featurized,
            "update": done - searched,
            "total": done - started,
        },
        **result,
    )


# --------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------


def resolve_position(plan: AddPlan, source: str) -> int:
    """The position ``source`` has (or would get) among the index's sources."""
    resolved = resolve_source(source)
    return next(i for i, s in enumerate(plan.sources) if s.resolved == resolved)


class _Shifted:
    """Region files whose rows sit ``offset`` rows into the embedded rows they are proposed
    among (the drop's, after the baseline's)."""

    def __init__(self, files: RegionFiles, offset: int) -> None:
        self.files, self.offset = files, offset

    def __len__(self) -> int:
        return len(self.files)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for first, block in self.files.blocks(block_rows):
            yield self.offset + first, block


def second_look_against(
    base: Index,
    new: Sequence[Shard],
    table: pa.Table,
    vectors: np.ndarray,
    cfg: RunConfig,
    drop_edges: Edges,
    links: CrossLinks,
    *,
    work: Path,
    executor: Executor | None = None,
    progress: ProgressFactory = silent,
) -> tuple[Edges, CrossLinks] | None:
    """The second look's links that touch the drop: within it, and from it to the baseline.

    The drop's rows are laid after the baseline's, as ``index add`` lays them, and the second
    look's own steps run over both: band pairs in ``[search.verify_from, search.threshold)``
    (each image's best, pairs already joined set aside: the baseline's clusters, the drop's
    direct links and its direct links to the baseline), partial copies proposed by the drop's
    region descriptors against every whole image (a drop image holding a baseline picture),
    then verified as per-shard tasks (:mod:`dedup.second_look`) that re-read the baseline's
    images named by a candidate from its sources. Only candidates with an end in the drop are
    checked. None when the preset has no second look, or the baseline is past
    ``search.partition_above`` (its vectors are not searched in memory).

    ``drop_edges`` and ``links``: the direct links within the drop and to the baseline, which
    the second look does not check again.

    Not (yet) as ``index add`` does it: baseline images holding a drop picture (that needs the
    baseline's region descriptors, which the index does not keep).
    """
    search = cfg.search
    band = 0 <= search.verify_from < search.threshold
    if not (band or search.partial) or base.embeddings is None or not vectors.shape[0]:
        return None
    b = base.samples
    n_base = b.num_rows
    base_vectors = base.embeddings.reconstruct_n(0, base.embeddings.ntotal)
    columns = ("sample_id", "shard", "status", "has_image", "embedded")
    base_shards = [e.shard for e in base.catalog.shards]
    union = pa.concat_tables([b.select(list(columns)), table.select(list(columns)).cast(b.select(list(columns)).schema)])
    rows_of = as_rows(union)
    n = rows_of.num_rows
    embedded_rows = np.flatnonzero(rows_of.flags("embedded"))
    use = (rows_of.flags("has_image") & rows_of.equals("status", "ok"))[embedded_rows]
    all_vectors = np.concatenate([np.asarray(base_vectors, np.float32), np.asarray(vectors, np.float32)])
    clusters = np.asarray(b.column("cluster_id").to_numpy(zero_copy_only=False), np.int64)
    base_ok = np.flatnonzero(clusters >= 0)
    joined = Edges.concat(
        [
            Edges.of(base_ok, clusters[base_ok], np.ones(base_ok.size, np.float32), Signal.EMBEDDING),
            Edges(drop_edges.i + n_base, drop_edges.j + n_base, drop_edges.score, drop_edges.signal),
            Edges.of(links.drop + n_base, links.base, links.score, Signal.EMBEDDING),
        ]
    )
    labels = components(n, joined)
    parts: list[Candidates] = []
    if band:
        with progress("second look: propose (drop)", int(use.sum()), "vec") as bar:
            found = band_candidates(all_vectors, embedded_rows, use, low=search.verify_from, high=search.threshold,
                                    block_size=search.block_size, labels=labels, per_image=search.verify_per_image,
                                    progress=bar.update)  # fmt: skip
        # with verify_per_image, band_candidates gives each image's best fresh pairs already
        parts.append(found if search.verify_per_image > 0 else fresh(found, labels))
    step = FeatureStep(config=cfg, out_dir=work / FEATURES)
    regions = RegionFiles.of([step.regions_path(s) for s in new]) if search.partial else None
    n_base_embedded = int(np.count_nonzero(embedded_rows < n_base))
    if regions is not None and len(regions) == embedded_rows.size - n_base_embedded:
        with progress("partial copies: propose (drop)", len(regions), "img") as bar:
            parts.append(
                partial_candidates(
                    all_vectors, _Shifted(regions, n_base_embedded), embedded_rows, use, propose=search.partial_propose,  # type: ignore[arg-type]
                    top_k=search.partial_top_k, margin=search.partial_margin, per_image=search.partial_per_image,
                    progress=bar.update,
                )  # fmt: skip
            )
    cands = fresh(Candidates.concat(parts), labels)
    cands = cands.take((cands.i >= n_base) | (cands.j >= n_base))
    if not len(cands):
        return Edges.empty(), CrossLinks.empty()
    boxes = np.full((n, 4), np.nan, np.float32)
    trims = load_trims([step.trims_path(s) for s in new])
    drop_embedded = embedded_rows[embedded_rows >= n_base]
    if trims is not None and trims.shape == (drop_embedded.size, 4):
        boxes[drop_embedded] = trims
    confirmed, _ = verify_candidates(
        rows_of, cands, labels, cfg, shards=[*base_shards, *new], boxes=boxes, root=work / "second_look_against",
        executor=executor, progress=progress,
    )  # fmt: skip
    inside = (confirmed.i >= n_base) & (confirmed.j >= n_base)
    within = Edges(confirmed.i[inside] - n_base, confirmed.j[inside] - n_base, confirmed.score[inside], confirmed.signal[inside])
    cross = ~inside
    lo, hi = confirmed.i[cross], confirmed.j[cross]  # lo < hi: lo is the baseline row
    across = CrossLinks(hi - n_base, lo, confirmed.score[cross], confirmed.signal[cross])
    return within, across


def _assess(
    base: Index,
    table: pa.Table,
    edges: Edges,
    links: CrossLinks,
    cfg: RunConfig,
    gate: GateConfig,
    *,
    top: int,
    strip: str = "",
) -> dict[str, Any]:
    """Every number of a :class:`CheckResult` but the bookkeeping ones, and the verdict.

    ``edges``: the links within the drop, ``links``: from it to the baseline (the signals
    table's direct ones and the second look's, :func:`second_look_against`). ``strip``: the
    index prefix of the drop's ids, left out of the ids shown."""
    m = table.num_rows
    ok = _bool(table, "status", "ok")
    n_ok = int(ok.sum())
    label = cfg.embed.model.value
    ids = [i.removeprefix(strip) for i in table.column("sample_id").to_pylist()]
    urls = table.column("url").to_pylist()

    # Inside the drop: what a run over the drop alone would make of it (keeping the first).
    # The baseline's review decisions (dedup review) hold for the drop's samples too.
    decided = load_decisions(base.directory.parent)
    applied = apply_decisions(m, table, edges, decided)
    labels, edges = applied.labels, applied.links
    keep_row = keepers(labels, policy=KeepPolicy.FIRST, eligible=ok)
    mini = build_manifest(table, labels, keep_row, edges, embedding_label=label)
    reason = mini.column("reason").to_pylist()
    dup_rows = [r for r in range(m) if reason[r] == "duplicate"]
    sims = mini.column("similarity").to_pylist()
    sigs = mini.column("signal").to_pylist()
    drop_matches = sorted(
        (
            Match(ids[r], urls[r], ids[int(keep_row[r])], urls[int(keep_row[r])], float(sims[r] or 0.0), sigs[r] or "")
            for r in dup_rows
        ),
        key=lambda mt: (_signal_rank(mt.signal, label), -mt.similarity, mt.sample_id),
    )

    # Against the baseline: each drop sample's strongest link (exact first, then the highest score).
    b = base.samples
    if decided.num_rows:
        links = _reviewed(links, *cross_constraints(table, b, decided))
    b_ids = b.column("sample_id")
    b_urls = b.column("url")
    best: list[tuple[int, int, float, int]] = []
    if len(links):
        order = np.lexsort((links.base, -links.score, links.signal, links.drop))
        d, bb, s, g = links.drop[order], links.base[order], links.score[order], links.signal[order]
        first = np.ones(d.shape[0], bool)
        first[1:] = d[1:] != d[:-1]
        best = sorted(
            zip(d[first].tolist(), bb[first].tolist(), s[first].tolist(), g[first].tolist(), strict=True),
            key=lambda t: (t[3], -t[2], t[0]),
        )
    by_signal: dict[str, int] = {}
    for _, _, _, code in best:
        name = _signal_label(code, label)
        by_signal[name] = by_signal.get(name, 0) + 1
    shown = best[: max(0, top)]
    b_rows = pa.array([t[1] for t in shown], pa.int64())
    shown_ids = b_ids.take(b_rows).to_pylist()
    shown_urls = b_urls.take(b_rows).to_pylist()
    baseline_matches = tuple(
        Match(ids[d_], urls[d_], shown_ids[k], shown_urls[k], float(s_), _signal_label(g_, label))
        for k, (d_, _, s_, g_) in enumerate(shown)
    )

    # The largest cluster holding a drop sample once the drop joins: drop rows are nodes 0..m-1,
    # each baseline cluster a drop row links to is one more node, weighing its size.
    b_cluster = np.asarray(b.column("cluster_id").to_numpy(zero_copy_only=False), np.int64)
    b_ok = _bool(b, "status", "ok")
    touched, node = np.unique(b_cluster[links.base], return_inverse=True) if len(links) else (np.empty(0, np.int64), np.empty(0, np.int64))
    all_clusters, all_sizes = np.unique(b_cluster[b_ok], return_counts=True)
    touched_sizes = all_sizes[np.searchsorted(all_clusters, touched)] if touched.size else np.empty(0, np.int64)
    graph = Edges.concat(
        [edges, Edges.of(links.drop, m + np.asarray(node, np.int64), links.score, Signal.EMBEDDING)]
    )
    merged = components(m + int(touched.size), graph)
    weight = np.concatenate([ok.astype(np.float64), touched_sizes.astype(np.float64)])
    size = np.bincount(merged, weights=weight, minlength=m + int(touched.size))
    drop_in = np.bincount(merged[:m], weights=ok.astype(np.float64), minlength=m + int(touched.size))
    largest = largest_drop = 0
    example: str | None = None
    if n_ok:
        ok_rows = np.flatnonzero(ok)
        r = int(ok_rows[np.argmax(size[merged[ok_rows]])])  # first row of the largest: deterministic
        largest, largest_drop, example = int(size[merged[r]]), int(drop_in[merged[r]]), ids[r]

    within = len(dup_rows)
    duplicating = len(best)
    limits = (
        LimitResult(
            "max_share_duplicating_baseline", "duplicates of the baseline",
            duplicating / n_ok if n_ok else 0.0, gate.max_share_duplicating_baseline, duplicating, True,
        ),
        LimitResult(
            "max_share_duplicated_within_drop", "duplicates within the drop",
            within / n_ok if n_ok else 0.0, gate.max_share_duplicated_within_drop, within, True,
        ),
        LimitResult(
            "max_cluster_size", "largest cluster", float(largest), float(gate.max_cluster_size), largest, False,
        ),
    )
    return {
        "ok": n_ok,
        "failed": m - n_ok,
        "duplicating_baseline": duplicating,
        "duplicated_within_drop": within,
        "largest_cluster": largest,
        "largest_cluster_drop_samples": largest_drop,
        "largest_cluster_example": example,
        "baseline_links_by_signal": by_signal,
        "limits": limits,
        "baseline_matches": baseline_matches,
        "drop_matches": tuple(drop_matches[: max(0, top)]),
        "passed": all(limit.passed for limit in limits),
    }


def _reviewed(links: CrossLinks, must: np.ndarray, cannot: np.ndarray) -> CrossLinks:
    """``links`` without the pairs a curator marked different, with those marked same."""
    if cannot.size:
        cut = set(map(tuple, cannot.tolist()))
        keep = np.array([(d, b) not in cut for d, b in zip(links.drop.tolist(), links.base.tolist(), strict=True)], bool)
        links = CrossLinks(links.drop[keep], links.base[keep], links.score[keep], links.signal[keep])
    if must.size:
        links = CrossLinks.concat([links, CrossLinks.of(must[:, 0], must[:, 1], np.ones(must.shape[0]), Signal.REVIEWED)])
    return links


def _bool(table: pa.Table, column: str, equals: str | None = None) -> np.ndarray:
    values = table.column(column).to_numpy(zero_copy_only=False)
    if equals is not None:
        return np.asarray(values == equals, bool)
    return np.asarray(values, bool)


def _signal_label(code: int, embedding_label: str) -> str:
    return embedding_label if code == Signal.EMBEDDING else Signal(code).label


def _signal_rank(name: str, embedding_label: str) -> int:
    for s in Signal:
        if _signal_label(int(s), embedding_label) == name:
            return int(s)
    return len(Signal)
