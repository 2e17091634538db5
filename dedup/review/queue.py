"""Which pairs a curator should look at, read from a finished run's output folder.

A run keeps no links, but its manifest names, for every dropped sample, the sample its cluster
keeps and the strongest link that put it there (``duplicate_of``, ``signal``, ``similarity``):
the accepted links. The queue walks, in this order:

1. the drawn sample (``OUT/review-sample.parquet``, ``dedup review --sample N``), which
   measures precision and so comes first;
2. the weakest accepted links of each signal (where a threshold errs, it errs there);
3. verified and partial links (below the threshold, confirmed by a second look);
4. the largest clusters (each member beside the kept one);
5. the clusters whose members disagree most: the two members of a cluster farthest apart in
   embedding space (the two ends of a chain, when links chained unrelated images).

A pair appears once (its first reason) and pairs already decided in ``OUT/decisions.parquet``
are left out, so closing the page and opening it again resumes where the curator stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup.decisions import DECISIONS_FILE, SAMPLE_FILE, SAMPLE_SCHEMA, pair_key, read_decisions
from dedup.errors import OutputError
from dedup.store import index_dir, open_index, vector_files
from dedup.errors import DedupError

WEAKEST_PER_SIGNAL = 12
SECOND_LOOK_LINKS = 40
LARGEST_CLUSTERS = 5
MEMBERS_PER_CLUSTER = 8
DISAGREEING_CLUSTERS = 12
MAX_DISAGREE_MEMBERS = 400  # pairwise cosines of a bigger cluster: its first members only


@dataclass(frozen=True, slots=True)
class Side:
    row: int
    sample_id: str
    shard: str | None
    source: str | None
    caption: str | None
    url: str | None
    width: int | None
    height: int | None
    sha256: bytes | None

    def public(self) -> dict[str, Any]:
        return {"id": self.sample_id, "caption": self.caption, "url": self.url, "width": self.width, "height": self.height}


@dataclass(frozen=True, slots=True)
class Item:
    a: Side
    b: Side
    signal: str | None
    similarity: float | None
    why: str
    cluster_id: int | None
    cluster_size: int | None

    @property
    def key(self) -> tuple[str, str]:
        return pair_key(self.a.sample_id, self.b.sample_id)


@dataclass
class RunView:
    """What the queue needs of a run: its manifest, and per row the SHA-256 and embedding row."""

    out: Path
    manifest: pa.Table
    sha256: list[bytes | None]
    emb_row: np.ndarray  # -1: not embedded
    vectors: Any  # the index's vectors (dedup.partition.VectorFiles: rows gathered on demand), or None

    @classmethod
    def open(cls, out: Path) -> RunView:
        path = out / "manifest.parquet"
        try:
            manifest = pq.read_table(path)
        except FileNotFoundError:
            raise OutputError(f"{out} has no manifest.parquet; hint: run `dedup run SOURCE --out {out}` (or `dedup demo`) first") from None
        except (OSError, pa.ArrowException) as err:
            raise OutputError(f"cannot read {path}: {err}; hint: run `dedup run` into {out} again") from None
        n = manifest.num_rows
        sha: list[bytes | None] = [None] * n
        emb_row = np.full(n, -1, np.int64)
        vectors = None
        try:
            index = open_index(out, columns=["sha256", "emb_row"])
            if index.samples.num_rows == n:
                sha = index.samples.column("sha256").to_pylist()
                emb_row = np.asarray(index.samples.column("emb_row").to_numpy(zero_copy_only=False), np.int64)
                files = vector_files(index_dir(out), index.meta)  # read a few rows at a time
                if len(files):
                    vectors = files
        except DedupError:
            pass  # no index (or another generation): ids alone key the decisions, no disagreement
        return cls(out, manifest, sha, emb_row, vectors)

    def side(self, row: int) -> Side:
        m = self.manifest
        get = lambda name: m.column(name)[row].as_py()  # noqa: E731
        return Side(row, get("sample_id"), get("shard"), get("source"), get("caption"), get("url"), get("width"), get("height"), self.sha256[row])

    def links(self) -> pa.Table:
        """The accepted links: per dropped sample, ``row``, ``keeper`` (its duplicate_of row),
        ``signal``, ``similarity``, ``cluster_id``, ``cluster_size``."""
        m = self.manifest
        ids = m.column("sample_id")
        has = pc.and_(pc.is_valid(m.column("duplicate_of")), pc.equal(m.column("keep"), False))
        rows = np.flatnonzero(np.asarray(has.fill_null(False)))
        keeper = pc.index_in(m.column("duplicate_of").take(pa.array(rows, pa.int64())), value_set=ids.combine_chunks())
        keep_rows = np.asarray(keeper.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
        fine = keep_rows >= 0
        rows, keep_rows = rows[fine], keep_rows[fine]
        take = pa.array(rows, pa.int64())
        return pa.table(
            {
                "row": rows,
                "keeper": keep_rows,
                "signal": m.column("signal").take(take),
                "similarity": m.column("similarity").take(take),
                "cluster_id": m.column("cluster_id").take(take),
                "cluster_size": m.column("cluster_size").take(take),
            }
        )

    def item(self, a: int, b: int, signal: str | None, similarity: float | None, why: str) -> Item:
        m = self.manifest
        cid = m.column("cluster_id")[a].as_py()
        size = m.column("cluster_size")[a].as_py()
        sim = None if similarity is None or similarity != similarity else round(float(similarity), 4)
        return Item(self.side(a), self.side(b), signal, sim, why, cid, size)


def build_queue(out: Path, view: RunView | None = None) -> list[Item]:
    """Every pair worth a look, in the order above, decided pairs left out."""
    view = view or RunView.open(out)
    decided = read_decisions(out / DECISIONS_FILE)
    done = {pair_key(a, b) for a, b in zip(decided.column("a_id").to_pylist(), decided.column("b_id").to_pylist(), strict=True)}
    items: list[Item] = []
    seen = set(done)

    def add(item: Item) -> None:
        if item.key not in seen and item.a.sample_id != item.b.sample_id:
            seen.add(item.key)
            items.append(item)

    links = view.links()
    rows = links.column("row").to_numpy()
    keepers = links.column("keeper").to_numpy()
    signals = links.column("signal").to_pylist()
    sims = np.asarray(links.column("similarity").fill_null(np.nan).to_numpy(zero_copy_only=False), np.float64)
    # 1. The sample.
    ids = view.manifest.column("sample_id").combine_chunks()
    sample_path = out / SAMPLE_FILE
    if sample_path.exists():
        sample = pq.read_table(sample_path).cast(SAMPLE_SCHEMA)
        a_rows = pc.index_in(sample.column("a_id"), value_set=ids).to_pylist()
        b_rows = pc.index_in(sample.column("b_id"), value_set=ids).to_pylist()
        for s, a, b in zip(sample.to_pylist(), a_rows, b_rows, strict=True):
            if a is not None and b is not None:
                add(view.item(a, b, s["signal"], s["similarity"], f"sample: {s['signal']} {s['band']}"))
    # 2. The weakest accepted links of each signal.
    for signal in sorted({s for s in signals if s}):
        mine = np.flatnonzero(np.array([s == signal for s in signals]))
        order = mine[np.lexsort((rows[mine], sims[mine]))]
        for k in order[:WEAKEST_PER_SIGNAL]:
            add(view.item(int(keepers[k]), int(rows[k]), signal, sims[k], f"weakest {signal} links"))
    # 3. Links a second look confirmed.
    for signal, why in (("partial", "partial copy (a region of one holds the other)"), ("verified", "verified by a second look")):
        mine = np.flatnonzero(np.array([s == signal for s in signals], bool))
        for k in mine[np.lexsort((rows[mine], sims[mine]))][:SECOND_LOOK_LINKS]:
            add(view.item(int(keepers[k]), int(rows[k]), signal, sims[k], why))
    # 4. The largest clusters.
    cluster = links.column("cluster_id").to_numpy()
    size = links.column("cluster_size").to_numpy()
    by_size = sorted({(int(-s), int(c)) for s, c in zip(size, cluster, strict=True)})[:LARGEST_CLUSTERS]
    for neg, c in by_size:
        mine = np.flatnonzero(cluster == c)
        for k in mine[np.lexsort((rows[mine], sims[mine]))][:MEMBERS_PER_CLUSTER]:
            add(view.item(int(keepers[k]), int(rows[k]), signals[k], sims[k], f"largest clusters ({-neg} members)"))
    # 5. Members that disagree most.
    for a, b, cos, n in _disagreeing(view, cluster, rows, keepers)[:DISAGREEING_CLUSTERS]:
        add(view.item(a, b, "cluster", cos, f"members disagree most ({n} members, farthest pair)"))
    return items


def _disagreeing(view: RunView, cluster: np.ndarray, rows: np.ndarray, keepers: np.ndarray) -> list[tuple[int, int, float, int]]:
    """Per cluster of three or more embedded members: its farthest pair and their cosine,
    least similar first."""
    if view.vectors is None:
        return []
    members: dict[int, set[int]] = {}
    for c, r, k in zip(cluster.tolist(), rows.tolist(), keepers.tolist(), strict=True):
        group = members.setdefault(c, set())
        group.add(r)
        group.add(k)
    found = []
    for c, group in members.items():
        rs = np.array(sorted(r for r in group if view.emb_row[r] >= 0), np.int64)[:MAX_DISAGREE_MEMBERS]
        if rs.shape[0] < 3:
            continue
        v = np.asarray(view.vectors[view.emb_row[rs]], np.float32)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        cos = v @ v.T
        i, j = np.unravel_index(int(np.argmin(cos)), cos.shape)
        a, b = sorted((int(rs[i]), int(rs[j])))
        found.append((a, b, float(cos[i, j]), len(group)))
    found.sort(key=lambda t: (t[2], t[0], t[1]))
    return found
