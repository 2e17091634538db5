"""Decontamination (`dedup run TRAIN --against EVAL_OUT`): training samples that copy an image of
an evaluation set are dropped, with their own reason, and nothing else is."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from _data import natural_image
from PIL import Image
from typer.testing import CliRunner

from dedup import run
from dedup.cli import app
from dedup.config import load_config
from dedup.errors import ConfigError

SIZE = (220, 160)
FAST = load_config("default").with_overrides({"folder_batch": 6})  # the default preset, as a curator runs it
runner = CliRunner()


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contamination")
    evals, train = root / "eval", root / "train"
    evals.mkdir()
    train.mkdir()
    for seed in range(300, 306):
        natural_image(seed, SIZE).save(evals / f"e{seed}.jpg", quality=92)
    for seed in range(400, 412):  # training images of its own, one with a copy inside the set
        natural_image(seed, SIZE).save(train / f"t{seed}.jpg", quality=92)
    shutil.copy(train / "t400.jpg", train / "t400-again.jpg")
    e = {seed: Image.open(evals / f"e{seed}.jpg").convert("RGB") for seed in range(300, 306)}
    w, h = SIZE
    shutil.copy(evals / "e300.jpg", train / "c-bytes.jpg")
    e[301].resize((w * 3 // 5, h * 3 // 5), Image.Resampling.LANCZOS).save(train / "c-resize.png")
    _jpeg(e[302], 45).save(train / "c-jpeg.png")
    e[303].transpose(Image.Transpose.ROTATE_90).save(train / "c-rot90.png")
    e[304].transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(train / "c-mirror.png")
    e[305].convert("L").save(train / "c-grey.png")
    shutil.copy(train / "c-rot90.png", train / "c-rot90-again.png")  # a training copy of a contaminating copy
    run([str(evals)], root / "eval-out", config=FAST)
    return {"eval": evals, "train": train, "eval_out": root / "eval-out", "root": root}


COPIES = {"c-bytes.jpg", "c-resize.png", "c-jpeg.png", "c-rot90.png", "c-mirror.png", "c-grey.png", "c-rot90-again.png"}


@pytest.mark.slow
def test_copies_of_the_evaluation_set_are_dropped_and_nothing_else(sets: dict[str, Path]) -> None:
    out = sets["root"] / "out"
    result = run([str(sets["train"])], out, config=FAST, against=[f"bench={sets['eval_out']}"])
    m = pl.read_parquet(out / "manifest.parquet")
    contaminated = m.filter(pl.col("reason") == "contaminates:bench")
    assert set(contaminated["sample_id"]) == COPIES
    assert not contaminated["keep"].any()
    # the eval sample each names
    named = dict(zip(contaminated["sample_id"], contaminated["duplicate_of"], strict=True))
    assert named["c-bytes.jpg"] == "bench:e300.jpg" and named["c-rot90.png"] == "bench:e303.jpg"
    assert contaminated.filter(pl.col("sample_id") == "c-bytes.jpg")["signal"].item() == "exact_bytes"
    # remove.parquet lists them with their reason, beside the duplicates
    removed = pl.read_parquet(out / "remove.parquet")
    assert set(removed.filter(pl.col("reason") == "contaminates:bench")["sample_id"]) == COPIES
    assert removed.filter(pl.col("sample_id") == "c-bytes.jpg")["duplicate_of"].item() == "bench:e300.jpg"
    assert removed.height == m.filter(pl.col("status").eq("ok") & ~pl.col("keep")).height
    # the rest of the set is deduplicated as without --against: t400's copy is still a duplicate
    rest = m.filter(~pl.col("sample_id").is_in(list(COPIES)))
    assert rest.filter(pl.col("reason") == "duplicate")["sample_id"].to_list() == ["t400.jpg"]  # "t400-again" sorts first
    assert rest["keep"].sum() == 12
    section = result.report["contamination"]["bench"]
    assert section["dropped"] == 7 and section["direct"] + section["via_cluster"] == 7 and section["direct"] >= 6
    assert sum(section["similarity_histogram"]["counts"]) == section["direct"]
    assert json.loads((out / "report.json").read_text())["contamination"]["bench"]["dropped"] == 7
    page = (out / "report.html").read_text()
    assert "Evaluation sets (decontamination)" in page and "contaminates:&lt;set&gt;" in page
    # the same command again: byte-identical
    run([str(sets["train"])], sets["root"] / "again", config=FAST, against=[f"bench={sets['eval_out']}"])
    assert (sets["root"] / "again" / "manifest.parquet").read_bytes() == (out / "manifest.parquet").read_bytes()


@pytest.mark.slow
def test_cli_against_and_its_errors(sets: dict[str, Path]) -> None:
    out = sets["root"] / "cli-out"
    res = runner.invoke(app, ["run", str(sets["train"]), "--out", str(out), "--model", "sscd_distilled", "--against", str(sets["eval_out"]), "-q"])
    assert res.exit_code == 0, res.output
    assert "contaminates eval-out: 7 training samples dropped" in res.output
    missing = runner.invoke(app, ["run", str(sets["train"]), "--out", str(sets["root"] / "x"), "--against", str(sets["root"] / "nope"), "-q"])
    assert missing.exit_code == 2 and missing.output.startswith("Error:") and "nope" in missing.output
    with pytest.raises(ConfigError, match="cannot be compared"):
        run([str(sets["train"])], sets["root"] / "y", config=FAST.with_overrides({"embed.size": 288}), against=[str(sets["eval_out"])])
    # the evaluation index was built with pHash off: a pHash search against it would find nothing, silently
    no_phash = runner.invoke(app, ["run", str(sets["train"]), "--out", str(sets["root"] / "z"), "--model", "sscd_distilled",
                                   "--phash-distance", "4", "--against", str(sets["eval_out"]), "-q"])  # fmt: skip
    assert no_phash.exit_code == 2, no_phash.output
    lines = no_phash.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "no pHash codes" in lines[0], lines
