"""Coverage-guided fuzzing (atheris / libFuzzer) of the readers a scraped shard reaches first.

The first byte of an input picks the target, the rest is its file:

  0  a webdataset ``.tar`` (read_webdataset)          2  an image (fingerprint: decode + hashes)
  1  a ``.tar`` with a sidecar ``.parquet``           3  img2dataset ``parquet`` output

Every target must return normally whatever the bytes: damage is a failed row, never an
exception. A crash (any exception, a hang past ``-timeout``, memory past ``-rss_limit_mb``) is
written to ``-artifact_prefix`` and the run exits non-zero.

Run briefly by ``tests/test_fuzz.py`` (marker ``fuzz``), or by hand for longer::

    .venv/bin/python tests/fuzz/fuzz_readers.py -max_total_time=600 corpus/
    .venv/bin/python tests/fuzz/fuzz_readers.py --make-seeds corpus/   # the seed corpus

``-max_total_time`` bounds the run; a folder argument is the corpus (seeds in, finds out).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["dedup", "tarfile", "PIL"]):
    import fsspec
    from PIL import Image  # noqa: F401  (instrumented: its header parsers are Python)

    from dedup._types import Shard, ShardKind
    from dedup.config import FingerprintConfig
    from dedup.fingerprint import fingerprint
    from dedup.sources import read_shard

_FS = fsspec.filesystem("memory")
_ROOT = "/dedup-fuzz"
# A small pixel limit keeps each input cheap (a 4000x4000 image is legal but slow to hash).
_CFG = FingerprintConfig(max_pixels=1 << 20)


def _check_samples(samples: list) -> None:  # type: ignore[type-arg]
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise AssertionError(f"duplicate sample ids: {ids}")
    for s in samples:
        for text in (s.sample_id, s.key, s.url, s.caption, s.error):
            if text is not None:
                text.encode("utf-8")
        if s.status == "failed" and (not s.error or "\n" in s.error):
            raise AssertionError(f"bad error line: {s.error!r}")


def _read(name: str, kind: ShardKind) -> None:
    shard = Shard(f"memory://{_ROOT}", f"memory://{_ROOT}/{name}", kind, name, "fuzz")
    _check_samples(list(read_shard(shard)))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target, body = data[0] % 4, data[1:]
    _FS.store.clear()
    if target in (0, 1):
        if target == 1:  # the sidecar is the tail after the last b"PAR1" boundary, if any
            cut = body.rfind(b"PAR1", 0, max(0, len(body) - 4))
            tar, sidecar = (body[:cut], body[cut:]) if cut > 0 else (body, b"")
            _FS.pipe(f"{_ROOT}/00000.parquet", sidecar)
        else:
            tar = body
        _FS.pipe(f"{_ROOT}/00000.tar", tar)
        _read("00000.tar", ShardKind.WEBDATASET)
    elif target == 2:
        features, _ = fingerprint(body, _CFG)
        if features.status == "failed":
            if not features.error or "\n" in features.error or len(features.error) > 300:
                raise AssertionError(f"bad error line: {features.error!r}")
        elif not (features.width and features.height and features.sha256 and features.pdq):
            raise AssertionError(f"ok without features: {features}")
    else:
        _FS.pipe(f"{_ROOT}/00000.parquet", body)
        _read("00000.parquet", ShardKind.I2D_PARQUET)


def make_seeds(folder: Path) -> int:
    """Write the seed corpus: valid and damaged tars, sidecars, images, parquet files."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from badinputs import encode, i2d_parquet_bytes, image_cases, meta_row, picture, sample_members, sidecar_bytes, tar_bytes

    folder.mkdir(parents=True, exist_ok=True)
    jpg = encode(picture(1, (16, 12)), "JPEG")
    tar = tar_bytes(sample_members("000000000", jpg) + sample_members("000000001", encode(picture(2, (8, 8)), "PNG"), ext="png"))
    seeds = {
        "tar": b"\x00" + tar,
        "tar_cut": b"\x00" + tar[: len(tar) // 2],
        "tar_sidecar": b"\x01" + tar + sidecar_bytes([meta_row("000000000"), meta_row("000000002", status="failed_to_download", error="404")]),
        "parquet": b"\x03" + i2d_parquet_bytes(3),
    }
    for case in image_cases():
        if len(case.data) < 20_000:
            seeds[f"img_{case.name}"] = b"\x02" + case.data
    for name, blob in seeds.items():
        (folder / name).write_bytes(blob)
    return len(seeds)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        print(f"{make_seeds(Path(sys.argv[2]))} seeds in {sys.argv[2]}")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
