"""``dedup review OUT``: a local page that walks a curator through the links worth a look.

Decisions land in ``OUT/decisions.parquet`` at once (:mod:`dedup.decisions`); the next
``dedup run`` / ``index add`` into OUT honours them. With ``--sample N`` a stratified sample of
the accepted links is reviewed first, and report.json / report.html show the precision per
signal and similarity band it measured (:func:`refresh_report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dedup._io import atomic_write_text
from dedup.decisions import review_section
from dedup.review.queue import Item, RunView, build_queue
from dedup.review.sample import draw_sample
from dedup.review.server import ReviewServer

__all__ = ["Item", "ReviewServer", "RunView", "build_queue", "draw_sample", "refresh_report"]


def refresh_report(out: str | Path) -> dict[str, Any] | None:
    """Put the decisions so far (and the sample's precision) into ``OUT/report.json`` and
    render report.html again; the new ``review`` section, or None when nothing was reviewed."""
    from dedup.report import rerender

    folder = Path(out)
    path = folder / "report.json"
    section = review_section(folder)
    if section is None or not path.is_file():
        return section
    report = json.loads(path.read_text(encoding="utf-8"))
    report["review"] = section
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    rerender(folder)
    return section
