"""Exceptions raised by dedup.

Run errors are exceptions (one base class, specific subclasses, messages that end in a hint);
per-sample problems are never exceptions that escape a stage: they become manifest rows with
``status == "failed"`` and a one-line ``error``.
"""

from __future__ import annotations


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
