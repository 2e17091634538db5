"""The local executor: what its worker processes start with, and its thread pool."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dedup._types import Shard, ShardKind
from dedup.executors.base import Markers
from dedup.executors.local import LocalExecutor, ShardFailedError


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


def _flaky_step_factory() -> Any:
    calls: dict[str, int] = {}

    def step(shard: Shard, progress: Any = None) -> dict[str, Any]:
        calls[shard.shard_id] = calls.get(shard.shard_id, 0) + 1
        if shard.shard_id == "part-1" and calls[shard.shard_id] == 1:
            raise RuntimeError("transient")
        if progress is not None:
            progress(3)
        return {"samples": 3, "pid": os.getpid(), "calls": calls[shard.shard_id]}

    return step, calls


def test_threads_run_every_shard_in_this_process_with_progress_and_retries(tmp_path: Path) -> None:
    step, calls = _flaky_step_factory()
    seen: list[int] = []
    done: list[str] = []
    results = LocalExecutor(workers=2, threads=True).run(
        step, _shards(4), markers=Markers(tmp_path / "done"), on_progress=seen.append, on_done=lambda s, _: done.append(s.shard_id)
    )
    assert sorted(results) == [f"part-{k}" for k in range(4)]
    assert {stats["pid"] for stats in results.values()} == {os.getpid()}
    assert calls["part-1"] == 2 and results["part-1"]["calls"] == 2  # retried once, then done
    assert sum(seen) == 12 and set(seen) == {3}  # reported by the steps, not again per shard
    assert sorted(done) == sorted(results)
    assert all(Markers(tmp_path / "done").read(s) is not None for s in _shards(4))


def test_threads_give_up_after_the_retries(tmp_path: Path) -> None:
    def broken(shard: Shard, progress: Any = None) -> dict[str, Any]:
        if shard.shard_id == "part-2":
            raise RuntimeError("always")
        return {"samples": 1}

    with pytest.raises(ShardFailedError, match="part-2.*RuntimeError: always"):
        LocalExecutor(workers=2, threads=True).run(broken, _shards(4), markers=Markers(tmp_path / "done"))
    assert Markers(tmp_path / "done").read(_shards(4)[2]) is None
