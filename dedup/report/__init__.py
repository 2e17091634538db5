"""Run statistics (report.json) and their rendering for people (report.html).

``build_report`` aggregates the manifest and the links; ``write_report_pages`` writes
report.html with thumbnails of the largest clusters (read back from the sources) and keeps those
thumbnails in ``thumbnails.parquet``, so ``rerender`` (``dedup report OUT``) needs no source.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from dedup._types import Shard
from dedup.manifest import Manifest
from dedup.report.html import write_report_html
from dedup.report.stats import build_report
from dedup.rows import FeatureRows, as_rows
from dedup.report.thumbs import THUMBS_FILE, cluster_thumbnails, read_thumbnails, write_thumbnails
from dedup.sources.readback import rediscover

__all__ = ["build_report", "rerender", "write_report_html", "write_report_pages"]

REPORT_HTML = "report.html"


def write_report_pages(
    report: dict[str, Any],
    out_dir: Path,
    *,
    manifest: Manifest,
    shards: Sequence[Shard] | None = None,
    features: pa.Table | FeatureRows | None = None,
    thumb_size: int = 96,
) -> Path:
    """Write ``OUT/thumbnails.parquet`` and ``OUT/report.html``; return the page's path.

    ``shards`` are the run's shards (rediscovered from the manifest's ``source`` column when
    None); ``features`` (with ``sample_id``, ``sha256`` and ``has_image``) lets a changed source
    be noticed, so no thumbnail is shown under another image's caption.
    """
    import pyarrow.compute as pc

    wanted = {s["sample_id"] for c in report.get("largest_clusters") or [] for s in c["samples"]}
    sha256: dict[str, bytes | None] | None = None
    if features is not None and wanted and {"sample_id", "sha256", "has_image"} <= set(features.column_names):
        rows = as_rows(features)
        ids_wanted = pa.array(sorted(wanted), pa.string())
        # A streaming filter: one row group of three columns in memory at a time.
        found = [
            t.filter(pc.is_in(t.column("sample_id"), ids_wanted))
            for t in rows.batches(["sample_id", "sha256", "has_image"])
        ]
        hit = pa.concat_tables(found)
        ids = hit.column("sample_id").to_pylist()
        sha256 = dict(zip(ids, hit.column("sha256").to_pylist(), strict=True))
        # Metadata-only samples (LAION parquet without images) have no picture to read back.
        wanted = {i for i, has in zip(ids, hit.column("has_image").to_pylist(), strict=True) if has}
    thumbs: dict[str, bytes] = {}
    if wanted:
        if shards is None:
            sources = pc.unique(manifest.rows.column("source")).to_pylist()
            shards = rediscover(sources)
        thumbs = cluster_thumbnails(report, shards, size=thumb_size, sha256=sha256, only=wanted)
    write_thumbnails(out_dir / THUMBS_FILE, thumbs)
    write_report_html(report, out_dir / REPORT_HTML, thumbnails=thumbs)
    return out_dir / REPORT_HTML


def rerender(out: str | Path) -> Path:
    """Render ``OUT/report.html`` again from ``OUT/report.json`` (and ``OUT/thumbnails.parquet``),
    with report.json's ``review`` section brought up to date with ``OUT/decisions.parquet``."""
    import json

    from dedup.errors import OutputError

    folder = Path(out)
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{folder} has no report.json; run `dedup run ... --out {folder}` first") from None
    except (OSError, ValueError) as err:
        raise OutputError(f"cannot read {folder / 'report.json'}: {err}; hint: run `dedup run` again into it") from None
    from dedup._io import atomic_write_text
    from dedup.decisions import review_section

    # Decisions made since the run (dedup review): their counts and the precision they measured.
    section = review_section(folder)
    if section is not None and section != report.get("review"):
        report["review"] = section
        atomic_write_text(folder / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    write_report_html(report, folder / REPORT_HTML, thumbnails=read_thumbnails(folder / THUMBS_FILE))
    return folder / REPORT_HTML
