"""The detection-quality benchmark's scorer (bench/quality.py): exact numbers on hand-made
assignments, so that a wrong scorer cannot silently rank methods."""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

_BENCH = str(Path(__file__).resolve().parents[1] / "bench")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

import quality  # noqa: E402
from quality import parse_method, score  # noqa: E402

# Group 0: an original with 3 copies; group 1: an original and a crop; group 2: a lookalike of
# group 0 (a hard negative); group 3: a unique image. 8 images, true pairs C(4,2) + C(2,2) = 7.
ROWS = [
    ("a0.jpg", 0, "original", -1),
    ("a1.jpg", 0, "exact", -1),
    ("a2.png", 0, "resize", -1),
    ("a3.webp", 0, "partial", -1),
    ("b0.jpg", 1, "original", -1),
    ("b1.jpg", 1, "crop", -1),
    ("c0.jpg", 2, "original", 0),
    ("d0.jpg", 3, "original", -1),
]


def _labels(rows: list[tuple[str, int, str, int]] = ROWS) -> pa.Table:
    return pa.table(
        {
            "file": [r[0] for r in rows],
            "group": pa.array([r[1] for r in rows], pa.int64()),
            "edit": [r[2] for r in rows],
            "edit_detail": ["" for _ in rows],
            "source": ["clipart" for _ in rows],
            "lookalike_of": pa.array([r[3] for r in rows], pa.int64()),
        }
    )


def _recalls(s: dict) -> dict[str, float]:
    return {e: v["recall"] for e, v in s["recall_by_edit"].items()}


def test_perfect() -> None:
    s = score(_labels(), {f: g for f, g, _, _ in ROWS})
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 1.0, 1.0)
    assert s["pairs"] == {"true": 7, "predicted": 7, "true_positive": 7}
    assert _recalls(s) == {"exact": 1.0, "resize": 1.0, "crop": 1.0, "partial": 1.0}
    assert s["copy_recall"] == 1.0 and s["partial_recall"] == 1.0
    assert s["hard_negatives"] == {"total": 1, "merged": 0, "share": 0.0, "merged_files": []}
    dc = s["dup_count"]
    assert (dc["l1"], dc["tv"], dc["mae"]) == (0.0, 0.0, 0.0)
    assert dc["mean_true"] == dc["mean_pred"] == pytest.approx(20 / 6)  # (4*4 + 2*2) / 6 images
    assert dc["mean_dup_true"] == dc["mean_dup_pred"] == pytest.approx(14 / 6)  # other copies: (4*3 + 2*1) / 6
    assert dc["hist_true"] == dc["hist_pred"] == {1: 2, 2: 2, 4: 4}
    assert s["clusters_gt1"] == {"true": 2, "predicted": 2}
    assert s["unassigned"] == 0


def test_cluster_ids_are_opaque() -> None:
    """Any hashable ids, as long as the partition is the same."""
    ids = {0: ("x", 1), 1: "b", 2: 7.5, 3: None}
    assert score(_labels(), {f: ids[g] for f, g, _, _ in ROWS})["f1"] == 1.0


def test_all_singletons() -> None:
    s = score(_labels(), {f: i for i, (f, _, _, _) in enumerate(ROWS)})
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 0.0, 0.0)  # no predicted pair: nothing wrong merged
    assert _recalls(s) == {"exact": 0.0, "resize": 0.0, "crop": 0.0, "partial": 0.0}
    assert s["hard_negatives"]["merged"] == 0
    dc = s["dup_count"]
    # true histogram {4: 4/8, 2: 2/8, 1: 2/8} vs predicted {1: 8/8}: L1 = 4/8 + 2/8 + 6/8
    assert dc["l1"] == pytest.approx(1.5) and dc["tv"] == pytest.approx(0.75)
    assert dc["mae"] == pytest.approx((4 * 3 + 2 * 1) / 8)
    assert dc["mean_true"] == pytest.approx(20 / 6) and dc["mean_pred"] is None
    assert s["clusters_gt1"]["predicted"] == 0


def test_missing_files_count_as_singletons() -> None:
    """An empty assignment (a method that failed on everything) scores as all singletons."""
    s = score(_labels(), {})
    assert s["unassigned"] == 8
    assert (s["precision"], s["recall"], s["f1"]) == (1.0, 0.0, 0.0)
    assert s["dup_count"]["tv"] == pytest.approx(0.75)
    # None is a singleton too, and files not in the labels are ignored
    s = score(_labels(), {"a0.jpg": None, "a1.jpg": None, "zzz.jpg": 0, "d0.jpg": 0})
    assert s["recall"] == 0.0 and s["unassigned"] == 7  # only d0 is assigned


def test_all_one_cluster() -> None:
    s = score(_labels(), {f: "all" for f, _, _, _ in ROWS})
    assert s["pairs"] == {"true": 7, "predicted": 28, "true_positive": 7}
    assert s["precision"] == 0.25 and s["recall"] == 1.0 and s["f1"] == pytest.approx(0.4)
    assert _recalls(s) == {"exact": 1.0, "resize": 1.0, "crop": 1.0, "partial": 1.0}
    assert s["hard_negatives"] == {"total": 1, "merged": 1, "share": 1.0, "merged_files": ["c0.jpg"]}
    dc = s["dup_count"]
    # predicted {8: 1}: L1 = 4/8 + 2/8 + 2/8 + 1
    assert dc["l1"] == pytest.approx(2.0) and dc["tv"] == pytest.approx(1.0)
    assert dc["mae"] == pytest.approx((4 * 4 + 2 * 6 + 2 * 7) / 8)
    assert dc["mean_pred"] == 8.0


def test_one_merged_hard_negative() -> None:
    """Perfect, except that the lookalike c0 joined group 0's cluster."""
    pred = {f: g for f, g, _, _ in ROWS} | {"c0.jpg": 0}
    s = score(_labels(), pred)
    assert s["pairs"] == {"true": 7, "predicted": 11, "true_positive": 7}  # C(5,2) + C(2,2)
    assert s["precision"] == pytest.approx(7 / 11) and s["recall"] == 1.0
    assert s["f1"] == pytest.approx(7 / 9)
    assert s["hard_negatives"] == {"total": 1, "merged": 1, "share": 1.0, "merged_files": ["c0.jpg"]}
    assert s["partial_recall"] == 1.0
    dc = s["dup_count"]
    # true {4: 4, 2: 2, 1: 2} vs predicted {5: 5, 2: 2, 1: 1} (of 8): L1 = (4 + 5 + 0 + 1) / 8
    assert dc["l1"] == pytest.approx(1.25) and dc["tv"] == pytest.approx(0.625)
    assert dc["mae"] == pytest.approx((4 * 1 + 1 * 4) / 8)
    assert dc["mean_pred"] == pytest.approx((5 * 5 + 2 * 2) / 7)
    assert dc["mean_dup_pred"] == pytest.approx((5 * 4 + 2 * 1) / 7)


def test_copy_split_from_its_original() -> None:
    """Recall per edit asks for the original's cluster, not just any cluster of the group."""
    pred = {f: g for f, g, _, _ in ROWS} | {"a2.png": "x", "a3.webp": "x"}  # resize + partial apart
    s = score(_labels(), pred)
    assert _recalls(s) == {"exact": 1.0, "resize": 0.0, "crop": 1.0, "partial": 0.0}
    assert s["copy_recall"] == pytest.approx(2 / 4)
    assert s["pairs"] == {"true": 7, "predicted": 3, "true_positive": 3}  # {a0,a1}, {a2,a3}, {b0,b1}
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(3 / 7)


def test_pairwise_counts_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    n = 300
    groups = rng.integers(0, 60, n)
    rows = [(f"f{i}.jpg", int(g), "original" if i < 60 else "crop", -1) for i, g in enumerate(groups)]
    pred = {f"f{i}.jpg": int(c) for i, c in enumerate(rng.integers(0, 80, n)) if i % 7}
    s = score(_labels(rows), pred)
    cl = {f: pred.get(f, ("lone", f)) for f, _, _, _ in rows}
    true_pairs = pred_pairs = hit = 0
    for (f1, g1, _, _), (f2, g2, _, _) in itertools.combinations(rows, 2):
        t, p = g1 == g2, cl[f1] == cl[f2]
        true_pairs += t
        pred_pairs += p
        hit += t and p
    assert s["pairs"] == {"true": true_pairs, "predicted": pred_pairs, "true_positive": hit}


def test_labels_accept_rows_and_reject_duplicates() -> None:
    rows = [{"file": f, "group": g, "edit": e, "lookalike_of": lk} for f, g, e, lk in ROWS]
    assert score(rows, {f: g for f, g, _, _ in ROWS})["f1"] == 1.0
    with pytest.raises(ValueError, match="twice"):
        score(rows + rows[:1], {})


def test_parse_methods() -> None:
    presets = {"default": True, "strict": True, "aggressive": True, "ci": False}
    m = parse_method("dedup:t90=--threshold 0.9 --model sscd_distilled", presets)
    assert (m.name, m.kind, m.args) == ("dedup:t90", "dedup", ("--threshold", "0.9", "--model", "sscd_distilled"))
    assert m.slug == "dedup_t90"
    assert parse_method("dedup:strict", presets).args == ("--preset", "strict")
    assert parse_method("dedup:ci", presets).args == ("--preset", "ci")
    assert parse_method("imagehash:phash", presets).distance == quality.IMAGEHASH_DEFAULT_DISTANCE
    assert parse_method("imagehash:phash=6", presets).distance == 6
    assert parse_method("imagededup:ahash", presets).distance == 10
    assert parse_method("immaculate:sscd", presets).param == "sscd"
    for bad in ("dedup:nope", "immaculate:clip", "imagededup:cnn", "foo:bar", "dedup", "imagehash:phash=x"):
        with pytest.raises(ValueError):
            parse_method(bad, presets)
    names = [m.name for m in quality.default_methods(presets)]
    assert names[:3] == ["dedup:default", "dedup:strict", "dedup:aggressive"] and "dedup:ci" not in names


def test_bundled_presets_discovered() -> None:
    presets = quality.dedup_presets()
    assert {"default", "strict", "aggressive"} <= {p for p, d in presets.items() if d}
    assert presets.get("ci") is False  # a [gate] preset, for `dedup check`


def test_phash_clusters_chain_within_distance() -> None:
    pytest.importorskip("faiss")
    base = 0
    hashes = {
        "a": base.to_bytes(8, "big"),
        "b": (0b1111).to_bytes(8, "big"),  # 4 bits from a
        "c": (0b1111_1111).to_bytes(8, "big"),  # 4 bits from b, 8 from a: chained
        "d": (2**64 - 1).to_bytes(8, "big"),
    }
    got = quality.phash_clusters(hashes, 4)
    assert got["a"] == got["b"] == got["c"] != got["d"]
    got = quality.phash_clusters(hashes, 3)
    assert len(set(got.values())) == 4


def test_main_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole loop on 6 tiny images with the two fastest peers: children, assignment files,
    results.json and the tables."""
    pytest.importorskip("imagehash")
    pytest.importorskip("faiss")
    pytest.importorskip("immaculate")  # in the dev extra
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for g in range(3):
        img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((96, 96))
        img.save(data / "images" / f"g{g}.png")
        rows.append((f"g{g}.png", g, "original", -1))
        img.resize((64, 64)).save(data / "images" / f"g{g}r.jpg", quality=95)
        rows.append((f"g{g}r.jpg", g, "resize", -1))
    pq.write_table(_labels(rows), data / "labels.parquet")
    out = tmp_path / "out"
    rc = quality.main(
        ["--data", str(data), "--out", str(out), "--method", "imagehash:phash", "--method", "immaculate:pdq", "--repeat", "2"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "imagehash:phash" and results["repeat"] == 2  # no dedup method: the first
    # two rounds, the second backwards: pdq ran last then first; a throughput row per method
    order = re.findall(r"^run  (\S+) \(round (\d)/2\)", printed, re.M)
    assert order == [("imagehash:phash", "1"), ("immaculate:pdq", "1"), ("immaculate:pdq", "2"), ("imagehash:phash", "2")]
    table = printed.split("Throughput over 2 rounds", 1)[1]
    for name in ("imagehash:phash", "immaculate:pdq"):
        runs = results["methods"][name]["runs"]
        assert len(runs) == 2
        walls = sorted(r["wall_seconds"] for r in runs)
        assert results["methods"][name]["images_per_second"] == pytest.approx(6 / ((walls[0] + walls[1]) / 2))
        assert f"| {name} |" in table
    assert "| imagehash:phash | " in table and "1.00 1.00 | 1.00 |" in table  # the baseline against itself
    assert set(results["methods"]) == {"imagehash:phash", "immaculate:pdq"}
    for name, slug in (("imagehash:phash", "imagehash_phash"), ("immaculate:pdq", "immaculate_pdq")):
        r = results["methods"][name]
        assert r["error"] is None and r["score"]["images"] == 6
        assert r["score"]["recall_by_edit"]["resize"]["recall"] == 1.0  # a plain resize: both catch it
        assert pq.read_table(out / slug / "assignment.parquet").num_rows == 6
    assert results["machine"]["load_start"] and results["data"]["images"] == 6
