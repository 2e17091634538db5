"""A full disk anywhere is a clean stop: one ``Error: ... the disk is full ...`` line, exit 2,
what was finished kept, and the rerun (room made) gives the same bytes as an uninterrupted run.

Tested systematically, at the level of the C library: ``tests/faults/enospc.c`` (built here with
the system's C compiler, loaded with LD_PRELOAD) fails the k-th ``write`` under a folder with
ENOSPC, and every later one (a full disk stays full), whoever writes: Python's io, numpy,
pyarrow's C++, faiss, worker processes. An uninterrupted run first lists every write under
OUT; then, for each file written (spills, checkpoints, markers, index, manifest, report), its
first write fails (``DEDUP_FAULT_EVERY=first-last``: its first and its last; ``every``: every
k, an hour on a loaded 2-core machine). Plus one real small
file system, where this process may mount a tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_embeddings_source import vectors_with_groups, write_clip_retrieval  # noqa: E402

from dedup import run  # noqa: E402
from dedup.config import RunConfig  # noqa: E402
from dedup.sources import discover  # noqa: E402

HERE = Path(__file__).parent / "faults"
PYTHON = sys.executable
# Precomputed embeddings through the partitioned search (spills, passes, edge parts).
PARTITIONED = "[search]\npartition_above = 500\npartitions = 48\nthreshold = 0.95\n"
IMAGES = RunConfig().with_overrides({"embed.model": "sscd_distilled", "embed.size": 224, "folder_batch": 4})


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build the ENOSPC shim (tests/faults/enospc.c)")
    out = tmp_path_factory.mktemp("shim") / "enospc.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "enospc.c"), "-ldl"], check=True)
    return out


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        a = (rng.random((40, 52, 3)) * 255).astype(np.uint8) if i % 3 else np.full((40, 52, 3), 40 * i, np.uint8)
        Image.fromarray(a).save(folder / f"img{i}.png")
    (folder / "copy.png").write_bytes((folder / "img1.png").read_bytes())
    return folder


def _data(root: Path) -> dict[str, Path]:
    x = vectors_with_groups(3000, dim=32)
    root.mkdir(parents=True)
    toml = root / "partitioned.toml"
    toml.write_text(PARTITIONED)
    return {
        "emb": write_clip_retrieval(root / "emb", [x[:1200], x[1200:2100]]),
        "emb_new": write_clip_retrieval(root / "emb_new", [x[2100:]]),
        "img": _images(root / "img"),
        "toml": toml,
    }


def _outputs(out: Path, *names: str) -> list[str]:
    return [str(out / n) for n in names]


RUN_OUTPUTS = ("manifest.parquet", "keep.parquet", "report.json", "report.html", "index/@data/samples.parquet", "index/@data/shards.parquet")


def _sweep(shim: Path, tmp: Path, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"counter": str(tmp / "counter"), "cases": cases}))
    result = tmp / "result.json"
    env = {**os.environ, "LD_PRELOAD": str(shim)}
    proc = subprocess.run([PYTHON, str(HERE / "sweep.py"), str(spec), str(result)], env=env, capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(result.read_text())


def _check(results: list[dict[str, Any]]) -> None:
    problems = []
    for entry in results:
        assert entry["clean_code"] == 0, entry["clean_text"]
        assert entry["writes"] > 0 and entry["attempts"], entry["name"]
        for a in entry["attempts"]:
            lines = a["text"].strip().splitlines()
            ok = (
                a["code"] == 2
                and len(lines) == 1
                and lines[0].startswith("Error: ")
                and "the disk is full" in lines[0]
                and a["rerun_code"] == 0
                and not a["differs"]
            )
            if not ok:
                problems.append((entry["name"], a["k"], a["code"], a["text"][-1500:], a["rerun_code"], a["rerun_text"][-600:], a["differs"]))
    assert not problems, "\n\n".join(map(repr, problems[:6])) + f"\n\n{len(problems)} problems"


@pytest.mark.slow
def test_a_full_disk_at_any_write_is_one_line_and_the_rerun_gives_the_same_bytes(shim: Path, tmp_path: Path) -> None:
    d = _data(tmp_path / "data")
    every = os.environ.get("DEDUP_FAULT_EVERY") or None
    # prepared states for the commands that write into an existing output folder
    base_emb = tmp_path / "base_emb"
    run([str(d["emb"])], base_emb, config=RunConfig().with_overrides({"search.partition_above": 500, "search.partitions": 48, "search.threshold": 0.95}))
    base_img = tmp_path / "base_img"
    run([str(d["img"])], base_img, config=IMAGES)
    o = {name: tmp_path / name for name in ("run_emb", "run_img", "add", "check", "report", "query")}
    cases = [
        {"name": "run (precomputed embeddings, partitioned search)", "root": str(o["run_emb"]), "clear": [str(o["run_emb"])],
         "argv": ["run", str(d["emb"]), "--out", str(o["run_emb"]), "--config", str(d["toml"]), "--quiet"],
         "outputs": _outputs(o["run_emb"], *RUN_OUTPUTS)},
        {"name": "run (images)", "root": str(o["run_img"]), "clear": [str(o["run_img"])],
         "argv": ["run", str(d["img"]), "--out", str(o["run_img"]), "--model", "sscd_distilled", "--quiet"],
         "outputs": _outputs(o["run_img"], *RUN_OUTPUTS)},
        {"name": "index add", "root": str(o["add"]), "setup": [[str(base_emb), str(o["add"])]],
         "argv": ["index", "add", str(d["emb_new"]), "--index", str(o["add"]), "--quiet"],
         "outputs": _outputs(o["add"], *RUN_OUTPUTS)},
        {"name": "check --update", "root": str(o["check"]), "setup": [[str(base_emb), str(o["check"])]],
         "argv": ["check", str(d["emb_new"]), "--against", str(o["check"]), "--update", "--quiet", "--max-baseline-share", "1", "--max-internal-share", "1", "--max-cluster-size", "-1"],
         "outputs": _outputs(o["check"], *RUN_OUTPUTS)},
        {"name": "report", "root": str(o["report"]), "setup": [[str(base_img), str(o["report"])]],
         "argv": ["report", str(o["report"])], "outputs": _outputs(o["report"], "report.html")},
        {"name": "query", "root": str(o["query"]), "clear": [str(o["query"])],
         "argv": ["query", str(d["img"]), "--index", str(base_img), "--out", str(o["query"]), "--quiet"],
         "outputs": _outputs(o["query"], "matches.parquet", "matches.html")},
    ]  # fmt: skip
    only = os.environ.get("DEDUP_FAULT_CASES")  # e.g. "index add,query": a few of the commands
    if only:
        cases = [c for c in cases if any(c["name"].startswith(o.strip()) for o in only.split(","))]
    for case in cases:
        case["ks"] = every
    _check(_sweep(shim, tmp_path, cases))


EMB_CFG = RunConfig().with_overrides({"search.partition_above": 500, "search.partitions": 48, "search.threshold": 0.95})


def test_work_moves_every_scratch_file_off_out(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dedup.cli import app

    d = _data(tmp_path / "data")
    out, work = tmp_path / "out", tmp_path / "work"
    result = CliRunner().invoke(app, ["run", str(d["emb"]), "--out", str(out), "--work", str(work), "--config", str(d["toml"]), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (out / ".work").exists()
    assert list(work.glob("*/shards/*.npy")) and list(work.glob("*/done/*.done.json"))
    assert not (work / "search").exists()  # the search's spill, deleted once merged
    clean = tmp_path / "clean"
    run([str(d["emb"])], clean, config=EMB_CFG)
    assert (out / "manifest.parquet").read_bytes() == (clean / "manifest.parquet").read_bytes()


def test_a_run_the_free_space_cannot_hold_stops_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import dedup.pipeline
    from dedup.cli import app

    d = _data(tmp_path / "data")
    need = dedup.pipeline.estimate_disk(discover([str(d["emb"])]), EMB_CFG, tmp_path / "w", tmp_path / "o")
    vectors = 2100 * 32 * 2  # float16 rows: the checkpoints hold them once, the scratch once
    assert need.samples == 2100 and need.checkpoints >= vectors and need.scratch >= vectors
    real = shutil.disk_usage

    def small(path: Any) -> Any:
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    monkeypatch.setattr(dedup.pipeline.shutil, "disk_usage", small)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(d["emb"]), "--out", str(out), "--config", str(d["toml"]), "--quiet"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: not enough free disk: this run of 2,100 samples needs about"), line
    assert "--work DIR" in line and "checkpoints" in line and "0.00 GB are free" in line
    assert not list(out.rglob("*.npy"))  # refused before any work
    result = CliRunner().invoke(app, ["run", str(d["emb"]), "--out", str(out), "--no-disk-check", "--config", str(d["toml"]), "--quiet"])
    assert result.exit_code == 0, result.output
    # index add and check --update estimate too: the new shards, then the search and outputs over all rows
    manifest = (out / "manifest.parquet").read_bytes()
    limits = ["--max-baseline-share", "1", "--max-internal-share", "1", "--max-cluster-size", "-1"]
    for argv, what in ((["index", "add", str(d["emb_new"]), "--index", str(out)], "this add"),
                       (["check", str(d["emb_new"]), "--against", str(out), "--update", *limits], "this check --update")):  # fmt: skip
        result = CliRunner().invoke(app, [*argv, "--quiet"])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and line.startswith(f"Error: not enough free disk: {what} of "), line
        total = int(line.split(" of ", 1)[1].split(" samples", 1)[0].replace(",", ""))
        assert total > 2100  # the index's rows and the new ones
        assert (out / "manifest.parquet").read_bytes() == manifest
    result = CliRunner().invoke(app, ["index", "add", str(d["emb_new"]), "--index", str(out), "--no-disk-check", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.parquet").read_bytes() != manifest


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A tmpfs of a given size, mounted under tmp_path (root only): ``mount(size)``, remountable."""
    point = tmp_path / "fs"
    point.mkdir()
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        opts = f"size={size}" if not mounted else f"remount,size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(point)
        return point

    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    yield mount
    if mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.mark.slow
def test_a_real_small_file_system_stops_cleanly_and_the_rerun_finishes(tmp_path: Path, small_fs: Any) -> None:
    d = _data(tmp_path / "data")
    clean = tmp_path / "clean"
    run([str(d["emb"])], clean, config=EMB_CFG)
    fs = small_fs(400_000)  # the checkpoints (~0.3 MB) fit, the search's scratch does not
    out = fs / "out"
    argv = [sys.executable, "-m", "dedup.cli", "run", str(d["emb"]), "--out", str(out), "--config", str(d["toml"]), "--quiet"]
    refused = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("Error: not enough free disk"), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    full = subprocess.run([*argv, "--no-disk-check"], capture_output=True, text=True, check=False)
    assert full.returncode == 2, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot write ") and "the disk is full" in lines[0], full.stderr
    small_fs(20_000_000)  # room made
    again = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    for name in ("manifest.parquet", "keep.parquet", "report.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
