"""report.html: a self-contained page (no scripts, no CDN) of the run's statistics.

Every value that came from the data is escaped: captions and URLs are untrusted web text.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from dedup._io import atomic_write_text


def _table(rows: list[tuple[Any, Any]], head: tuple[str, str]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(str(a))}</td><td>{html.escape(str(b))}</td></tr>" for a, b in rows
    )
    return f"<table><tr><th>{html.escape(head[0])}</th><th>{html.escape(head[1])}</th></tr>{body}</table>"


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    d = report["duplicate_count"]["all_samples"]
    summary = [
        ("samples", s["samples"]),
        ("failed", s["failed"]),
        ("clusters of two or more", s["duplicate_clusters"]),
        ("samples in those clusters", s["samples_in_duplicate_clusters"]),
        ("kept", s["kept"]),
        ("removable", f"{s['dropped']} ({s['share_removable']:.2%})"),
        ("largest cluster", s["largest_cluster"]),
        ("mean duplicate count", d["mean"]),
        ("p99 duplicate count", d["p99"]),
    ]
    hist = [(size, count) for size, count in report["cluster_size_histogram"]]
    links = sorted(report["links_per_signal"].items())
    levels = [(f"similarity ≥ {t}", f"{v['pairs']} pairs, {v['samples']} samples")
              for t, v in report["embedding_pairs_at"].items()]
    failures = sorted(report["failures"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dedup report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}}</style></head><body>
<h1>dedup report</h1>
<h2>Summary</h2>{_table(summary, ("", ""))}
<h2>Cluster sizes</h2>{_table(hist, ("cluster size", "clusters"))}
<h2>Links per signal</h2>{_table(links, ("signal", "links"))}
<h2>Embedding pairs at the paper's thresholds</h2>{_table(levels, ("level", "count"))}
<h2>Failures</h2>{_table(failures, ("reason", "samples"))}
</body></html>
"""


def write_report_html(report: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, render(report))
