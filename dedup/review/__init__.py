"""``dedup review OUT``: a local page that walks a curator through the links worth a look.

Decisions land in ``OUT/decisions.parquet`` at once (:mod:`dedup.decisions`); the next
``dedup run`` / ``index add`` into OUT honours them. With ``--sample N`` a stratified sample of
the accepted links is reviewed first, and report.json / report.html show the precision per
signal and similarity band it measured (:func:`refresh_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dedup.decisions import review_section
from dedup.review.queue import Item, RunView, build_queue
from dedup.review.sample import draw_sample
from dedup.review.server import ReviewServer

__all__ = ["Item", "ReviewServer", "RunView", "build_queue", "draw_sample", "refresh_report"]


def refresh_report(out: str | Path) -> dict[str, Any] | None:
    """Put the decisions so far (and the sample's precision) into ``OUT/report.json`` and
    render report.html again; the ``review`` section, or None when nothing was reviewed."""
    from dedup.report import rerender

    folder = Path(out)
    section = review_section(folder)
    if section is not None and (folder / "report.json").is_file():
        rerender(folder)
    return section
