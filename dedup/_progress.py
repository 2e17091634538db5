"""How the library reports progress without printing: the caller passes a factory of bars."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> object: ...
    def set_postfix_str(self, s: str) -> object: ...


ProgressFactory = Callable[[str, int | None, str], AbstractContextManager[ProgressBar]]
"""``progress(stage, total, unit)`` → a context manager whose value has ``update(n)``."""


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def silent(stage: str, total: int | None, unit: str) -> AbstractContextManager[ProgressBar]:
    """The factory used when the caller wants no progress reports."""
    return nullcontext(_Silent())
