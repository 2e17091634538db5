"""``dedup query``: which training images did a model's generations copy?

The retrieval framework of Somepalli et al. (2022): embed every generated image with the same
copy-detection model as the training index, find its top-k training matches, and flag a
generation whose best match reaches the copy level (SSCD similarity >= 0.5 in the paper, where
1.88% of Stable Diffusion's generations were flagged). A match carries its duplicate count in
the training set (its cluster's size minus one), since copied images are the duplicated ones.

Reads the index a run leaves (``OUT/index``: ``meta.json`` for the model and input size,
``embeddings.faiss`` and ``samples.parquet`` for ids, URL, caption and cluster); writes
``matches.parquet`` (one row per generation and rank) and ``matches.html`` (side by side:
generated | match | caption | score | the match's duplicate count). The training thumbnails in
the page are read back from the run's sources; a source that is gone just shows no picture.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup._progress import ProgressFactory, silent
from dedup._io import atomic_path, atomic_write_text, make_out_dir
from dedup._types import Shard
from dedup.config import EmbedConfig, RunConfig
from dedup.errors import ConfigError, SampleError, SourceError

__all__ = ["MATCHES_SCHEMA", "QueryResult", "TrainingIndex", "find_images", "open_index", "query"]

MATCHES_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("rank", pa.int32()),
        ("sample_id", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("similarity", pa.float32()),
        ("flagged", pa.bool_()),
        ("match_duplicate_count", pa.int64()),
    ]
)
MATCHES_FILE = "matches.parquet"
PAGE_FILE = "matches.html"
HTML_LIMIT = 200  # generations shown in the page (the highest best similarity first)

@dataclass(frozen=True, slots=True)
class QueryResult:
    out: Path
    queries: int  # images given
    matched: int  # images read and embedded
    flagged: int  # of those, how many have a match at or above flag_at
    flag_at: float
    model: str
    failed: tuple[tuple[str, str], ...]  # (image, one-line reason) for images that could not be read
    matches: pa.Table  # MATCHES_SCHEMA

    @property
    def share_flagged(self) -> float:
        """Flagged generations over generations embedded (the paper's 1.88%)."""
        return self.flagged / self.matched if self.matched else 0.0


@dataclass(frozen=True, slots=True)
class TrainingIndex:
    """A run's index, opened for search (on top of :func:`dedup.store.read_index`)."""

    path: Path  # the index folder
    meta: dict[str, Any]
    config: RunConfig  # the run's resolved config: the embedder to rebuild
    shards: tuple[Shard, ...]  # the indexed shards, where the training images can be read back
    samples: pa.Table  # index/samples.parquet (the columns of _COLUMNS)
    row_of_vector: np.ndarray  # faiss row -> row of ``samples``
    duplicate_count: np.ndarray  # per row of ``samples``: its cluster's size - 1 (0 for failed rows)
    faiss_index: Any

    @property
    def model(self) -> str:
        return str(self.meta.get("model", self.config.embed.model.value))

    def embed_config(self) -> EmbedConfig:
        """The embedder the index was built with (same model, input size and model file)."""
        return self.config.embed


_COLUMNS = ("sample_id", "shard", "url", "caption", "status", "sha256", "has_image", "cluster_id", "emb_row")


def refuse_foreign_vectors(meta: dict[str, Any], where: Path) -> None:
    """Refuse an index whose vectors no model of ours made (``dedup run`` over precomputed
    embeddings, CLIP usually): images embedded with the index's configured model would be
    compared with them silently, and every score would be meaningless.

    Raises:
        ConfigError: the index holds precomputed embeddings.
    """
    from dedup.signals import PRECOMPUTED, refuse_mixed_vectors

    if int(meta.get("embedded") or 0):
        mine = str(meta.get("config", {}).get("embed", {}).get("model", ""))
        refuse_mixed_vectors(str(meta.get("model")), [mine if meta.get("model") != PRECOMPUTED else "the query model's"], where=f"the index in {where}", dim=meta.get("dim"))


def open_index(path: str | Path) -> TrainingIndex:
    """Open a run's index for search; ``path`` is the run's ``--out`` folder or its ``index/``.

    Raises:
        IndexUnreadableError: no index there, another format, or damaged files.
        SourceError: an index without embeddings (a run with ``--model none``).
    """
    from dedup.store import INDEX_DIR, META, index_lock, read_index
    from dedup.store import open_index as open_run_index

    given = Path(path)
    if (given / META).is_file() and not (given / INDEX_DIR / META).is_file():
        with index_lock(given, exclusive=False):
            index = read_index(given, columns=_COLUMNS, search=True)
    else:
        index = open_run_index(given, columns=_COLUMNS, search=True)
    refuse_foreign_vectors(index.meta, index.directory)
    if index.embeddings is None or not index.meta.get("embedded"):
        raise SourceError(
            f"the index in {index.directory} has no embeddings (the run used --model none?); "
            "hint: run again with --model sscd to query it"
        )
    samples = index.samples
    emb_row = np.asarray(samples.column("emb_row").to_numpy(), np.int64)
    row_of_vector = np.full(int(index.embeddings.ntotal), -1, np.int64)
    has = emb_row >= 0
    row_of_vector[emb_row[has]] = np.flatnonzero(has)
    ok = np.asarray(samples.column("status").to_numpy(zero_copy_only=False) == "ok")
    cluster = np.asarray(samples.column("cluster_id").to_numpy(), np.int64)
    _, inverse, counts = np.unique(np.where(ok, cluster, -1), return_inverse=True, return_counts=True)
    duplicate_count = np.where(ok, counts[inverse] - 1, 0).astype(np.int64)
    return TrainingIndex(
        path=index.directory,
        meta=index.meta,
        config=index.config,
        shards=tuple(e.shard for e in index.catalog.shards),
        samples=samples,
        row_of_vector=row_of_vector,
        duplicate_count=duplicate_count,
        faiss_index=index.embeddings,
    )


def find_images(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every image to query: files as given, folders searched recursively
    for image files (dot-files skipped), sorted by path; each file once.

    Raises:
        SourceError: a path does not exist, or no image was found.
    """
    from dedup.sources._common import has_image_extension, is_hidden

    if isinstance(paths, str | Path):
        paths = [paths]
    found: dict[Path, str] = {}
    for given in paths:
        p = Path(given)
        if p.is_file():
            found.setdefault(p.resolve(), str(given))
        elif p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                rel = f.relative_to(p).as_posix()
                if has_image_extension(f.name) and not is_hidden(rel):
                    found.setdefault(f.resolve(), f"{str(given).rstrip('/')}/{rel}")
        else:
            raise SourceError(f"query image {str(given)!r} does not exist; hint: pass image files or folders of them")
    if not found:
        raise SourceError(
            f"no images found in {', '.join(map(str, paths))}; hint: pass .jpg/.png/.webp files or folders of them"
        )
    return [(name, path) for path, name in found.items()]


def query(
    images: Sequence[str | Path],
    index: str | Path,
    *,
    out: str | Path = "query-out",
    top_k: int = 5,
    flag_at: float = 0.5,
    thumbnails: bool = True,
    thumb_size: int = 128,
    progress: ProgressFactory | None = None,
) -> QueryResult:
    """Find the top-``top_k`` training matches of each image in ``images`` and write
    ``OUT/matches.parquet`` and ``OUT/matches.html``.

    A generation is flagged when its best match has similarity >= ``flag_at``; every match row
    at or above it is flagged too. Images that cannot be read are listed in
    :attr:`QueryResult.failed` (and on the page), never dropped silently.

    Raises:
        SourceError, IndexUnreadableError: an image path or the index is missing or unreadable.
        OutputError: ``out`` cannot be written.
        ConfigError: ``top_k`` below 1.
        MissingDependencyError, ModelError: the index's model cannot be loaded.
    """
    from dedup.embed import build_embedder
    from dedup.fingerprint import decode, trim_borders
    from dedup.report.thumbs import make_thumbnail

    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    prog = progress or silent
    files = find_images(images)
    idx = open_index(index)
    out_dir = make_out_dir(Path(out))
    cfg = idx.embed_config()
    embedder = build_embedder(cfg)
    if embedder is None:
        raise SourceError(f"index {idx.path} was built without an embedding model; hint: run again with --model sscd")
    if int(getattr(embedder, "dim", 0) or 0) and int(embedder.dim) != int(idx.faiss_index.d):
        raise ConfigError(
            f"the index in {idx.path} holds {idx.faiss_index.d}-d embeddings, {cfg.model.value} gives "
            f"{embedder.dim}-d ones: they cannot be compared; hint: query an index built with {cfg.model.value}"
        )
    max_pixels = idx.config.fingerprint.max_pixels

    names: list[str] = []
    vectors: list[np.ndarray] = []
    gen_thumbs: dict[str, bytes] = {}
    failed: list[tuple[str, str]] = []
    batch: list[np.ndarray] = []
    batch_size = cfg.batch()
    with prog("query (embed)", len(files), "img") as bar:
        for name, path in files:
            try:
                image = decode(path.read_bytes(), max_pixels=max_pixels)
            except SampleError as err:
                failed.append((name, str(err)))
            except OSError as err:
                failed.append((name, f"cannot read file: {err.strerror or err}"))
            else:
                names.append(name)
                # the index's images were embedded without their uniform margins: so are these
                batch.append(embedder.preprocess(trim_borders(image) if idx.config.fingerprint.trim else image))
                if thumbnails:
                    thumb = make_thumbnail(image, thumb_size)
                    if thumb is not None:
                        gen_thumbs[name] = thumb
                if len(batch) >= batch_size:
                    vectors.append(embedder.embed(np.stack(batch)))
                    batch = []
            bar.update(1)
        if batch:
            vectors.append(embedder.embed(np.stack(batch)))

    k = min(top_k, int(idx.faiss_index.ntotal))
    if names:
        q = np.ascontiguousarray(np.concatenate(vectors), np.float32)
        scores, found = idx.faiss_index.search(q, k)
    else:
        scores, found = np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    matches = _matches_table(names, scores, found, idx, flag_at)
    flagged = int((scores[:, 0] >= flag_at).sum()) if names and k else 0

    with atomic_path(out_dir / MATCHES_FILE) as tmp:
        pq.write_table(matches, tmp, compression="zstd")
    result = QueryResult(
        out=out_dir,
        queries=len(files),
        matched=len(names),
        flagged=flagged,
        flag_at=flag_at,
        model=idx.model,
        failed=tuple(failed),
        matches=matches,
    )
    shown = _shown(names, scores)
    train_thumbs = _training_thumbnails(idx, matches, set(shown), thumb_size) if thumbnails else {}
    atomic_write_text(out_dir / PAGE_FILE, _page(result, shown, gen_thumbs, train_thumbs))
    return result


def _matches_table(names: list[str], scores: np.ndarray, found: np.ndarray, idx: TrainingIndex, flag_at: float) -> pa.Table:
    q_idx, rank = np.nonzero(found >= 0)  # row-major: query order, then rank
    vec = found[q_idx, rank]
    rows = idx.row_of_vector[vec]
    sim = scores[q_idx, rank].astype(np.float32)
    take = pa.array(rows, pa.int64())
    cols = [
        pa.array([names[i] for i in q_idx.tolist()], pa.string()),
        pa.array(rank + 1, pa.int32()),
        idx.samples.column("sample_id").take(take),
        idx.samples.column("url").take(take),
        idx.samples.column("caption").take(take),
        pa.array(sim, pa.float32()),
        pa.array(sim >= flag_at, pa.bool_()),
        pa.array(idx.duplicate_count[rows], pa.int64()),
    ]
    return pa.table([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols], schema=MATCHES_SCHEMA)


def _shown(names: list[str], scores: np.ndarray) -> list[str]:
    """The generations the page shows: the highest best similarity first, then input order."""
    best = scores[:, 0] if scores.shape[1] else np.zeros(len(names))
    order = sorted(range(len(names)), key=lambda i: (-float(best[i]), i))
    return [names[i] for i in order[:HTML_LIMIT]]


def _training_thumbnails(idx: TrainingIndex, matches: pa.Table, shown: set[str], size: int) -> dict[str, bytes]:
    """Thumbnails of the matches on the page, read back from the indexed shards (or, for an
    index that lists none, the sources in the manifest beside it); empty when they are gone."""
    import pyarrow.compute as pc

    from dedup.report.thumbs import make_thumbnail
    from dedup.sources.readback import fetch_images, rediscover

    wanted_ids = {
        sid for q, sid in zip(matches.column("query").to_pylist(), matches.column("sample_id").to_pylist(), strict=True)
        if q in shown
    }
    if not wanted_ids:
        return {}
    shards: Sequence[Shard] = idx.shards
    if not shards:
        try:
            sources = pq.read_table(idx.path.parent / "manifest.parquet", columns=["source"]).column("source")
        except (OSError, pa.ArrowException):
            return {}
        shards = rediscover(pc.unique(sources).to_pylist())
    rows = idx.samples.filter(pc.is_in(idx.samples.column("sample_id"), pa.array(sorted(wanted_ids), pa.string())))
    rows = rows.filter(pc.field("has_image"))
    ids = rows.column("sample_id").to_pylist()
    wanted = dict(zip(ids, rows.column("shard").to_pylist(), strict=True))
    sha = dict(zip(ids, rows.column("sha256").to_pylist(), strict=True))
    images = fetch_images(shards, wanted, sha256=sha)
    thumbs = {sid: make_thumbnail(data, size) for sid, data in images.items()}
    return {sid: t for sid, t in thumbs.items() if t is not None}


# --------------------------------------------------------------------------------------------
# The side-by-side page
# --------------------------------------------------------------------------------------------

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2937;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:26px;margin:0 0 4px}
.sub,.note{color:#6b7280}.note{font-size:13px}
.big{font-size:20px;margin:14px 0}.big b{color:#d9782d}
table{border-collapse:collapse;width:100%;margin-top:14px}
th,td{padding:6px 10px 6px 0;text-align:left;vertical-align:middle;border-bottom:1px solid #e5e7eb}
th{font-size:12px;color:#6b7280;text-transform:uppercase;letter-spacing:.03em}
tr.first td{border-top:2px solid #9ca3af}
td.img{width:100px}td.img img{max-width:84px;max-height:84px;display:block}
td.gen{width:150px;vertical-align:top;padding-top:10px}td.gen img{max-width:136px;max-height:136px;display:block}
tr.hit td:not(.gen){background:#fff5f3}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.flag{color:#b42318;font-weight:700}
.none{color:#9ca3af;font-size:12px}
.cap{max-width:420px;overflow-wrap:anywhere}
.url,.sid{display:block;color:#6b7280;font-size:11.5px;max-width:420px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.gen div{font-size:12px;overflow-wrap:anywhere;margin-top:4px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(jpeg: bytes | None, alt: str, missing: str) -> str:
    from dedup.report.thumbs import data_uri

    return f'<img src="{data_uri(jpeg)}" alt="{_e(alt)}">' if jpeg else f'<span class="none">{missing}</span>'


def _page(result: QueryResult, shown: list[str], gen: dict[str, bytes], train: dict[str, bytes]) -> str:
    from dedup.report.html import link_html

    by_query: dict[str, list[dict[str, Any]]] = {}
    for row in result.matches.to_pylist():
        by_query.setdefault(row["query"], []).append(row)
    body: list[str] = []
    for name in shown:
        rows = by_query.get(name, [])
        for i, m in enumerate(rows):
            first = i == 0
            gen_cell = (
                f'<td class="gen" rowspan="{len(rows)}">{_img(gen.get(name), name, "no preview")}'
                f'<div class="gen">{_e(name)}</div></td>'
                if first
                else ""
            )
            score = f"{m['similarity']:.3f}"
            score = f'<span class="flag" title="at or above {result.flag_at:g}">{score} &#9873;</span>' if m["flagged"] else score
            body.append(
                f'<tr class="{" ".join(c for c, on in (("first", first), ("hit", m["flagged"])) if on)}">{gen_cell}'
                f'<td class="img">{_img(train.get(m["sample_id"]), m["caption"] or m["sample_id"], "source not available")}</td>'
                f'<td><div class="cap">{_e(m["caption"]) or "<i>no caption</i>"}</div>{link_html(m["url"])}'
                f'<code class="sid">#{m["rank"]} &middot; {_e(m["sample_id"])}</code></td>'
                f'<td class="n">{score}</td><td class="n">{m["match_duplicate_count"]:,}</td></tr>'
            )
    hidden = result.matched - len(shown)
    more = f'<p class="note">{hidden:,} more generations in {MATCHES_FILE}.</p>' if hidden > 0 else ""
    fails = ""
    if result.failed:
        items = "".join(f"<li><code>{_e(n)}</code>: {_e(err)}</li>" for n, err in result.failed)
        fails = f"<h2>Images that could not be read ({len(result.failed)})</h2><ul>{items}</ul>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="referrer" content="no-referrer">
<title>dedup query</title><style>{_CSS}</style></head><body><main>
<h1>dedup query</h1>
<p class="sub">{result.matched:,} generations against the training index &middot; model <code>{_e(result.model)}</code>
&middot; top {result.matches.column("rank").to_numpy().max() if result.matches.num_rows else 0} matches each</p>
<p class="big"><b>{result.flagged:,}</b> of {result.matched:,} generations flagged
(<b>{result.share_flagged:.2%}</b>): a training match with similarity &ge; {result.flag_at:g}.</p>
<p class="note">Somepalli et al. (2022) flagged 1.88% of Stable Diffusion's generations at SSCD &ge; 0.5.
The duplicate count is how many other copies of the match the training set holds: copied images
tend to be the duplicated ones. Generations with the closest match come first.</p>
<table><thead><tr><th>generated</th><th>training match</th><th>caption &middot; URL</th><th class="n">similarity</th>
<th class="n">duplicate count</th></tr></thead><tbody>{"".join(body)}</tbody></table>
{more}{fails}
</main></body></html>
"""
