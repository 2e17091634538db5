"""Small pieces the bench scripts share (``bench/`` is on ``sys.path`` when one of them runs)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

__all__ = ["dedup_command"]


def dedup_command() -> list[str]:
    """The ``dedup`` console script beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "dedup"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("dedup")
    if found is None:
        raise SystemExit("no `dedup` command found; run `pip install -e .` in this repository first")
    return [found]
