"""Run statistics (report.json) and their rendering for people (report.html)."""

from pathlib import Path

from dedup.report.html import write_report_html
from dedup.report.stats import build_report

__all__ = ["build_report", "rerender", "write_report_html"]


def rerender(out: str | Path) -> Path:
    """Render ``OUT/report.html`` again from ``OUT/report.json``."""
    import json

    from dedup.errors import OutputError

    folder = Path(out)
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{folder} has no report.json; run `dedup run ... --out {folder}` first") from None
    write_report_html(report, folder / "report.html")
    return folder / "report.html"
