"""report.json's analysis (duplicate counts, largest clusters, caption phrases) and report.html:
self-contained, escaped, and rendered by a real headless Chromium (screenshot in tests/_artifacts/)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image
from typer.testing import CliRunner

from dedup.cli import app
from dedup.config import ReportConfig, RunConfig, load_config
from dedup.report import rerender
from dedup.report.html import render
from dedup.report.phrases import key_phrases, phrases_of
from dedup.report.thumbs import THUMBS_FILE, read_thumbnails

SAMPLE = Path(str(resources.files("dedup").joinpath("data", "sample")))
ARTIFACTS = Path(__file__).parent / "_artifacts"
runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `dedup demo` writes."""
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    result = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------------------------
# Caption phrases
# --------------------------------------------------------------------------------------------


def test_phrases_start_and_end_with_content_words() -> None:
    got = phrases_of("Buy a Canvas Print of the Lake, online!")
    assert {"buy", "canvas", "canvas print", "lake", "online", "print", "lake online"} <= got
    assert "print of the" not in got and "of the lake" not in got and "a canvas" not in got
    assert "canvas print of" not in got
    assert phrases_of(None) == set() and phrases_of("") == set()
    assert phrases_of("Ünïcode CAFÉ") == {"ünïcode", "café", "ünïcode café"}


def test_key_phrases_support_lift_and_order() -> None:
    captions = [
        "Canvas Wall Art Print sunset", "Canvas Wall Art Print sunset",  # cluster 1
        "canvas wall art print dog",  # cluster 2
        "a dog", "a dog",  # cluster 3
        "sunset photo", "dog photo", "a cat", "sunset", "a bird",  # singletons
    ]
    cluster = [1, 1, 2, 3, 3, 10, 11, 12, 13, 14]
    dup = [c in (1, 2, 3) for c in cluster]
    sec = key_phrases(captions, cluster, dup, min_support=2, min_clusters=2, limit=10)
    assert sec["unit"] == "sample" and sec["samples"] == 10 and sec["duplicate_samples"] == 5
    rows = {r["phrase"]: r for r in sec["phrases"]}
    # "canvas wall art print" is in 3 of 5 duplicates and 3 of 10 samples: lift 2. Its 3-word
    # windows come first (a tie, broken by the phrase); the shorter phrases inside them have the
    # same counts and are folded into them.
    assert [r["phrase"] for r in sec["phrases"][:2]] == ["canvas wall art", "wall art print"]
    assert rows["canvas wall art"] == {"phrase": "canvas wall art", "words": 3, "support": 3, "clusters": 2, "count": 3, "lift": 2.0}
    assert not {"canvas", "print", "art", "wall art", "canvas wall"} & set(rows)
    # "dog": 3 of 5 duplicates (clusters 2 and 3), 4 of 10 samples: lift 1.5
    assert rows["dog"] == {"phrase": "dog", "words": 1, "support": 3, "clusters": 2, "count": 4, "lift": 1.5}
    # "sunset" is in one duplicate cluster only: left out however often it appears
    assert "sunset" not in rows
    lifts = [(-r["lift"], -r["support"], r["phrase"]) for r in sec["phrases"]]
    assert lifts == sorted(lifts)
    again = key_phrases(list(reversed(captions)), list(reversed(cluster)), list(reversed(dup)),
                        min_support=2, min_clusters=2, limit=10)
    assert again == sec  # the order of the input does not matter


def test_key_phrases_without_duplicates() -> None:
    sec = key_phrases(["a", "b"], [0, 1], [False, False])
    assert sec["phrases"] == [] and sec["duplicate_samples"] == 0


# --------------------------------------------------------------------------------------------
# report.json of the demo
# --------------------------------------------------------------------------------------------


def test_report_json_has_the_papers_analysis(demo: Path) -> None:
    report = json.loads((demo / "report.json").read_text())
    m = pl.read_parquet(demo / "manifest.parquet").filter(pl.col("status") == "ok")
    dup = (m["cluster_size"] - 1).to_numpy()
    hist = dict(map(tuple, report["duplicate_count_histogram"]))
    assert hist == {int(d): int((dup == d).sum()) for d in np.unique(dup)}
    assert report["duplicate_count"]["all_samples"]["mean"] == pytest.approx(dup.mean(), abs=1e-6)
    assert report["duplicate_count"]["samples_with_duplicates"]["mean"] == pytest.approx(dup[dup > 0].mean())

    clusters = report["largest_clusters"]
    cfg = ReportConfig()
    assert 0 < len(clusters) <= cfg.top_clusters
    assert [c["size"] for c in clusters] == sorted((c["size"] for c in clusters), reverse=True)
    for c in clusters:
        members = m.filter(pl.col("cluster_id") == c["cluster_id"])
        assert c["size"] == members.height > 1
        assert c["samples"][0]["reason"] == "representative"
        assert {s["sample_id"] for s in c["samples"]} <= set(members["sample_id"].to_list())
        assert sum(c["signals"].values()) == c["size"] - 1

    phrases = report["caption_phrases"]
    assert phrases["unit"] == "sample" and phrases["duplicate_samples"] == int((dup > 0).sum())
    for p in phrases["phrases"]:
        assert p["lift"] > 1 and p["support"] >= phrases["min_support"] and p["clusters"] >= phrases["min_clusters"]
    # The sample's shop captions ("Canvas Wall Art Print ...", "Buy ... Canvas Print Online") are
    # what duplicates carry more often than the rest.
    assert {"canvas", "print"} & {p["phrase"] for p in phrases["phrases"]}


def test_thumbnails_are_embedded_and_kept_for_rerender(demo: Path) -> None:
    report = json.loads((demo / "report.json").read_text())
    shown = {s["sample_id"] for c in report["largest_clusters"] for s in c["samples"]}
    thumbs = read_thumbnails(demo / THUMBS_FILE)
    assert set(thumbs) == shown
    for jpeg in thumbs.values():
        im = Image.open(io.BytesIO(jpeg))
        assert im.format == "JPEG" and max(im.size) <= ReportConfig().thumb_size
    page = (demo / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == len(shown)

    (demo / "report.html").unlink()
    result = runner.invoke(app, ["report", str(demo)])
    assert result.exit_code == 0, result.output
    assert (demo / "report.html").read_text() == page  # same bytes, thumbnails included, no source read


def test_html_images_are_valid_and_nothing_is_fetched(demo: Path) -> None:
    page = (demo / "report.html").read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    srcs = re.findall(r'\ssrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:") for s in srcs)
    svgs = [s for s in srcs if s.startswith("data:image/svg+xml;base64,")]
    assert len(svgs) == 2  # histogram and CCDF
    for s in svgs:
        root = ET.fromstring(base64.b64decode(s.split(",", 1)[1]))
        assert root.tag.endswith("svg")
    for s in srcs:
        if s.startswith("data:image/jpeg"):
            Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    for href in re.findall(r'\shref="([^"]*)"', page):
        assert href.startswith(("http://", "https://")), href
    assert "Content-Security-Policy" in page


def _hostile_report(demo: Path) -> dict:  # type: ignore[type-arg]
    report = json.loads((demo / "report.json").read_text())
    smp = report["largest_clusters"][0]["samples"][0]
    smp["caption"] = '<script>alert(1)</script><img src=x onerror=alert(2)> "quoted" & more'
    smp["url"] = "javascript:alert(3)"
    report["largest_clusters"][0]["samples"][1]["url"] = 'http://e.com/"><script>alert(4)</script>'
    report["largest_clusters"][0]["samples"][1]["sample_id"] = "<b>id</b>"
    report["caption_phrases"]["phrases"].append(
        {"phrase": "<i>x</i>", "words": 1, "support": 3, "clusters": 2, "count": 3, "lift": 1.1}
    )
    report["failures"]["<marquee>"] = 1
    return report


def test_untrusted_text_is_escaped(demo: Path) -> None:
    page = render(_hostile_report(demo))
    assert "<script" not in page and "<img src=x" not in page and "<marquee>" not in page
    assert "<b>id</b>" not in page and "<i>x</i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'href="javascript:' not in page
    assert "&lt;marquee&gt;" in page


def test_render_is_deterministic_and_handles_an_old_report(demo: Path) -> None:
    report = json.loads((demo / "report.json").read_text())
    assert render(report) == render(report)
    for key in ("largest_clusters", "caption_phrases", "duplicate_count_histogram"):
        report.pop(key)
    page = render(report)
    assert "<h1>dedup report</h1>" in page and "predates" in page


def test_no_thumbnails_when_sources_are_gone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data)
    out = tmp_path / "out"
    cfg = load_config("ci")
    from dedup.pipeline import run

    run([str(data)], out, config=cfg)
    shutil.rmtree(data)
    (out / THUMBS_FILE).unlink()
    assert rerender(out) == out / "report.html"
    page = (out / "report.html").read_text()
    assert "image not available" in page and "data:image/jpeg" not in page


def test_report_config_limits(tmp_path: Path) -> None:
    cfg = load_config("ci").with_overrides({"report.top_clusters": 2, "report.thumbs_per_cluster": 1})
    assert isinstance(cfg, RunConfig) and cfg.report.top_clusters == 2
    from dedup.pipeline import run

    result = run([str(SAMPLE)], tmp_path / "out", config=cfg)
    clusters = result.report["largest_clusters"]
    assert len(clusters) == 2 and all(len(c["samples"]) == 1 for c in clusters)
    assert len(read_thumbnails(tmp_path / "out" / THUMBS_FILE)) == 2


# --------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); .ci/run installs it")


def _browse(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in a headless Chromium, offline habits on, console logged to stderr."""
    args: Sequence[str] = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}",
        "--enable-logging=stderr", "--v=0", *extra, page.resolve().as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=180, check=False, cwd=tmp)


def _console(stderr: str) -> list[str]:
    """Console messages (errors, CSP refusals of any external request) from Chromium's log."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_in_headless_chromium(demo: Path, tmp_path: Path) -> None:
    page = demo / "report.html"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    done = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _console(done.stderr) == []
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        grey = np.asarray(im.convert("L"), np.float32)
    assert grey.std() > 20  # figures and thumbnails drew something, not a blank page
    assert (grey < 128).mean() > 0.02

    dom = _browse(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == []
    html = dom.stdout
    assert "<h1>dedup report</h1>" in html
    assert html.count('class="cluster"') == len(json.loads((demo / "report.json").read_text())["largest_clusters"])
    for heading in ("How duplicated is the set?", "The paper's statistics", "Caption phrases", "Thresholds used"):
        assert heading in html


def test_chromium_check_catches_a_page_that_fetches(demo: Path, tmp_path: Path) -> None:
    """The harness is not vacuous: an external image is refused by the page's CSP and logged."""
    bad = tmp_path / "bad.html"
    bad.write_text((demo / "report.html").read_text().replace(
        "<h1>dedup report</h1>", '<h1>dedup report</h1><img src="http://127.0.0.1:9/x.png">'))
    done = _browse(bad, tmp_path, "--dump-dom")
    assert any("Content Security Policy" in line for line in _console(done.stderr))
