"""`dedup check`: verdicts per limit, exit codes, renderings, a read-only baseline, --update."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from _configs import PLAIN
from _data import edited_copies, natural_image
from typer.testing import CliRunner

from dedup import run
from dedup.check import BASELINE_COLUMNS, check
from dedup.signals import cross_links
from dedup.cli import app
from dedup.config import GateConfig
from dedup.add import plan_add
from dedup.store import open_index
from dedup.search import Signal

FAST = PLAIN.with_overrides({"embed.model": "sscd_distilled", "embed.size": 224, "folder_batch": 8})
LIMITS = ("max_share_duplicating_baseline", "max_share_duplicated_within_drop", "max_cluster_size")
SIZE = (160, 120)
runner = CliRunner()


def _save(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    natural_image(seed, SIZE).save(path, quality=90)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(source, out)``: 12 generated images (seeds 100-111) plus two byte copies of img_100, so
    img_100's cluster has 3 members. Shared by the module: copy it before changing it."""
    root = tmp_path_factory.mktemp("baseline")
    src = root / "src"
    for seed in range(100, 112):
        _save(src / f"img_{seed}.jpg", seed)
    for n in (1, 2):
        shutil.copy(src / "img_100.jpg", src / f"img_100_copy{n}.jpg")
    run([str(src)], root / "out", config=FAST)
    return src, root / "out"


def _drop(folder: Path, new: range, *, from_baseline: tuple[str, ...] = (), baseline_src: Path | None = None,
          internal: dict[int, int] | None = None) -> Path:
    """A drop: new images (by seed), byte copies of baseline files, and ``internal`` byte copies of
    its own images ({seed: copies})."""
    for seed in new:
        _save(folder / f"new_{seed}.jpg", seed)
    for name in from_baseline:
        assert baseline_src is not None
        shutil.copy(baseline_src / name, folder / f"again_{name}")
    for seed, copies in (internal or {}).items():
        for n in range(copies):
            shutil.copy(folder / f"new_{seed}.jpg", folder / f"new_{seed}_dup{n}.jpg")
    return folder


def _check_json(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["check", *args, "--json", "-q"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def test_a_clean_drop_passes_and_the_baseline_is_untouched(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = baseline
    drop = _drop(tmp_path / "drop", range(200, 220))
    before = _digest(out)
    result = runner.invoke(app, ["check", str(drop), "--against", str(out), "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "dedup check: PASSED"
    assert lines[1].startswith(f"drop {drop}: 20 samples (0 failed) in 3 new shards · baseline {out}: 14 samples")
    assert "  ok   duplicates of the baseline: 0.0% (0 samples), limit 5.0%" in lines
    assert _digest(out) == before  # not a byte changed, lock file included


@pytest.mark.parametrize(
    ("limit", "args"),
    [
        ("max_share_duplicating_baseline", {"from_baseline": ("img_101.jpg", "img_102.jpg")}),
        ("max_share_duplicated_within_drop", {"internal": {300: 2}}),
        ("max_cluster_size", {"from_baseline": ("img_100.jpg",)}),
    ],
)
def test_each_limit_fails_on_its_own(baseline: tuple[Path, Path], tmp_path: Path, limit: str, args: dict) -> None:
    src, out = baseline
    n_new = 30 if limit == "max_cluster_size" else 10
    drop = _drop(tmp_path / "drop", range(300, 300 + n_new), baseline_src=src, **args)
    code, body = _check_json(str(drop), "--against", str(out), "--max-cluster-size", "3")
    assert code == 1
    assert body["passed"] is False
    assert [lim["name"] for lim in body["limits"] if not lim["passed"]] == [limit]
    if limit == "max_share_duplicating_baseline":
        assert body["duplicating_baseline"]["samples"] == 2
        assert body["duplicating_baseline"]["share"] == pytest.approx(2 / 12)
        assert body["duplicating_baseline"]["by_signal"] == {"exact_bytes": 2}
        worst = body["baseline_matches"][0]
        assert worst["sample_id"] == "again_img_101.jpg" and worst["match_id"] == "img_101.jpg"
        assert worst["signal"] == "exact_bytes" and worst["similarity"] == 1.0
    elif limit == "max_share_duplicated_within_drop":
        assert body["duplicated_within_drop"] == {"samples": 2, "share": pytest.approx(2 / 12)}
        assert {m["sample_id"] for m in body["drop_matches"]} == {"new_300_dup0.jpg", "new_300_dup1.jpg"}
        assert body["largest_cluster"]["size"] == 3
    else:
        # one byte copy of img_100 joins its baseline cluster of 3: the drop makes it 4
        assert body["largest_cluster"] == {"size": 4, "drop_samples": 1, "example": "again_img_100.jpg"}
        assert body["duplicating_baseline"]["share"] == pytest.approx(1 / 31)  # under 5 %: passes


def test_flags_and_config_files_set_the_limits(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = baseline
    drop = _drop(tmp_path / "drop", range(400, 410), internal={400: 2})
    code, body = _check_json(str(drop), "--against", str(out), "--max-internal-share", "-1")
    assert code == 0
    off = next(lim for lim in body["limits"] if lim["name"] == "max_share_duplicated_within_drop")
    assert off == {**off, "off": True, "passed": True, "limit": None}
    gate = tmp_path / "gate.toml"
    gate.write_text("[gate]\nmax_share_duplicated_within_drop = 0.5\n")
    code, body = _check_json(str(drop), "--against", str(out), "--config", str(gate))
    assert code == 0
    # the file names one limit; the others stay the preset's (ci), not turned off or reset
    limits = {lim["name"]: lim["limit"] for lim in body["limits"]}
    assert limits == {"max_share_duplicating_baseline": 0.05, "max_share_duplicated_within_drop": 0.5, "max_cluster_size": 20}
    strict = tmp_path / "strict.toml"
    strict.write_text("[gate]\nmax_cluster_size = 3\n")
    code, body = _check_json(str(drop), "--against", str(out), "--preset", "strict", "--config", str(strict))
    assert {lim["name"]: lim["limit"] for lim in body["limits"]}["max_cluster_size"] == 3
    # a flag beats the file
    assert _check_json(str(drop), "--against", str(out), "--config", str(gate), "--max-internal-share", "0.1")[0] == 1


def test_junit_and_markdown(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = baseline
    drop = _drop(tmp_path / "drop", range(500, 510), baseline_src=src, from_baseline=("img_103.jpg",))
    junit, md = tmp_path / "reports" / "gate.xml", tmp_path / "summary.md"
    (tmp_path / "reports").mkdir()
    md.write_text("# earlier step\n")
    result = runner.invoke(
        app, ["check", str(drop), "--against", str(out), "--junit", str(junit), "--markdown", str(md),
              "--max-cluster-size", "-1", "-q"]
    )
    assert result.exit_code == 1, result.output
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites" and root.get("failures") == "1" and root.get("skipped") == "1"
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "3"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert list(cases) == list(LIMITS)
    failure = cases["max_share_duplicating_baseline"].find("failure")
    assert failure is not None
    assert failure.get("message") == "duplicates of the baseline: 9.1% exceeds the limit 5.0%"
    assert "again_img_103.jpg -> img_103.jpg (exact_bytes, 1.000)" in (failure.text or "")
    assert cases["max_share_duplicated_within_drop"].find("failure") is None
    assert cases["max_cluster_size"].find("skipped") is not None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["drop_samples"] == "11" and props["baseline_samples"] == "14"

    text = md.read_text()
    assert text.startswith("# earlier step\n## dedup check: ❌ failed\n")  # appended, as GitHub expects
    assert "| duplicates of the baseline | 9.1% (1) | 5.0% | ❌ |" in text
    assert "| largest cluster | 2 | off | – |" in text
    assert "| sample | baseline match | similarity | signal |" in text
    assert "| `again_img_103.jpg` | `img_103.jpg` | 1.000 | exact_bytes |" in text


def test_exit_code_2_for_bad_usage_and_unreadable_input(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = baseline
    drop = _drop(tmp_path / "drop", range(600, 602))
    cases = [
        (["check", str(tmp_path / "no-drop"), "--against", str(out)], "does not exist"),
        (["check", str(drop), "--against", str(tmp_path / "no-index")], "does not exist; hint: build a baseline index"),
        (["check", str(drop), "--against", str(drop)], "holds no index/ folder"),
        (["check", str(drop), "--against", str(out), "--preset", "nope"], "unknown preset 'nope'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "-q"])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    usage = runner.invoke(app, ["check", str(drop), "--against", str(out), "--max-cluster-size", "big"])
    assert usage.exit_code == 2
    assert runner.invoke(app, ["check", str(drop)]).exit_code == 2  # --against is required
    under_a_file = drop / "new_600.jpg" / "gate.xml"
    unwritable = runner.invoke(app, ["check", str(drop), "--against", str(out), "--junit", str(under_a_file), "-q"])
    assert unwritable.exit_code == 2 and unwritable.output.startswith("Error: cannot write")


def test_links_to_the_baseline_match_brute_force(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = baseline
    drop = tmp_path / "drop"
    rng = np.random.default_rng(0)
    for seed in (104, 105, 106):  # edited copies of baseline images, and unrelated images
        for name, img in edited_copies(natural_image(seed, SIZE), rng)[:4]:
            (drop / f"{seed}_{name}.png").parent.mkdir(parents=True, exist_ok=True)
            img.save(drop / f"{seed}_{name}.png")
    for seed in range(700, 706):
        _save(drop / f"new_{seed}.jpg", seed)
    base = open_index(out, columns=BASELINE_COLUMNS, search=True)
    cfg = base.config.with_overrides({"search.threshold": 0.3, "search.pdq_distance": 120})
    plan = plan_add(base, [str(drop)])
    from dedup.pipeline import featurize

    table, vectors, _ = featurize(plan.new, tmp_path / "work", cfg)
    links = cross_links(table, vectors, base, cfg)

    # embeddings: every (drop, baseline) pair at >= 0.3, from a plain matrix product
    index = open_index(out, columns=["embedded", "pdq", "status", "has_image"], vectors=True)
    assert index.vectors is not None
    sims = vectors @ index.vectors.T
    d_rows = np.flatnonzero(table.column("embedded").to_numpy(zero_copy_only=False))
    b_rows = np.flatnonzero(index.samples.column("embedded").to_numpy(zero_copy_only=False))
    clear = np.abs(sims - 0.3) > 1e-4  # leave out float ties at the threshold
    expected = {(int(d_rows[i]), int(b_rows[j])) for i, j in zip(*np.nonzero((sims >= 0.3) & clear), strict=True)}
    emb = links.signal == Signal.EMBEDDING
    got = {(int(d), int(b)) for d, b, s in zip(links.drop[emb], links.base[emb], links.score[emb], strict=True)
           if abs(s - 0.3) > 1e-4}
    assert expected and got == expected
    assert {int(d) for d, _ in expected} >= set(range(12))  # the edited copies are found

    # PDQ: Hamming distance <= 120 from unpacked bits
    bits = lambda blobs: np.unpackbits(np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, 32), axis=1)  # noqa: E731
    mine = table.column("pdq").to_pylist()
    theirs = index.samples.column("pdq").to_pylist()
    b_ok = [r for r, v in enumerate(theirs) if v is not None]
    dist = (bits([mine[r] for r in range(table.num_rows)])[:, None, :] != bits([theirs[r] for r in b_ok])[None, :, :]).sum(2)
    # ...in any of the drop image's eight orientations (the seven others: pdq_variants)
    variants = table.column("pdq_variants").to_pylist()
    for v in range(7 if all(variants) else 0):  # when the config computes them
        codes = [variants[r][32 * v : 32 * (v + 1)] for r in range(table.num_rows)]
        other = (bits(codes)[:, None, :] != bits([theirs[r] for r in b_ok])[None, :, :]).sum(2)
        dist = np.minimum(dist, other)
    expected_pdq = {(int(i), b_ok[j]) for i, j in zip(*np.nonzero(dist <= 120), strict=True)}
    pdq = links.signal == Signal.PDQ
    assert set(zip(links.drop[pdq].tolist(), links.base[pdq].tolist(), strict=True)) == expected_pdq
    assert expected_pdq


def test_update_adds_a_passing_drop_and_never_a_failing_one(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    src, shared = baseline
    out = tmp_path / "out"
    shutil.copytree(shared, out)
    failing = _drop(tmp_path / "bad", range(800, 804), internal={800: 3})
    before = _digest(out)
    code, body = _check_json(str(failing), "--against", str(out), "--update")
    assert code == 1 and body["updated"] is False
    assert _digest(out) == before

    drop = _drop(tmp_path / "good", range(810, 830))
    code, body = _check_json(str(drop), "--against", str(out), "--update")
    assert code == 0 and body["updated"] is True
    assert body["drop_matches"] == [] and body["drop"]["new_shards"] == 3
    # the index now holds the drop: as `dedup run baseline drop` would have built it
    run([str(src), str(drop)], tmp_path / "full", config=FAST)
    assert (out / "manifest.parquet").read_bytes() == (tmp_path / "full" / "manifest.parquet").read_bytes()
    # checking the same drop again finds nothing new to check
    code, body = _check_json(str(drop), "--against", str(out))
    assert code == 0 and body["drop"] == {**body["drop"], "samples": 0, "new_shards": 0, "known_shards": 3}


def test_two_checks_at_once_against_one_index(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = baseline
    drops = [
        _drop(tmp_path / "a", range(900, 912)),
        _drop(tmp_path / "b", range(920, 930), baseline_src=src, from_baseline=("img_105.jpg", "img_106.jpg")),
    ]
    before = _digest(out)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dedup.cli", "check", str(d), "--against", str(out), "--json", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in drops
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 1], results
    bodies = [json.loads(stdout) for stdout, _ in results]
    assert bodies[0]["drop"]["samples"] == 12 and bodies[1]["duplicating_baseline"]["samples"] == 2
    assert _digest(out) == before


def test_library_check_reports_timings_and_counts(baseline: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = baseline
    drop = _drop(tmp_path / "drop", range(950, 955), baseline_src=src, from_baseline=("img_100_copy1.jpg",))
    result = check(str(drop), out, gate=GateConfig(max_cluster_size=-1), work=tmp_path / "work")
    assert result.passed is False  # 1 of 6 duplicates the baseline
    assert (result.samples, result.ok, result.duplicating_baseline, result.largest_cluster) == (6, 6, 1, 4)
    assert result.baseline_matches[0].match_id == "img_100.jpg"  # the first holder of those bytes
    assert set(result.seconds) == {"open_index", "featurize", "search", "update", "total"}
    assert (tmp_path / "work").is_dir()  # a work folder of one's own is kept (and resumes)
