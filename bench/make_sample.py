"""Regenerate ``dedup/data/sample/``: the tiny img2dataset output that ships with the package.

``dedup demo`` runs on it with no network. It is made the way real data is made: public-domain
openclipart drawings (Debian's ``openclipart-png``, see ``realdata.py``) as small JPEGs, planted
copies (exact byte copies under other URLs, and edited copies: one of every edit in
``tests/_data.py``), two URLs that answer 404 and one that serves undecodable bytes, all served
over loopback and downloaded by the real img2dataset into two webdataset shards. img2dataset
refuses undecodable bytes (a ``failed_to_resize`` row, no tar member), so those bytes are then
injected into their tar and the sidecar row updated to match: the shipped shard holds exactly
one corrupt image for the decoder to fail on.

    python bench/make_sample.py            # rewrites dedup/data/sample/ (needs apt or OPENCLIPART_DEB)
    python bench/make_sample.py --out /tmp/sample

Also writes ``ground_truth.json`` (img2dataset key → group, kind, url, source drawing) and a
``README.md``. The whole folder stays under 2 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "bench", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from _data import EDIT_NAMES, heavy_tailed_copies, plant_copies, serve_and_download  # noqa: E402
from realdata import clipart_caption, clipart_jpeg, clipart_name, distinct_originals, fetch_openclipart  # noqa: E402

DEFAULT_OUT = REPO / "dedup" / "data" / "sample"
N_ORIGINALS = 60
N_COPIES = 16
PER_SHARD = 40
MAX_SIDE = 256
QUALITY = 85
SEED = 2024
MAX_BYTES = 2_000_000
# Every edit at least once, and exact copies, which LAION is full of.
COPY_KINDS = ("exact", "exact", *EDIT_NAMES, "exact", "jpeg", "resize", "text", "exact", "crop")


def make_sample(out: Path, *, seed: int = SEED) -> dict[str, int]:
    """Build the sample into ``out`` (replacing the files it generated before); return counts."""
    paths = distinct_originals(fetch_openclipart(), N_ORIGINALS, seed)
    originals = [clipart_jpeg(p, max_side=MAX_SIDE, quality=QUALITY) for p in paths]
    rng = np.random.default_rng(seed)
    copies = heavy_tailed_copies(N_ORIGINALS, N_COPIES, rng)
    items = plant_copies(
        originals,
        copies,
        rng,
        n_missing=2,
        n_corrupt=1,
        prefix="clipart",
        captions=[clipart_caption(p) for p in paths],
        copy_kinds=COPY_KINDS,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result, truth = serve_and_download(items, tmp, rng, number_sample_per_shard=PER_SHARD, inject_corrupt=True)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            if old.is_file() and (old.suffix in (".tar", ".parquet", ".json") or old.name == "README.md"):
                old.unlink()
        for f in sorted(result.out_dir.iterdir()):
            shutil.copy2(f, out / f.name)

    keys = {
        r["url"]: r["key"]
        for p in sorted(out.glob("*.parquet"))
        for r in pq.read_table(p, columns=["key", "url"]).to_pylist()
    }
    source = {it.url: clipart_name(paths[it.group]) for it in items if it.group < len(paths)}
    ground = {
        keys[url]: {"group": truth[url], "kind": truth.kind[url], "url": url, "source": source.get(url)}
        for url in truth
    }
    (out / "ground_truth.json").write_text(json.dumps(dict(sorted(ground.items())), indent=1) + "\n")
    counts = Counter(truth.kind.values())
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    (out / "README.md").write_text(_readme(out, ground, counts, size))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    if size > MAX_BYTES:
        raise RuntimeError(f"the sample is {size} bytes, over the {MAX_BYTES} budget; lower MAX_SIDE or QUALITY")
    return {"rows": len(truth), "bytes": size, **counts}


def _readme(out: Path, ground: Mapping[str, Mapping[str, object]], counts: Counter[str], size: int) -> str:
    n_copies = sum(v for k, v in counts.items() if k not in ("original", "missing", "corrupt"))
    failed = [k for k, g in ground.items() if g["kind"] == "missing"]
    corrupt = [k for k, g in ground.items() if g["kind"] == "corrupt"]
    groups = Counter(int(str(g["group"])) for g in ground.values() if g["kind"] not in ("missing", "corrupt"))
    sizes = sorted((n for n in groups.values() if n > 1), reverse=True)
    shards = sorted(p.name for p in out.glob("*.tar"))
    kinds = ", ".join(f"{k} {counts[k]}" for k in ("exact", *EDIT_NAMES) if counts[k])
    return f"""# Bundled sample

A tiny [img2dataset](https://github.com/rom1504/img2dataset) output for `dedup demo` and the
tests: {len(ground)} samples in {len(shards)} webdataset shards ({", ".join(shards)}, each with its
sidecar `.parquet` and `_stats.json`), about {size / 1e6:.1f} MB in all.

## What is in it

* {counts["original"]} distinct drawings (JPEG, longest side at most {MAX_SIDE} px, on white).
* {n_copies} planted copies of {len(sizes)} of them (groups of {", ".join(str(s) for s in sizes)} samples):
  {kinds}.
  Exact copies are the same bytes under another URL; the others are edits
  (`tests/_data.py::edited_copies`). Copies often carry shop-style captions
  ("Canvas Wall Art Print ...").
* 2 failed downloads (HTTP 404): keys {", ".join(failed)}. They have a sidecar row with
  `status = "failed_to_download"` and no member in the tar, as img2dataset writes them.
* 1 corrupt image: key {", ".join(corrupt)}. img2dataset itself refuses undecodable bytes
  (`failed_to_resize`); these bytes were injected into the tar afterwards, the sidecar row set
  to `status = "success"` with null width/height (as img2dataset writes with
  `disable_all_reencoding=True`) and `_stats.json` counted it as a success. Its `.jpg` starts
  like a JPEG (SOI + JFIF header) and does not decode.
* LAION columns in the sidecars: `caption`, `url`, `WIDTH`, `HEIGHT`, `similarity`, `punsafe`,
  `pwatermark`, `AESTHETIC_SCORE`; copies have scores near their original's.

URLs are on reserved example domains (`*.example.com/.net/.org`): the files were served by a
loopback HTTP server that img2dataset used as its proxy. They do not resolve.

`ground_truth.json` maps every key to its `group` (copies share their original's group), `kind`
(`original`, `exact`, an edit name, `missing`, `corrupt`), `url`, and `source` (the drawing's
path in the Debian package).

## Where the images come from

[Openclipart](https://openclipart.org) drawings as packaged by Debian in
[`openclipart-png`](https://packages.debian.org/bookworm/openclipart-png) (version 1:0.18+dfsg).
Openclipart's authors dedicated every drawing to the public domain (Creative Commons Public
Domain Dedication; see `/usr/share/doc/openclipart-png/copyright` in the package).

## Regenerate

    python bench/make_sample.py

It runs `apt-get download openclipart-png` (cached under `bench/data/`; or set
`OPENCLIPART_DEB=/path/to/openclipart-png.deb`), picks {N_ORIGINALS} distinct drawings with seed
{SEED}, and runs img2dataset (version {version("img2dataset")} made this copy) over loopback (`resize_mode="no"`,
`skip_reencode=True`, so JPEGs are stored byte for byte). A rerun gives the same images, URLs,
keys and sidecar rows; only the order of tar members and sidecar rows (download order), tar
timestamps and the timings in `_stats.json` vary.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options and build the sample."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default: dedup/data/sample)")
    ap.add_argument("--seed", type=int, default=SEED)
    opts = ap.parse_args(argv)
    counts = make_sample(opts.out, seed=opts.seed)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
