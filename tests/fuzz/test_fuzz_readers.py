"""Run the atheris fuzz target briefly, as CI does (``DEDUP_FUZZ_SECONDS``, default 30).

A crash fails the test and names the input that caused it (kept under pytest's temp folder);
reproduce it with ``.venv/bin/python tests/fuzz/fuzz_readers.py <that file>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGET = Path(__file__).resolve().parent / "fuzz_readers.py"


@pytest.mark.fuzz
def test_fuzz_tar_parquet_and_image_readers(tmp_path: Path) -> None:
    seconds = int(os.environ.get("DEDUP_FUZZ_SECONDS", "30"))
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    made = subprocess.run([sys.executable, str(TARGET), "--make-seeds", str(corpus)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    args = [
        f"-max_total_time={seconds}",
        "-max_len=65536",
        "-timeout=30",  # seconds per input: a hang is a finding
        "-rss_limit_mb=3072",
        f"-seed={os.environ.get('DEDUP_FUZZ_SEED', '1')}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    proc = subprocess.run(
        [sys.executable, str(TARGET), *args, str(corpus)],
        capture_output=True, text=True, timeout=seconds + 120, check=False,
    )
    log = proc.stderr[-6000:]
    found = sorted(p.name for p in artifacts.iterdir())
    assert proc.returncode == 0 and not found, f"fuzzing found {found} in {artifacts}:\n{log}"
    runs = [line for line in proc.stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[-1].split(":")[-1]) > 100, log
