"""The signals table: one set of rules for links within a set (run, index add) and against an
index (check), so a check finds the links a run over both sets makes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from _data import natural_image
from PIL import Image

from dedup import run
from dedup.check import check
from dedup.config import load_config
from dedup.search import Signal
from dedup.signals import PRECOMPUTED, SIGNALS, Qualifies, eligibility, refuse_mixed_vectors
from dedup.errors import ConfigError

SIZE = (200, 150)
# The default preset's direct signals (exact, distilled SSCD, PDQ x 8 orientations); the second
# look is not part of check yet (docs/architecture.md, known gaps).
DIRECT = load_config("default").with_overrides({"folder_batch": 4, "search.verify_from": -1.0, "search.partial": False})


def test_every_signal_is_one_row_and_metadata_links_only_rows_nobody_could_look_at() -> None:
    assert len({spec.signal for spec in SIGNALS}) == len(SIGNALS)
    assert {spec.signal for spec in SIGNALS} >= {Signal.EXACT_BYTES, Signal.EMBEDDING, Signal.PDQ, Signal.URL, Signal.CAPTION}
    assert [spec.signal for spec in SIGNALS if spec.second_look] == [Signal.EMBEDDING]
    table = pa.table(
        {
            "status": ["ok", "ok", "ok", "failed"],
            "has_image": [True, False, False, False],
            "embedded": [True, True, False, False],
        }
    )
    masks = eligibility(table)
    assert masks[Qualifies.OK].tolist() == [True, True, True, False]
    assert masks[Qualifies.IMAGE].tolist() == [True, False, False, False]
    # a precomputed embedding is the pixels' own signal: its caption never links it
    assert masks[Qualifies.METADATA].tolist() == [False, False, True, False]


def test_vectors_of_two_kinds_are_never_compared() -> None:
    refuse_mixed_vectors(None, ["sscd_distilled"], where="")
    refuse_mixed_vectors("sscd_distilled", ["sscd_distilled"], where="x")
    with pytest.raises(ConfigError, match="cannot be compared"):
        refuse_mixed_vectors(None, [PRECOMPUTED, "sscd_distilled"], where="")
    with pytest.raises(ConfigError, match="cannot be compared"):
        refuse_mixed_vectors(PRECOMPUTED, ["sscd_distilled"], where="the index in OUT")


@pytest.mark.slow
def test_check_finds_the_copies_a_run_over_both_links(tmp_path: Path) -> None:
    """Rotated, mirrored, cropped and byte copies of baseline images in a drop: `check` names
    exactly the drop samples that `dedup run BASE DROP` puts in a cluster with a baseline sample."""
    base, drop = tmp_path / "base", tmp_path / "drop"
    base.mkdir()
    drop.mkdir()
    for seed in range(10):
        natural_image(seed, SIZE).save(base / f"b{seed}.jpg", quality=92)
    pictures = {seed: Image.open(base / f"b{seed}.jpg").convert("RGB") for seed in range(6)}
    pictures[0].transpose(Image.Transpose.ROTATE_90).save(drop / "rot90.png")
    pictures[1].transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(drop / "mirror.png")
    w, h = SIZE
    pictures[2].crop((12, 9, w - 10, h - 8)).save(drop / "crop.jpg", quality=85)
    shutil.copy(base / "b3.jpg", drop / "bytes.jpg")
    pictures[4].convert("L").save(drop / "grey.png")
    for seed in range(50, 56):
        natural_image(seed, SIZE).save(drop / f"new{seed}.jpg", quality=92)

    out = tmp_path / "out"
    run([str(base)], out, config=DIRECT)
    result = check(str(drop), out, top=100)
    flagged = {m.sample_id for m in result.baseline_matches}
    assert result.duplicating_baseline == len(flagged)

    both = pl.read_parquet(run([str(base), str(drop)], tmp_path / "both", config=DIRECT).out / "manifest.parquet")
    has_base = both.group_by("cluster_id").agg(pl.col("sample_id").str.starts_with("s0/").any().alias("base"))
    linked = both.join(has_base, on="cluster_id").filter(pl.col("sample_id").str.starts_with("s1/") & pl.col("base"))
    expected = {s.removeprefix("s1/") for s in linked["sample_id"].to_list()}
    assert {"rot90.png", "mirror.png", "bytes.jpg"} <= expected  # PDQ's rotations and exact bytes reach the index
    assert flagged == expected
    assert not any(name.startswith("new") for name in flagged)
    signals = {m.sample_id: m.signal for m in result.baseline_matches}
    assert signals["bytes.jpg"] == "exact_bytes"
    assert np.isclose([m.similarity for m in result.baseline_matches if m.sample_id == "bytes.jpg"][0], 1.0)


@pytest.mark.slow
def test_check_runs_the_second_look_against_the_index(tmp_path: Path) -> None:
    """Pictures of the baseline pasted into scenes (partial copies) in a drop: `check` finds them
    through the second look, as `dedup run BASE DROP` does, and not other pictures on the same
    walls."""
    from test_regions import _picture, _scene

    base, drop = tmp_path / "base", tmp_path / "drop"
    base.mkdir()
    drop.mkdir()
    pictures = [_picture(300 + s) for s in range(3)]
    for s, p in enumerate(pictures):
        p.save(base / f"picture{s}.jpg", quality=92)
    for s in range(2):
        _scene(pictures[s], 400 + s).save(drop / f"mockup{s}.jpg", quality=88)
        _scene(_picture(600 + s), 400 + s).save(drop / f"other{s}.jpg", quality=88)  # same wall, other picture
    cfg = load_config("default").with_overrides(
        {
            "folder_batch": 4,
            "search.threshold": 0.95,
            # 1/f-noise pictures all look alike to SSCD: propose more, let geometry decide
            "search.partial_margin": 0.0,
            "search.partial_propose": 0.4,
        }
    )
    out = tmp_path / "out"
    run([str(base)], out, config=cfg)
    result = check(str(drop), out, top=100)
    flagged = {m.sample_id: m.signal for m in result.baseline_matches}
    assert flagged == {"mockup0.jpg": "partial", "mockup1.jpg": "partial"}

    both = pl.read_parquet(run([str(base), str(drop)], tmp_path / "both", config=cfg).out / "manifest.parquet")
    has_base = both.group_by("cluster_id").agg(pl.col("sample_id").str.starts_with("s0/").any().alias("base"))
    linked = both.join(has_base, on="cluster_id").filter(pl.col("sample_id").str.starts_with("s1/") & pl.col("base"))
    assert {s.removeprefix("s1/") for s in linked["sample_id"].to_list()} == set(flagged)
