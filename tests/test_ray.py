"""The Ray executor runs the very steps the local one runs: the same bytes come out.

One local Ray for the whole session (``num_cpus=2``, as on CI); skipped when ray is not
installed (``pip install 'dedup[ray]'``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _configs import PLAIN
from _data import PlantedDataset

from typer.testing import CliRunner

from dedup import run
from dedup._types import Shard, ShardKind
from dedup.cli import app

from dedup.executors.base import Markers
from dedup.executors.local import ShardFailedError
from dedup.executors.ray import RayExecutor
from dedup.featurize import FeatureStep

# Ray's driver-side machinery (grpc, its own deprecations) warns on its own account.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

FAST = PLAIN.with_overrides({"embed.model": "sscd_distilled", "embed.size": 224, "folder_batch": 4})


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Any]:
    with warnings.catch_warnings():  # ray's own imports warn about their dependencies
        warnings.simplefilter("ignore")
        ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'dedup[ray]'")
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_and_local_executors_write_the_same_bytes(
    sample_images_dir: PlantedDataset, tmp_path: Path, local_ray: Any
) -> None:
    root, _ = sample_images_dir
    run([str(root)], tmp_path / "local", config=FAST)
    result = run([str(root)], tmp_path / "ray", config=FAST, executor=RayExecutor())
    assert result.samples > 0
    for name in ("manifest.parquet", "keep.parquet", "report.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    # A rerun finds every shard's marker: nothing is sent to Ray, the same bytes come out.
    run([str(root)], tmp_path / "ray", config=FAST, executor=RayExecutor())
    assert (tmp_path / "ray" / "manifest.parquet").read_bytes() == (tmp_path / "local" / "manifest.parquet").read_bytes()


def test_ray_shard_error_stops_the_run_with_the_shard_named(tmp_path: Path, local_ray: Any) -> None:
    missing = Shard(str(tmp_path), str(tmp_path / "gone" / "img_emb_0.npy"), ShardKind.EMBEDDINGS, "img_emb_0")
    step = FeatureStep(config=FAST, out_dir=tmp_path / "features")
    (tmp_path / "features").mkdir()
    with pytest.raises(ShardFailedError, match="img_emb_0"):
        RayExecutor(workers=1).run(step, [missing], markers=Markers(tmp_path / "done"))
    assert not (tmp_path / "done").exists() or not list((tmp_path / "done").iterdir())


def test_ray_address_needs_the_ray_executor(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", str(tmp_path), "--out", str(tmp_path / "o"), "--ray-address", "auto"])
    assert res.exit_code == 2 and "--ray-address needs --executor ray" in res.output


def test_ray_runs_the_second_look_tasks_with_the_same_bytes(tmp_path: Path, local_ray: Any) -> None:
    """The second look's per-shard read and check tasks run on Ray as they run locally: copies
    and mock-ups confirmed across shards, byte-identical manifests."""
    from test_regions import _second_look_folder

    from dedup.config import load_config

    src = tmp_path / "images"
    _second_look_folder(src)
    cfg = load_config("default").with_overrides({"workers": 1, "folder_batch": 4})
    local = run([str(src)], tmp_path / "local", config=cfg)
    ray_run = run([str(src)], tmp_path / "ray", config=cfg, executor=RayExecutor())
    assert local.report["shards"]["second_look"]["confirmed"] >= 6
    assert ray_run.report["shards"]["second_look"] == local.report["shards"]["second_look"]
    for name in ("manifest.parquet", "keep.parquet", "report.json"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_a_ray_started_on_the_spot_is_its_own_with_workers_at_the_drivers_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    # "local", not None: None joins any cluster a `ray start` left on the machine. Ray's
    # workers otherwise run 15 steps nicer than the driver, and on a shared machine wait.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address, options = RayExecutor().init_arguments()
    assert address == "local"
    assert options["_system_config"] == {"worker_niceness": 0}
    assert options["include_dashboard"] is False
    _, options = RayExecutor(init_options={"_system_config": {"worker_niceness": 5, "x": 1}}).init_arguments()
    assert options["_system_config"] == {"worker_niceness": 5, "x": 1}  # the caller's word last
    # A cluster is joined as it is (Ray refuses _system_config when joining).
    address, options = RayExecutor(address="auto").init_arguments()
    assert address == "auto" and "_system_config" not in options
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    address, options = RayExecutor().init_arguments()
    assert address is None and "_system_config" not in options


class _FakeRay:
    """ray's start/stop calls, counted (no cluster): what the executor's lifetime rules see."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[str] = []

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **_: Any) -> None:
        self.up = True
        self.calls.append("init")

    def shutdown(self) -> None:
        self.up = False
        self.calls.append("shutdown")


def test_one_ray_for_every_stage_of_a_held_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's stages (featurize, pixel hashes, the second look's read and check) share the Ray
    the executor starts inside ``held`` (started at the first stage with work, shut down at the
    end), instead of one start and shutdown per stage; a Ray already running is left alone."""
    import dedup.executors.ray as ray_executor
    from dedup.executors.base import held

    fake = _FakeRay()
    monkeypatch.setattr(ray_executor, "_ray", lambda: fake)
    monkeypatch.setattr(RayExecutor, "_run", lambda self, ray, step, todo, markers, results, *a: results.update({s.shard_id: {} for s in todo}))
    shards = [Shard(str(tmp_path), str(tmp_path / f"{i}.tar"), ShardKind.WEBDATASET, f"{i}.tar", "s") for i in range(3)]

    def stage(executor: RayExecutor, name: str, todo: list[Shard]) -> None:
        executor.run(lambda shard, progress=None: {}, todo, markers=Markers(tmp_path / name))

    alone = RayExecutor()
    stage(alone, "a", shards)
    stage(alone, "b", shards)
    assert fake.calls == ["init", "shutdown", "init", "shutdown"]

    fake.calls.clear()
    kept = RayExecutor()
    with held(kept):
        stage(kept, "c", [])  # nothing to do: no Ray started for it
        assert fake.calls == []
        for name in ("d", "e", "f"):
            stage(kept, name, shards)
        assert fake.calls == ["init"] and fake.up
    assert fake.calls == ["init", "shutdown"] and not fake.up

    fake.calls.clear()
    fake.up = True  # the user's own Ray (ray.init before the run): used, never shut down
    with held(kept):
        stage(kept, "g", shards)
    assert fake.calls == [] and fake.up
    with held(None):  # the local executor has nothing to hold
        pass
