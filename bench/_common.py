"""Small pieces the bench scripts share (``bench/`` is on ``sys.path`` when one of them runs)."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["dedup_command", "echo_phases"]

# DEDUP_PHASES=1: the run prints "[phase] NAME: S s, peak RSS G GiB ..." per global phase; a
# NAME may hold one ": " of its own ("second look: verify").
_PHASE = re.compile(r"^\[phase\] (?P<name>[^:]+(?:: [^:]+)?): (?P<s>[0-9.]+) s, peak RSS (?P<gib>[0-9.]+) GiB")


def dedup_command() -> list[str]:
    """The ``dedup`` console script beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "dedup"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("dedup")
    if found is None:
        raise SystemExit("no `dedup` command found; run `pip install -e .` in this repository first")
    return [found]


def echo_phases(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Echo a run's stderr ``lines`` to this stderr and return its phase lines parsed:
    ``{"phase", "seconds", "peak_rss_gib"}`` each, in order."""
    phases: list[dict[str, Any]] = []
    for line in lines:
        sys.stderr.write(line)
        found = _PHASE.match(line)
        if found:
            phases.append({"phase": found["name"], "seconds": float(found["s"]), "peak_rss_gib": float(found["gib"])})
    return phases
