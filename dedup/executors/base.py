"""What every executor does: run a step over shards, skip finished ones, merge their stats.

A step is any picklable callable ``step(shard, progress=None) -> dict`` (summable stats) that
writes its own outputs atomically and, when given ``progress``, calls it with the number of
samples it has just finished (executors that run steps elsewhere report whole shards instead). The executor owns everything else: which shards still need work (a
completion marker per shard, written last, holding the shard's stamp and stats), retries, and
reporting progress. Steps never import an engine, so the local and Ray executors run the very
same step objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from dedup._io import atomic_write_text
from dedup._types import Shard

Step = Callable[..., dict[str, Any]]
"""``step(shard, progress=None) -> stats``; ``progress(n)``, when given, is told of samples done."""
OnDone = Callable[[Shard, dict[str, Any]], object]
OnProgress = Callable[[int], object]


def shard_file_name(shard: Shard) -> str:
    """A file-name-safe, reversible form of a shard id."""
    return quote(shard.shard_id, safe="")


class Markers:
    """Completion markers: ``<dir>/<shard>.done.json`` with the shard's stamp and stats.

    ``outputs(shard)``, when given, names the files a finished shard has left (its checkpoint):
    a marker whose files are gone (deleted by hand, a cleaned disk) does not count, and the
    shard runs again instead of the next stage failing on a missing file.
    """

    def __init__(self, directory: Path, outputs: Callable[[Shard], Sequence[Path]] | None = None) -> None:
        self.directory = directory
        self.outputs = outputs

    def path(self, shard: Shard) -> Path:
        return self.directory / f"{shard_file_name(shard)}.done.json"

    def read(self, shard: Shard) -> dict[str, Any] | None:
        """The stats of a finished shard, or None if it must (re)run."""
        try:
            marker = json.loads(self.path(shard).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if marker.get("stamp") != shard.stamp or marker.get("shard_id") != shard.shard_id:
            return None
        if self.outputs is not None and not all(Path(p).is_file() for p in self.outputs(shard)):
            return None
        stats: dict[str, Any] = marker["stats"]
        return stats

    def write(self, shard: Shard, stats: dict[str, Any]) -> None:
        body = {"shard_id": shard.shard_id, "stamp": shard.stamp, "stats": stats}
        atomic_write_text(self.path(shard), json.dumps(body, sort_keys=True) + "\n")


class Executor(Protocol):
    """Runs ``step`` on every shard that has no valid marker; returns stats per shard id."""

    def run(
        self,
        step: Step,
        shards: Sequence[Shard],
        *,
        markers: Markers,
        on_done: OnDone | None = None,
        on_progress: OnProgress | None = None,
    ) -> dict[str, dict[str, Any]]: ...


@contextmanager
def held(executor: object | None) -> Iterator[None]:
    """Keep ``executor``'s engine up across the stages run inside the block, where it has such a
    notion (``RayExecutor.held``: one Ray for a whole run); the local executor has none."""
    hold = getattr(executor, "held", None)
    with hold() if hold is not None else nullcontext():
        yield


def split_finished(
    shards: Sequence[Shard], markers: Markers, on_done: OnDone | None
) -> tuple[dict[str, dict[str, Any]], list[Shard]]:
    """Stats of the shards a valid marker says are done (reported to ``on_done``), and the rest."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[Shard] = []
    for shard in shards:
        stats = markers.read(shard)
        if stats is None:
            todo.append(shard)
        else:
            results[shard.shard_id] = stats
            if on_done is not None:
                on_done(shard, stats)
    return results, todo


def merge_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-shard stats: numbers add up, nested dicts merge key by key."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                total[key] = merge_stats([total.get(key, {}), value])
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    return total
