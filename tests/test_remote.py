"""Remote sources for real: http(s):// over a loopback server, s3:// against moto's S3 server.

The data is the same small tree served three ways (local folder, HTTP, S3); a remote run must
give the local run's manifest. Faults (HTTP 500 and 404, a connection dropped mid-body, slow
reads) are each a failed row with a reason or a retry that succeeds, never a crash; a shard
that keeps failing stops the run with the reason, and a rerun resumes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from badinputs import encode, meta_row, picture, sample_members, tar_bytes, write_sidecar  # noqa: E402

from _configs import PLAIN  # noqa: E402
from _remote import Fault, FaultyHTTPServer, env_without_proxy, s3_server, upload_tree  # noqa: E402
from dedup import run  # noqa: E402
from dedup.cli import app  # noqa: E402
from dedup.errors import DedupError, MissingDependencyError, SourceError  # noqa: E402
from dedup.sources import _common  # noqa: E402
from dedup.sources import discover, read_shard  # noqa: E402

HASHES = PLAIN.with_overrides({"embed.model": "none", "folder_batch": 4})  # the reading is on trial
COLUMNS = ["sample_id", "key", "status", "error", "cluster_id", "cluster_size", "keep", "reason", "duplicate_of", "signal"]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "REMOTE_BACKOFF", 0.01)
    monkeypatch.setattr(_common, "REMOTE_TRIES", 3)


def _tree(root: Path) -> Path:
    """``data/``: two webdataset shards with sidecars (a failed download, exact copies across
    shards), an img2dataset parquet-less folder of loose images (one copy of a tar image)."""
    data = root / "data"
    (data / "shards").mkdir(parents=True)
    seeds = [[1, 2, 3, 4], [5, 1, 6, 7]]
    for shard, row in enumerate(seeds):
        members: list[tuple[Any, bytes]] = []
        listed = []
        for i, seed in enumerate(row):
            key = f"{shard:05d}{i:04d}"
            members += sample_members(key, encode(picture(seed, (64, 48)), "JPEG"), caption=f"picture {seed}")
            listed.append(meta_row(key, caption=f"picture {seed}"))
        listed.append(meta_row(f"{shard:05d}0099", status="failed_to_download", error="HTTP Error 404"))
        (data / "shards" / f"{shard:05d}.tar").write_bytes(tar_bytes(members))
        write_sidecar(data / "shards" / f"{shard:05d}.parquet", listed)
    (data / "images" / "sub").mkdir(parents=True)
    for seed in (8, 9, 10):
        (data / "images" / f"img_{seed}.jpg").write_bytes(encode(picture(seed, (64, 48)), "JPEG"))
    (data / "images" / "sub" / "copy_of_2.png").write_bytes(encode(picture(2, (64, 48)), "PNG"))
    return data


def _manifest(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "manifest.parquet").select(COLUMNS)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """The data and its manifest from a local run (what every remote run must give)."""
    root = tmp_path_factory.mktemp("remote")
    data = _tree(root)
    run([str(data)], root / "local", config=HASHES)
    local = _manifest(root / "local")
    assert local.height == 14 and local["status"].to_list().count("failed") == 2
    assert local.filter(pl.col("reason") == "duplicate").height == 2  # seed 1 twice, seed 2 twice
    return data, local


def test_http_source_reads_like_the_local_folder(tree: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    """A folder served over HTTP (index pages, as a static web server writes them): the same
    shards, ids and manifest as the folder itself; stamps come from Last-Modified and size."""
    data, local = tree
    with FaultyHTTPServer(data.parent) as server:
        shards = discover([server.url("data/")], folder_batch=4)
        assert [s.shard_id for s in shards] == [s.shard_id for s in discover([str(data)], folder_batch=4)]
        assert all(s.path.startswith(server.url()) for s in shards)
        assert all("GMT" in s.stamp for s in shards if s.shard_id.endswith(".tar"))
        run([server.url("data")], tmp_path / "out", config=HASHES)  # no trailing slash: redirected
    assert _manifest(tmp_path / "out").equals(local)


def test_http_single_files_as_sources(tree: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    """A tar URL (its sidecar beside it found and read) and an image URL, each a source."""
    data, _ = tree
    with FaultyHTTPServer(data.parent) as server:
        run([server.url("data/shards/00001.tar"), server.url("data/images/img_8.jpg")], tmp_path / "out", config=HASHES)
    m = _manifest(tmp_path / "out")
    assert m.height == 6 and m.filter(pl.col("status") == "failed")["error"].to_list() == ["download failed: HTTP Error 404"]


# A connection the faulty server dropped mid-body is left for the garbage collector by the HTTP
# client (aiohttp's Connection.__del__ then warns "unclosed"); when the collector runs is timing.
@pytest.mark.filterwarnings("ignore:Exception ignored in.*Connection.__del__:pytest.PytestUnraisableExceptionWarning")
def test_http_faults_are_failed_rows_or_retries(tree: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    """500 every time and 404: failed rows saying so; a 500 that passes, a connection dropped
    mid-body (image and tar), a slow body: retried or waited for, the rows as in a clean run."""
    data, local = tree
    with FaultyHTTPServer(data.parent) as server:
        server.faults.update(
            {
                "data/images/img_8.jpg": Fault("status", 500),
                "data/images/img_9.jpg": Fault("status", 404),
                "data/images/img_10.jpg": Fault("status", 503, times=2),
                "data/images/sub/copy_of_2.png": Fault("drop", times=1),
                "data/shards/00000.tar": Fault("drop", times=2),
                "data/shards/00001.tar": Fault("slow", delay=0.02, chunk=4096),
            }
        )
        run([server.url("data/")], tmp_path / "out", config=HASHES)
        gets = dict(server.gets)
    m = _manifest(tmp_path / "out")
    failed = dict(m.filter(pl.col("key").str.starts_with("images/")).select("key", "error").iter_rows())
    assert failed["images/img_8.jpg"] == "unreadable file: HTTP 500 Internal Server Error (after 3 tries)"
    assert failed["images/img_9.jpg"] == "unreadable file: not found"
    assert failed["images/img_10.jpg"] is None  # third try answered
    assert gets["data/images/img_8.jpg"] >= 3 and gets["data/images/img_10.jpg"] >= 3  # tried again
    assert gets["data/shards/00000.tar"] >= 3  # two drops, then the rest of the tar
    # everything else is exactly the clean run's
    untouched = ~pl.col("key").is_in(["images/img_8.jpg", "images/img_9.jpg"])
    assert m.filter(untouched).drop("cluster_id").equals(local.filter(untouched).drop("cluster_id"))


def test_a_slow_server_past_the_timeout_is_a_reason(tree: tuple[Path, pl.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = tree
    monkeypatch.setattr(_common, "REMOTE_TIMEOUT", 0.3)
    with FaultyHTTPServer(data.parent) as server:
        server.faults["data/images/img_8.jpg"] = Fault("slow", delay=1.0, chunk=256)
        run([server.url("data/images/")], tmp_path / "out", config=HASHES)
    m = _manifest(tmp_path / "out")
    error = m.filter(pl.col("key") == "img_8.jpg")["error"].item()
    assert error == "unreadable file: timed out (after 3 tries)", error
    assert m.filter(pl.col("status") == "ok").height == 3


def test_a_shard_that_keeps_failing_stops_the_run_and_a_rerun_resumes(tree: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    """A tar that answers 500 every time: the run ends with one line naming the shard and the
    reason (exit 2), finished shards kept; once the server recovers, the rerun reads only what
    is left and gives the clean run's manifest."""
    data, local = tree
    out = tmp_path / "out"
    with FaultyHTTPServer(data.parent) as server:
        url = server.url("data/")
        server.faults["data/shards/00001.tar"] = Fault("status", 500)
        result = runner.invoke(app, ["run", url, "--out", str(out), "--model", "none", "--workers", "1", "-q", "--config", str(_plain_toml(tmp_path))])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert line.startswith("Error: ") and "00001.tar" in line and "HTTP 500 Internal Server Error (after 3 tries)" in line, line
        assert len(line.splitlines()) == 1
        done_before = {p: p.stat().st_mtime_ns for p in out.glob(".work/*/done/*.done.json")}
        assert len(done_before) == 2  # the folder batch and 00000.tar
        del server.faults["data/shards/00001.tar"]
        result = runner.invoke(app, ["run", url, "--out", str(out), "--model", "none", "--workers", "1", "-q", "--config", str(_plain_toml(tmp_path))])
        assert result.exit_code == 0, result.output
        # the finished shards were not computed again
        assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
        assert len(list(out.glob(".work/*/done/*.done.json"))) == 3
    assert _manifest(out).equals(local)


def _plain_toml(tmp_path: Path) -> Path:
    """HASHES as a --config file (laid over the default preset)."""
    path = tmp_path / "plain.toml"
    path.write_text(
        "folder_batch = 4\n[fingerprint]\nphash = true\npdq_dihedral = false\npdq_side = 512\ntrim = false\n"
        '[embed]\nmodel = "none"\nregions = false\n[search]\nthreshold = 0.95\nverify_from = -1.0\npartial = false\n'
    )
    return path


def test_an_http_source_that_does_not_answer_is_one_clean_error(tmp_path: Path) -> None:
    with FaultyHTTPServer(tmp_path) as server:
        missing = server.url("nothing-here/")
    with pytest.raises(SourceError) as err:  # the server is gone: connection refused
        discover([missing])
    assert "cannot read source" in str(err.value) or "does not exist" in str(err.value)


@pytest.mark.slow
def test_http_run_killed_mid_run_resumes_to_the_same_bytes(tree: tuple[Path, pl.DataFrame], tmp_path: Path) -> None:
    """SIGKILL while the shards stream in slowly over HTTP, then rerun: the manifest is
    byte-identical to an uninterrupted run's."""
    data, _ = tree
    config = _plain_toml(tmp_path)
    with FaultyHTTPServer(data.parent) as server:
        url = server.url("data/")
        cmd = [sys.executable, "-m", "dedup.cli", "run", url, "--workers", "1", "-q", "--config", str(config)]
        env = env_without_proxy()
        clean = subprocess.run([*cmd, "--out", str(tmp_path / "clean")], env=env, capture_output=True, text=True, timeout=300)
        assert clean.returncode == 0, clean.stderr
        server.faults["data/shards/00001.tar"] = Fault("slow", delay=0.05, chunk=2048)
        out = tmp_path / "killed"
        proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(out.glob(".work/*/done/*.done.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.parquet").exists()
        del server.faults["data/shards/00001.tar"]
        rerun = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
    assert (out / "manifest.parquet").read_bytes() == (tmp_path / "clean" / "manifest.parquet").read_bytes()


def test_s3_source_reads_like_the_local_folder(tree: tuple[Path, pl.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tree in a bucket of moto's S3 server: the same manifest; a missing bucket or
    prefix is one clean error."""
    pytest.importorskip("s3fs", reason="the [s3] extra is not installed")
    pytest.importorskip("moto", reason="moto[server] (the dev extra) is not installed")
    data, local = tree
    with s3_server(monkeypatch) as endpoint:
        upload_tree(endpoint, "laion", data)
        import fsspec

        fsspec.config.conf.pop("s3", None)
        _clear_s3_cache()
        run(["s3://laion/"], tmp_path / "out", config=HASHES)
        assert _manifest(tmp_path / "out").equals(local)
        shards = discover(["s3://laion/shards/00000.tar"])
        assert len(shards) == 1 and shards[0].path == "s3://laion/shards/00000.tar"
        assert sum(1 for s in read_shard(shards[0]) if s.status == "ok") == 4
        with pytest.raises(SourceError, match="does not exist"):
            discover(["s3://laion/nope/"])
        with pytest.raises(DedupError):
            discover(["s3://no-such-bucket/"])
    _clear_s3_cache()


def _clear_s3_cache() -> None:
    """s3fs keeps filesystem instances (and their endpoint) per process: start afresh."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize(("url", "package", "extra"), [("s3://b/x", "s3fs", "s3"), ("gs://b/x", "gcsfs", "gcs"), ("http://127.0.0.1:9/x", "aiohttp", "http")])
def test_a_missing_filesystem_package_names_its_extra(url: str, package: str, extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = sys.modules["fsspec.registry"]._registry  # fsspec.registry is also a read-only view

    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    monkeypatch.delitem(registry, url.split(":", 1)[0], raising=False)
    monkeypatch.delitem(sys.modules, "fsspec.implementations.http", raising=False)  # imported aiohttp
    with pytest.raises(MissingDependencyError) as err:
        discover([url])
    assert f"pip install 'dedup[{extra}]'" in str(err.value)
    assert package in str(err.value)
