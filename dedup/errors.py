"""Exceptions raised by dedup.

Run errors are exceptions (one base class, specific subclasses, messages that end in a hint);
per-sample problems are never exceptions that escape a stage: they become manifest rows with
``status == "failed"`` and a one-line ``error``.
"""

from __future__ import annotations

import re


class DedupError(Exception):
    """Base class of every error dedup raises on purpose. The CLI turns it into one message."""

    exit_code: int = 2


class SourceError(DedupError):
    """An input path cannot be found, read or understood."""


class ConfigError(DedupError):
    """A preset, config file or option value is invalid."""


class MissingDependencyError(DedupError):
    """An optional dependency a step needs is not installed (the message holds the pip hint)."""


class ModelError(DedupError):
    """A model file cannot be found or loaded."""


class OutputError(DedupError):
    """The output folder cannot be written, or holds results of a different run."""


class SampleError(Exception):
    """A single sample cannot be used (undecodable image, missing bytes, ...).

    Raised inside stages and caught there: it becomes ``status="failed"`` with ``str(err)``
    as the manifest's ``error``. Never escapes a stage.
    """


def missing_dependency(package: str, extra: str, purpose: str) -> MissingDependencyError:
    """The error to raise when ``package`` (from ``dedup[extra]``) is missing."""
    return MissingDependencyError(
        f"{purpose} needs the '{package}' package, which is not installed; "
        f"install it with: pip install 'dedup[{extra}]'"
    )


# ANSI/VT escape sequences (CSI "ESC [ ... final", OSC "ESC ] ... BEL|ESC \\", and two-byte
# escapes), then any control character left; bidirectional overrides reorder what a terminal
# shows ("Trojan Source"), so they go too.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class IndexUnreadableError(DedupError):
    """The folder holds no index, an index of another format, or a damaged one."""


class IndexConflictError(DedupError):
    """An add cannot go ahead: a shard changed since it was indexed, or the index moved on."""


class IndexBusyError(DedupError):
    """Another process holds the index lock (only raised by non-blocking attempts)."""


def printable(text: str) -> str:
    """``text`` made safe to print on a terminal, on one line.

    Error messages echo paths, URLs and names that came from the data (a tar member, a file
    name, img2dataset's ``error_message``): an escape sequence in one must not recolour,
    retitle or rewrite the user's terminal. Escape sequences are dropped, other control
    characters (newlines included) are shown as ``\\xNN`` escapes, and text that cannot be
    encoded (lone surrogates from undecodable file names) is backslash-escaped.
    """
    text = _ESCAPE_SEQUENCE.sub("", text)
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_kind(message: str | None) -> str:
    """The class of a sample's error message, for per-reason counts (text before the first colon)."""
    if not message:
        return "unknown"
    return message.split(":", 1)[0].strip()[:60] or "unknown"
