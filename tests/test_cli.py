"""The dedup command: exit codes, exact error text, help that teaches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from _data import PlantedDataset
from typer.testing import CliRunner

from dedup.cli import app

runner = CliRunner()
COMMANDS = ["run", "apply", "demo", "download", "report", "query", "check", "index", "review"]
FAST = ["--model", "sscd_distilled", "--quiet"]


def test_no_args_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "dedup demo" in result.output
    for cmd in COMMANDS:
        assert cmd in result.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd: str) -> None:
    result = runner.invoke(app, [cmd, "--help"])
    assert result.exit_code == 0
    assert len(result.output.strip().splitlines()) > 3


def test_readme_documents_every_command() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for cmd in COMMANDS:
        assert re.search(rf"dedup {cmd}\b", readme), cmd


def test_run_writes_outputs_and_summary(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, truth = sample_images_dir
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(root), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert re.search(rf"^{len(truth)} samples \(1 failed\)", result.output, re.M)
    assert (out / "manifest.parquet").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["embed"]["model"] == "sscd_distilled"


def test_run_options_override_preset(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    out = tmp_path / "out"
    args = ["run", str(root), "--out", str(out), *FAST, "--preset", "aggressive", "--threshold", "0.9",
            "--keep", "largest", "--pdq-distance", "-1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["search"]["threshold"] == 0.9  # flag beats preset
    assert cfg["search"]["partial"] is True and cfg["fingerprint"]["trim"] is True  # preset beats default
    assert cfg["search"]["pdq_distance"] == -1
    assert cfg["keep"]["policy"] == "largest"
    assert "pdq" not in json.loads((out / "report.json").read_text())["links_per_signal"]


def test_the_second_look_runs_above_partition_above(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    """Above search.partition_above embeddings the second look still runs (partitioned
    proposals, per-shard tasks; tests/test_regions.py checks its links): nothing to warn of,
    and the same clusters as below it."""
    root, _ = sample_images_dir
    small = tmp_path / "small.toml"
    small.write_text("[search]\npartition_above = 4\n")  # over the default preset
    result = runner.invoke(app, ["run", str(root), "--out", str(tmp_path / "out"), "--config", str(small), "-q"])
    assert result.exit_code == 0, result.output
    assert "second look" not in result.output
    normal = runner.invoke(app, ["run", str(root), "--out", str(tmp_path / "out2"), "-q"])
    assert normal.exit_code == 0, normal.output
    clusters = [json.loads((tmp_path / out / "report.json").read_text())["summary"]["duplicate_clusters"] for out in ("out", "out2")]
    assert clusters[0] == clusters[1] > 0


def test_config_file_changes_only_its_keys_over_the_preset(tmp_path: Path) -> None:
    """--config FILE lays the keys it names over --preset: strict with another threshold stays
    strict (full SSCD, no second look), and config.json records what ran."""
    from _data import make_laion_parquet

    make_laion_parquet(tmp_path / "m.parquet", [{"URL": "http://x/1", "TEXT": "a", "WIDTH": 1, "HEIGHT": 1}])
    mine = tmp_path / "mine.toml"
    mine.write_text("[search]\nthreshold = 0.8\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(tmp_path / "m.parquet"), "--out", str(out), "--preset", "strict", "--config", str(mine), "-q"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["search"]["threshold"] == 0.8
    assert cfg["embed"]["model"] == "sscd" and cfg["search"]["verify_from"] == -1.0 and cfg["search"]["pdq_distance"] == 16
    assert cfg["fingerprint"]["trim"] is False


def test_keep_column_implies_column_policy(tmp_path: Path) -> None:
    from _data import make_laion_parquet

    make_laion_parquet(tmp_path / "m.parquet", [
        {"URL": "http://x/1", "TEXT": "a", "WIDTH": 1, "HEIGHT": 1, "AESTHETIC_SCORE": 1.0},
        {"URL": "http://x/1", "TEXT": "b", "WIDTH": 1, "HEIGHT": 1, "AESTHETIC_SCORE": 9.0},
    ])
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(tmp_path / "m.parquet"), "--out", str(out), "--keep-column", "AESTHETIC_SCORE", "-q"])
    assert result.exit_code == 0, result.output
    m = pl.read_parquet(out / "manifest.parquet")
    assert m["keep"].to_list() == [False, True]


def test_missing_source_exit_2_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "nope" in lines[0]
    assert "Traceback" not in result.output


def test_unknown_preset(tmp_path: Path, sample_images_dir: PlantedDataset) -> None:
    root, _ = sample_images_dir
    result = runner.invoke(app, ["run", str(root), "--out", str(tmp_path / "o"), "--preset", "nope"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: unknown preset 'nope'; choose one of: default, strict, aggressive, ci"


def test_bad_config_file(tmp_path: Path, sample_images_dir: PlantedDataset) -> None:
    root, _ = sample_images_dir
    bad = tmp_path / "bad.toml"
    bad.write_text("[search]\nthreshhold = 0.9\n")
    result = runner.invoke(app, ["run", str(root), "--out", str(tmp_path / "o"), "--config", str(bad)])
    assert result.exit_code == 2
    assert result.output.startswith("Error: unknown setting 'search.threshhold'; known: ")


def test_bad_model_choice_is_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "x", "--out", str(tmp_path), "--model", "resnet"])
    assert result.exit_code == 2
    assert "resnet" in result.output


def test_torch_model_without_torch_gives_pip_hint(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch is installed")
    root, _ = sample_images_dir
    result = runner.invoke(app, ["run", str(root), "--out", str(tmp_path / "o"), "--model", "clip", "-q"])
    assert result.exit_code == 2
    assert "pip install 'dedup[torch]'" in result.output


def test_report_rerenders(sample_images_dir: PlantedDataset, tmp_path: Path) -> None:
    root, _ = sample_images_dir
    out = tmp_path / "out"
    assert runner.invoke(app, ["run", str(root), "--out", str(out), *FAST]).exit_code == 0
    (out / "report.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0
    assert "<h1>dedup report</h1>" in (out / "report.html").read_text()


def test_report_of_empty_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no report.json" in result.output


def test_demo_runs_on_bundled_sample(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert result.exit_code == 0, result.output
    m = pl.read_parquet(tmp_path / "demo" / "manifest.parquet")
    assert (m["status"] == "failed").sum() >= 1  # the sample ships a corrupt image and 404s
    assert (m["reason"] == "duplicate").sum() >= 1
