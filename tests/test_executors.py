"""The local executor's worker processes: what they start with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dedup._types import Shard, ShardKind
from dedup.executors.base import Markers
from dedup.executors.local import LocalExecutor


def blas_threads_step(shard: Shard, progress: Any = None) -> dict[str, Any]:
    """A step that reports the BLAS thread count its process was started with."""
    return {"samples": 0, "blas": int(os.environ.get("OPENBLAS_NUM_THREADS", "-1")), "pid": os.getpid()}


def _shards(n: int) -> list[Shard]:
    return [Shard(source="s", path=f"/nowhere/{k}", kind=ShardKind.FOLDER, shard_id=f"part-{k}") for k in range(n)]


def test_workers_get_their_share_of_the_cores_for_blas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two workers on this machine: each is started with cores // 2 BLAS threads (at least one),
    # and the parent's environment is left as it was.
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    results = LocalExecutor(workers=2).run(blas_threads_step, _shards(4), markers=Markers(tmp_path / "done"))
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert {stats["blas"] for stats in results.values()} == {expected}
    assert all(stats["pid"] != os.getpid() for stats in results.values())
    assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_a_users_blas_setting_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    results = LocalExecutor(workers=2).run(blas_threads_step, _shards(2), markers=Markers(tmp_path / "done"))
    assert {stats["blas"] for stats in results.values()} == {3}
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
