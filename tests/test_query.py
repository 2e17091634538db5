"""dedup query: planted copies of training images are found, with their similarity.

The oracle: generated images made by editing images of the bundled sample (whose ground truth
says which group each training sample belongs to) must match a training sample of the same
group, at or above the paper's copy level; unrelated generated images must not. Scores are
checked against a brute-force inner product over the index's embeddings.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from _data import edited_copies, natural_image
from PIL import Image
from typer.testing import CliRunner

from dedup.cli import app
from dedup.config import load_config
from dedup.errors import SourceError
from dedup.pipeline import run
from dedup.query import MATCHES_SCHEMA, open_index, query

SAMPLE = Path(str(resources.files("dedup").joinpath("data", "sample")))
TRUTH = json.loads((SAMPLE / "ground_truth.json").read_text())
# Originals of the sample (key -> edit to apply): three in duplicate groups, two unique.
PLANTED = {"0000011": "crop", "0000013": "text", "0000024": "jpeg", "0000001": "resize", "0000006": "brightness"}
UNRELATED = 3
runner = CliRunner()


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's run (default preset: SSCD) over the bundled sample."""
    out = tmp_path_factory.mktemp("demo") / "out"
    run([str(SAMPLE)], out, config=load_config("default"))
    return out


@pytest.fixture(scope="module")
def generations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Edited copies of five sample images, three unrelated images and one broken file."""
    root = tmp_path_factory.mktemp("generations")
    rng = np.random.default_rng(5)
    with tarfile.open(SAMPLE / "00000.tar") as tar:
        for key, edit in PLANTED.items():
            member = tar.extractfile(f"{key}.jpg")
            assert member is not None
            image = Image.open(io.BytesIO(member.read())).convert("RGB")
            edited = dict(edited_copies(image, rng))[edit]
            edited.save(root / f"copy_{key}_{edit}.png")
    (root / "more").mkdir()
    for i in range(UNRELATED):
        natural_image(9000 + i, (256, 192)).save(root / "more" / f"unrelated_{i}.jpg", quality=90)
    (root / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / ".hidden.jpg").write_bytes(b"never read")
    return root


@pytest.fixture(scope="module")
def result_and_out(demo_out: Path, generations: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("q") / "query-out"
    return query([generations], demo_out, out=out, top_k=5, flag_at=0.5), out


def _key(sample_id: str) -> str:
    return sample_id.rsplit("/", 1)[-1]


def test_every_planted_copy_is_found_with_its_similarity(result_and_out, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    result, _ = result_and_out
    top = pl.from_arrow(result.matches).filter(pl.col("rank") == 1)
    seen = {}
    for row in top.iter_rows(named=True):
        m = re.search(r"copy_(\d+)_(\w+)\.png$", row["query"])
        if m is None:
            continue
        key, edit = m.groups()
        assert TRUTH[_key(row["sample_id"])]["group"] == TRUTH[key]["group"], (row["query"], row["sample_id"])
        assert row["similarity"] >= 0.5 and row["flagged"], row
        seen[f"{key} ({edit})"] = round(float(row["similarity"]), 3)
    assert len(seen) == len(PLANTED)
    for row in top.filter(pl.col("query").str.contains("unrelated_")).iter_rows(named=True):
        assert not row["flagged"] and row["similarity"] < 0.5, row
    with capsys.disabled():  # the numbers, for whoever runs the suite with -s or reads the log
        print(f"\nplanted copies, top-1 similarity: {seen}; share flagged {result.share_flagged:.2%}")


def test_share_flagged_and_failures_are_counted(result_and_out) -> None:  # type: ignore[no-untyped-def]
    result, _ = result_and_out
    assert result.queries == len(PLANTED) + UNRELATED + 1  # the hidden file is skipped
    assert result.matched == len(PLANTED) + UNRELATED
    assert result.flagged == len(PLANTED)
    assert result.share_flagged == pytest.approx(len(PLANTED) / (len(PLANTED) + UNRELATED))
    assert [name.rsplit("/", 1)[-1] for name, _ in result.failed] == ["broken.jpg"]
    assert result.model == "sscd_distilled"  # the demo index is built with the default preset


def test_matches_parquet_schema_ranks_and_duplicate_counts(result_and_out, demo_out: Path) -> None:  # type: ignore[no-untyped-def]
    result, out = result_and_out
    table = pq.read_table(out / "matches.parquet")
    assert table.schema.equals(MATCHES_SCHEMA)
    assert table.num_rows == 5 * result.matched
    m = pl.from_arrow(table)
    for _, group in m.group_by("query", maintain_order=True):
        assert group["rank"].to_list() == [1, 2, 3, 4, 5]
        sims = group["similarity"].to_numpy()
        assert np.all(np.diff(sims) <= 1e-6)
        assert group["flagged"].to_list() == (sims >= 0.5).tolist()

    # Duplicate count of a match = its cluster's size - 1 in the manifest.
    manifest = pl.read_parquet(demo_out / "manifest.parquet").select("sample_id", "cluster_size")
    joined = m.join(manifest, on="sample_id", how="left")
    assert (joined["match_duplicate_count"] == joined["cluster_size"] - 1).all()


def test_scores_match_a_fresh_embedding(result_and_out, demo_out: Path, generations: Path) -> None:  # type: ignore[no-untyped-def]
    """Brute force: embed one planted copy ourselves and score it against every training row."""
    from dedup.embed import build_embedder
    from dedup.fingerprint import decode

    result, _ = result_and_out
    idx = open_index(demo_out)
    embedder = build_embedder(idx.embed_config())
    assert embedder is not None
    path = next(generations.glob("copy_0000011_*.png"))
    vec = embedder.embed(embedder.preprocess(decode(path.read_bytes(), max_pixels=10**8))[None])[0]
    from dedup.store import open_index as open_store

    emb = open_store(demo_out, vectors=True).vectors
    assert emb is not None
    scores = emb @ vec
    order = np.argsort(-scores, kind="stable")[:5]
    ids = pl.from_arrow(idx.samples).filter(pl.col("emb_row") >= 0).sort("emb_row")["sample_id"].to_list()
    got = pl.from_arrow(result.matches).filter(pl.col("query").str.ends_with(path.name))
    assert got["similarity"].to_numpy() == pytest.approx(scores[order], abs=1e-4)
    assert set(got["sample_id"].to_list()[:1]) <= {ids[i] for i in order[:2]}


def test_page_is_side_by_side_escaped_and_self_contained(result_and_out) -> None:  # type: ignore[no-untyped-def]
    result, out = result_and_out
    page = (out / "matches.html").read_text()
    assert "<script" not in page.lower()
    assert all(src.startswith("data:") for src in re.findall(r'\ssrc="([^"]*)"', page))
    # generated thumbnails for every embedded image, training thumbnails read back from the sample
    assert page.count("data:image/jpeg;base64,") >= result.matched + 5 * result.matched - 5
    assert "source not available" not in page
    assert f"{result.share_flagged:.2%}" in page
    assert "broken.jpg" in page  # the failure is listed, not dropped


def test_cli_prints_share_flagged(demo_out: Path, generations: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    res = runner.invoke(app, ["query", str(generations), "--index", str(demo_out / "index"), "--out", str(out),
                              "--top-k", "2", "--flag-at", "0.5", "--quiet"])
    assert res.exit_code == 0, res.output
    n = len(PLANTED) + UNRELATED
    share = len(PLANTED) / n
    assert f"{n} generations · {len(PLANTED)} flagged ({share:.2%}) at sscd_distilled similarity ≥ 0.5 · 1 could not be read" in res.output
    assert re.search(r"^warning: .*broken\.jpg: ", res.output, re.M)
    assert pl.read_parquet(out / "matches.parquet").height == 2 * n


def test_cli_errors_are_one_line(demo_out: Path, generations: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["query", str(generations), "--index", str(tmp_path), "-q"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {tmp_path} holds no index/ folder; hint: ")
    res = runner.invoke(app, ["query", str(tmp_path / "nope.png"), "--index", str(demo_out), "-q"])
    assert res.exit_code == 2
    assert "does not exist" in res.output and "Traceback" not in res.output


def test_no_images_is_an_error(demo_out: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        query([tmp_path / "empty"], demo_out, out=tmp_path / "o")


def test_thumbnails_skipped_when_the_source_is_gone(generations: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    out = tmp_path / "out"
    run([str(data)], out, config=load_config("ci"))
    shutil.rmtree(data)
    result = query([generations / "more"], out, out=tmp_path / "q", top_k=2)
    assert result.matched == UNRELATED
    page = (tmp_path / "q" / "matches.html").read_text()
    assert page.count("source not available") == 2 * UNRELATED
