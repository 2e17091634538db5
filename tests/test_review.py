"""``dedup review``: the local page (driven in a real headless Chromium), its server's refusals,
decisions on disk, and the next run honouring them."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
from _data import encode_jpeg, natural_image
from PIL import Image
from typer.testing import CliRunner

from dedup.cli import app
from dedup.config import load_config
from dedup.decisions import DECISIONS_FILE, SAMPLE_FILE, read_decisions, record_decisions
from dedup.pipeline import run
from dedup.review import ReviewServer, build_queue, draw_sample

SAMPLE = Path(str(resources.files("dedup").joinpath("data", "sample")))
ARTIFACTS = Path(__file__).parent / "_artifacts"
runner = CliRunner()

# Hostile text: each would set a global if it ever ran as markup or script.
CAPTION = '<img src=x onerror="window.pwnedCaption=1"><script>window.pwnedScript=1</script>'
URL = "javascript:window.pwnedUrl=1"
URL2 = '"><img src=x onerror=window.pwnedUrl2=1>'
KEY = "k<img src=x onerror=pwnedKey=1>"  # no dot: webdataset keys end at the first one
NAME = "<svg onload=pwnedName=1>"
GLOBALS = ("pwnedCaption", "pwnedScript", "pwnedUrl", "pwnedUrl2", "pwnedKey", "pwnedName")


def _manifest(out: Path) -> dict[str, dict]:
    return {r["sample_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _hostile_sources(root: Path) -> list[str]:
    """A webdataset tar whose captions, URLs and keys are markup, and an image folder whose file
    names are: each holding an exact copy pair, the tar also a re-encoded copy."""
    wds = root / "wds"
    wds.mkdir(parents=True)
    one, two, three = (natural_image(s) for s in (11, 12, 13))
    members = [
        (f"{KEY}a", encode_jpeg(one), CAPTION, URL),
        (f"{KEY}b", encode_jpeg(one), CAPTION + " copy", URL2),
        ("plain", encode_jpeg(two), "a plain caption", "http://example.com/two.jpg"),
        ("reenc", encode_jpeg(two, quality=60), "re-encoded <b>bold?</b>", "http://example.com/two-b.jpg"),
    ]
    with tarfile.open(wds / "00000.tar", "w") as tar:
        for key, jpeg, caption, url in members:
            for ext, data in (("jpg", jpeg), ("txt", caption.encode()), ("json", json.dumps({"url": url, "caption": caption}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    folder = root / "imgs"
    folder.mkdir()
    jpeg = encode_jpeg(three)
    (folder / f"{NAME}.jpg").write_bytes(jpeg)
    (folder / f"{NAME} (2).jpg").write_bytes(jpeg)
    return [str(wds), str(folder)]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    root = tmp_path_factory.mktemp("hostile")
    sources = _hostile_sources(root)
    out = root / "out"
    run(sources, out, config=load_config("ci"))
    return sources, out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    result = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _copy(out: Path, to: Path) -> Path:
    shutil.copytree(out, to, ignore=shutil.ignore_patterns("decisions.*", SAMPLE_FILE, ".lock"))
    return to


@pytest.fixture
def server(hostile: tuple[list[str], Path], tmp_path: Path) -> Iterator[ReviewServer]:
    out = _copy(hostile[1], tmp_path / "out")
    srv = ReviewServer(out).start()
    try:
        yield srv
    finally:
        srv.close()


def _request(srv: ReviewServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})  # the path as given: no normalising
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The server's refusals
# --------------------------------------------------------------------------------------------


def test_server_refuses_without_the_token_and_outside_its_routes(server: ReviewServer) -> None:
    t = server.token
    assert urlsplit(server.url).hostname == "127.0.0.1"
    assert server.httpd.server_address[0] == "127.0.0.1"
    status, body, headers = _request(server, "GET", f"/{t}/")
    assert status == 200 and b"dedup review" in body
    assert "script-src 'nonce-" in headers["Content-Security-Policy"] and headers["Referrer-Policy"] == "no-referrer"
    for path in ("/", "/api/items", f"/{t[:-1]}/", f"/x{t}/api/items", "/../" + t + "/", f"/{t.upper()}/api/items"):
        assert _request(server, "GET", path)[0] == 403, path
    for path in (f"/{t}/../../etc/passwd", f"/{t}/img/../../manifest.parquet", f"/{t}/manifest.parquet",
                 f"/{t}/index/samples.parquet", f"/{t}/img/999999/a.jpg", f"/{t}/img/0/c.jpg", f"/{t}/img/-1/a.jpg",
                 f"/{t}/img/0/a.jpg/..", f"/{t}//etc/passwd", f"/{t}/%2e%2e/%2e%2e/etc/passwd"):  # fmt: skip
        assert _request(server, "GET", path)[0] == 404, path
    # DNS rebinding: a page of another origin that resolves to 127.0.0.1 sends its own Host
    assert _request(server, "GET", f"/{t}/api/items", headers={"Host": "evil.example"})[0] == 403
    post = json.dumps({"item": 0, "decision": "same"}).encode()
    assert _request(server, "POST", f"/{t}/api/decide", post, {"Content-Type": "text/plain"})[0] == 415
    assert _request(server, "POST", "/api/decide", post, {"Content-Type": "application/json"})[0] == 403
    for bad in (b"{", b'{"item": 0, "decision": "maybe"}', b'{"item": 99999, "decision": "same"}', b'{"item": true, "decision": "same"}'):
        assert _request(server, "POST", f"/{t}/api/decide", bad, {"Content-Type": "application/json"})[0] == 400
    assert _request(server, "DELETE", f"/{t}/api/decide")[0] == 405
    assert not (server.out / DECISIONS_FILE).exists()  # nothing refused was recorded


def test_items_and_images_come_from_the_run(server: ReviewServer) -> None:
    status, body, headers = _request(server, "GET", f"/{server.token}/api/items")
    assert status == 200 and headers["Content-Type"] == "application/json"
    items = json.loads(body)["items"]
    ids = {i["a"]["id"] for i in items} | {i["b"]["id"] for i in items}
    assert any(KEY in i for i in ids) and any(NAME in i for i in ids)
    assert b"<img" not in body  # JSON escapes markup characters (\u003c): safe even inside a page
    status, jpeg, headers = _request(server, "GET", f"/{server.token}/img/{items[0]['index']}/a.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg)).size[0] > 0


# --------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); .ci/run installs it")


@pytest.mark.slow
def test_review_page_in_headless_chromium(hostile: tuple[list[str], Path], tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    sources, first = hostile
    out = _copy(first, tmp_path / "out")
    before = _manifest(out)
    srv = ReviewServer(out).start()
    dialogs: list[str] = []
    console: list[str] = []
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=_chromium(),  # Debian's chromium: playwright downloads no browser
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
            )  # fmt: skip
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("console", lambda m: console.append(m.text))
            page.goto(srv.url)
            page.wait_for_function("() => document.getElementById('why').textContent.length > 0")
            items = json.loads(_request(srv, "GET", f"/{srv.token}/api/items")[1])["items"]
            assert len(items) >= 3

            def shown() -> tuple[str, str]:
                return (page.text_content("#meta-a") or "", page.text_content("#meta-b") or "")

            def wait_decided(k: int) -> None:
                page.wait_for_function(f"() => document.getElementById('progress').textContent.startsWith('{k} decided')")

            # Hostile text shows as text, and nothing of it ran.
            page.wait_for_function("() => document.getElementById('img-a').complete && document.getElementById('img-a').naturalWidth > 0")
            texts = [t for i in items for t in (i["a"]["caption"] or "", i["b"]["caption"] or "")]
            assert CAPTION in texts
            first_item = items[0]
            assert first_item["a"]["id"] in shown()[0] and first_item["b"]["id"] in shown()[1]
            assert KEY in shown()[0] and CAPTION in shown()[0] and URL in shown()[0]  # as text
            page.wait_for_function("() => document.getElementById('img-b').complete")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "review.png"), full_page=True)  # the hostile pair, as text
            # 1: the key "d" marks the first pair different
            page.keyboard.press("d")
            wait_decided(1)
            # 2: the button marks the second pair same
            second = shown()
            page.click("#same")
            wait_decided(2)
            # close and reopen: the decided pairs are not shown again
            page.reload()
            wait_decided(2)
            third = shown()
            assert third != second and items[2]["a"]["id"] in third[0]
            page.keyboard.press("k")
            wait_decided(3)
            # the rest, until nothing is left
            while page.is_visible("#card"):
                n = int(page.text_content("#progress").split()[0])
                page.keyboard.press("k")
                wait_decided(n + 1)
            assert page.is_visible("#done")
            ran = page.evaluate(f"() => [{', '.join(f'typeof window.{g} !== \"undefined\"' for g in GLOBALS)}]")
            assert ran == [False] * len(GLOBALS), dict(zip(GLOBALS, ran, strict=True))
            # a fetch without the token, or outside the run, is refused from the page too
            assert page.evaluate("() => fetch('/api/items').then(r => r.status)") == 403
            assert page.evaluate("() => fetch('img/0/../../manifest.parquet').then(r => r.status)") == 404  # resolves to /<token>/manifest.parquet
            browser.close()
    finally:
        srv.close()
    assert dialogs == []
    assert not [c for c in console if "Content Security Policy" in c and "pwned" in c]

    # On disk: one row per pair, first different, second same, the rest skipped.
    decided = read_decisions(out / DECISIONS_FILE).to_pylist()
    by_pair = {(d["a_id"], d["b_id"]): d["decision"] for d in decided}
    assert len(decided) == len(items)
    key = lambda i: tuple(sorted((i["a"]["id"], i["b"]["id"])))  # noqa: E731
    assert by_pair[key(items[0])] == "different" and by_pair[key(items[1])] == "same"
    assert all(by_pair[key(i)] == "skip" for i in items[2:])

    # The next run splits the pair marked different; the rest stays as it was.
    run(sources, out, config=load_config("ci"))
    after = _manifest(out)
    a, b = key(items[0])
    assert before[a]["cluster_id"] == before[b]["cluster_id"]
    assert after[a]["cluster_id"] != after[b]["cluster_id"]
    assert after[a]["keep"] and after[b]["keep"]
    assert sorted((after[a]["reason"], after[b]["reason"])) == ["reviewed", "unique"]  # the one it had dropped says why
    changed = {s for s in after if after[s]["cluster_id"] != before[s]["cluster_id"] or after[s]["keep"] != before[s]["keep"]}
    assert changed <= {a, b}
    report = json.loads((out / "report.json").read_text())
    assert report["review"]["decisions"]["different"] == 1


def test_screenshot_shows_the_page() -> None:
    """Runs after the browser test (file order): the saved screenshot is a drawn page."""
    shot = ARTIFACTS / "review.png"
    if not shot.exists():
        pytest.skip("the browser test did not run")
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), np.float32)
    assert grey.std() > 20


# --------------------------------------------------------------------------------------------
# Decisions honoured by the next run (the bundled sample)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_splits_and_merges_as_decided_and_decisions_travel(demo_run: Path, tmp_path: Path) -> None:
    out = _copy(demo_run, tmp_path / "out")
    before = _manifest(out)
    clusters: dict[int, list[str]] = {}
    for sid, r in before.items():
        if r["status"] == "ok":
            clusters.setdefault(r["cluster_id"], []).append(sid)
    big = next(sorted(m) for c, m in sorted(clusters.items()) if len(m) == 2)
    singles = sorted(m[0] for m in clusters.values() if len(m) == 1)[:2]
    record_decisions(out / DECISIONS_FILE, [
        {"a_id": big[0], "b_id": big[1], "decision": "different"},
        {"a_id": singles[0], "b_id": singles[1], "decision": "same"},
    ])  # fmt: skip
    result = runner.invoke(app, ["run", str(SAMPLE), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    after = _manifest(out)
    assert after[big[0]]["cluster_id"] != after[big[1]]["cluster_id"]
    assert after[big[0]]["keep"] and after[big[1]]["keep"]
    u, v = (after[s] for s in singles)
    assert u["cluster_id"] == v["cluster_id"] and u["cluster_size"] == 2
    dropped = v if u["keep"] else u
    assert dropped["reason"] == "reviewed" and dropped["signal"] == "reviewed" and dropped["similarity"] == 1.0
    assert sorted(r["reason"] for r in after.values() if r["reason"] == "reviewed") == ["reviewed"] * 2
    # everything else as before
    for sid, r in before.items():
        if sid not in (*big, *singles):
            assert (after[sid]["cluster_id"], after[sid]["keep"]) == (r["cluster_id"], r["keep"]), sid
    report = json.loads((out / "report.json").read_text())
    assert report["review"]["decisions"] == {"same": 1, "different": 1, "skip": 0}
    assert "Reviewed links" in (out / "report.html").read_text()

    # Carried to another output folder (--decisions): the same manifest, byte for byte.
    other = _copy(demo_run, tmp_path / "other")
    result = runner.invoke(app, ["run", str(SAMPLE), "--out", str(other), "--decisions", str(out / DECISIONS_FILE), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (other / "manifest.parquet").read_bytes() == (out / "manifest.parquet").read_bytes()
    missing = runner.invoke(app, ["run", str(SAMPLE), "--out", str(other), "--decisions", str(tmp_path / "nope.parquet")])
    assert missing.exit_code == 2 and "decisions file" in missing.output and "not found" in missing.output

    # and to an index that grows (index add --decisions): the split holds after the add
    grown = _copy(demo_run, tmp_path / "grown")
    drop = tmp_path / "drop"
    drop.mkdir()
    natural_image(901, (96, 72)).save(drop / "new.jpg", quality=90)
    plain = _copy(demo_run, tmp_path / "plain")
    for folder, extra in ((grown, ["--decisions", str(out / DECISIONS_FILE)]), (plain, [])):
        result = runner.invoke(app, ["index", "add", str(drop), "--index", str(folder), *extra, "--quiet"])
        assert result.exit_code == 0, result.output
    grown_rows, plain_rows = ({sid.removeprefix("s0/"): r for sid, r in _manifest(f).items()} for f in (grown, plain))
    assert grown_rows[big[0]]["cluster_id"] != grown_rows[big[1]]["cluster_id"]
    assert plain_rows[big[0]]["cluster_id"] == plain_rows[big[1]]["cluster_id"]  # without the file: together


@pytest.mark.slow
def test_sample_precision_and_the_cli(demo_run: Path, tmp_path: Path) -> None:
    out = _copy(demo_run, tmp_path / "out")
    drawn = draw_sample(out, 12)
    assert drawn.num_rows == 12
    assert draw_sample(out, 12).to_pylist() == drawn.to_pylist()  # deterministic
    strata = {(s, b) for s, b in zip(drawn.column("signal").to_pylist(), drawn.column("band").to_pylist(), strict=True)}
    assert len(strata) >= 3
    queue = build_queue(out)
    assert [i.why.startswith("sample:") for i in queue[:12]] == [True] * 12

    # The command: prints the URL, serves decisions, and on Ctrl+C refreshes the report.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dedup.cli", "review", str(out), "--sample", "12", "--no-open"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        url = ""
        deadline = time.monotonic() + 120
        lines = []
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("review page: "):
                url = line.split(": ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:"), lines
        parts = urlsplit(url)
        conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)
        conn.request("GET", parts.path + "api/items")
        items = json.loads(conn.getresponse().read())["items"]
        for n, it in enumerate(items[:12]):
            verdict = "different" if n == 0 else "same"
            conn.request("POST", parts.path + "api/decide", body=json.dumps({"item": it["index"], "decision": verdict}),
                         headers={"Content-Type": "application/json"})  # fmt: skip
            assert conn.getresponse().read()
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "decided: 11 same · 1 different" in stdout
    assert "precision" in stdout
    report = json.loads((out / "report.json").read_text())
    bands = report["review"]["precision"]["bands"]
    assert sum(b["decided"] for b in bands) == 12 and sum(b["different"] for b in bands) == 1
    assert "Measured precision" in (out / "report.html").read_text()


def test_review_of_a_folder_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["review", str(tmp_path), "--no-open"])
    assert result.exit_code == 2
    assert "has no manifest.parquet" in result.output and "dedup run" in result.output


@pytest.mark.slow
def test_check_honours_the_baselines_decisions(demo_run: Path, tmp_path: Path) -> None:
    """A drop checked against a reviewed baseline: a copy of a sample marked different from
    it is not counted as its duplicate; an image marked same as a baseline sample is."""
    import hashlib

    from dedup.check import check

    base = _copy(demo_run, tmp_path / "base")
    rows = _manifest(base)
    single = sorted(s for s, r in rows.items() if r["status"] == "ok" and r["cluster_size"] == 1)[0]
    tar_name, key = single.split("/")
    with tarfile.open(SAMPLE / tar_name) as tar:
        copy = tar.extractfile(f"{key}.jpg").read()  # type: ignore[union-attr]
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "copy.jpg").write_bytes(copy)
    new = encode_jpeg(natural_image(77))
    (drop / "new.jpg").write_bytes(new)
    plain = check(str(drop), base, work=tmp_path / "w1")
    assert plain.duplicating_baseline == 1  # the copy

    other = sorted(s for s, r in rows.items() if r["status"] == "ok" and s != single)[0]
    record_decisions(base / DECISIONS_FILE, [
        # a copy of `single` (found by its bytes' hash) is not the baseline's `single`
        {"a_id": "elsewhere/copy", "a_sha256": hashlib.sha256(copy).digest(), "b_id": single, "decision": "different"},
        # the new image is the same as `other`
        {"a_id": "elsewhere/new", "a_sha256": hashlib.sha256(new).digest(), "b_id": other, "decision": "same"},
    ])  # fmt: skip
    reviewed = check(str(drop), base, work=tmp_path / "w2")
    assert reviewed.duplicating_baseline == 1
    assert reviewed.baseline_links_by_signal == {"reviewed": 1}
    assert [(m.sample_id, m.match_id) for m in reviewed.baseline_matches] == [("new.jpg", other)]


def test_partial_copy_region_is_outlined() -> None:
    """A picture pasted into a larger scene: the scene's thumbnail outlines where it lies."""
    from dedup.review.server import THUMB_SIZE, _partial_thumbnails
    from dedup.report.thumbs import make_thumbnail

    picture = natural_image(5, (240, 180))
    scene = natural_image(6, (640, 480))
    scene.paste(picture, (300, 200))
    a, b = encode_jpeg(picture, 95), encode_jpeg(scene, 95)
    thumbs = _partial_thumbnails(a, b)

    def outline_pixels(jpeg: bytes | None) -> np.ndarray:
        assert jpeg is not None
        px = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int32)
        return (px[..., 0] > 180) & (px[..., 1] < 60) & (px[..., 2] < 110)

    drawn = outline_pixels(thumbs["b"]) & ~outline_pixels(make_thumbnail(b, THUMB_SIZE))
    assert drawn.sum() > 200
    ys, xs = np.nonzero(drawn)
    scale = THUMB_SIZE / 640  # the scene's thumbnail: 384 x 288; the pasted picture at 180..324 x 120..228
    # within 15 px (4% of the thumbnail): RANSAC's fit is a few pixels off at the far corner
    assert abs(xs.min() - 300 * scale) < 15 and abs(xs.max() - 540 * scale) < 15
    assert abs(ys.min() - 200 * scale) < 15 and abs(ys.max() - 380 * scale) < 15
    assert not (outline_pixels(thumbs["a"]) & ~outline_pixels(make_thumbnail(a, THUMB_SIZE))).sum() > 20
    assert _partial_thumbnails(a, None)["b"] is None  # a side that cannot be read has no picture


@pytest.mark.slow
def test_index_add_honours_decisions_across_renamed_ids(hostile: tuple[list[str], Path], tmp_path: Path) -> None:
    """`dedup index add` of a second source renames the first's ids (``s0/`` prefix): the
    decisions still hold, found by the SHA-256 the page recorded with them."""
    from dedup.add import add
    from dedup.store import open_index

    sources, _ = hostile
    out = tmp_path / "out"
    run(sources[:1], out, config=load_config("ci"))
    before = _manifest(out)
    pair = sorted(s for s in before if KEY in s)
    assert len(pair) == 2 and before[pair[0]]["cluster_id"] == before[pair[1]]["cluster_id"]
    index = open_index(out, columns=["sample_id", "sha256"])
    sha = dict(zip(index.samples.column("sample_id").to_pylist(), index.samples.column("sha256").to_pylist(), strict=True))
    record_decisions(out / DECISIONS_FILE, [
        {"a_id": pair[0], "b_id": pair[1], "a_sha256": sha[pair[0]], "b_sha256": sha[pair[1]], "decision": "different"},
    ])  # fmt: skip
    run(sources[:1], out, config=load_config("ci"))
    split = _manifest(out)
    assert split[pair[0]]["cluster_id"] != split[pair[1]]["cluster_id"]

    added = add(sources[1:], out)
    assert added.added_shards == 1
    after = _manifest(out)
    renamed = sorted(s for s in after if KEY in s)
    assert renamed == [f"s0/{p}" for p in pair]  # the ids changed...
    assert after[renamed[0]]["cluster_id"] != after[renamed[1]]["cluster_id"]  # ...the decision held
    assert {after[r]["reason"] for r in renamed} == {"unique", "reviewed"}
