"""Shared fixtures: generated images with planted copies, and a real img2dataset output.

Test files import the data builders as ``from _data import ...``: this file puts ``tests/`` on
``sys.path`` so that works under any pytest import mode (``tests/`` is not a package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before anything imports img2dataset (and with it albumentations, which otherwise asks PyPI for
# a newer version at import time and warns). Spawned img2dataset workers inherit it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import pytest  # noqa: E402
from _data import PlantedDataset, make_i2d_dataset, make_image_folder  # noqa: E402


@pytest.fixture(scope="session")
def i2d_webdataset(tmp_path_factory: pytest.TempPathFactory) -> PlantedDataset:
    """A real img2dataset webdataset output with planted duplicates, built once per session.

    40 generated originals (192x144 JPEG) plus 20 planted copies (exact byte copies under other
    URLs and edited copies; heavy-tailed), 2 URLs that answered 404 and 1 URL that served
    undecodable bytes: 63 sidecar rows over two shards (``00000.tar``/``.parquet``/
    ``_stats.json``, ``00001...``; 32 rows per shard, keys like ``0000004`` and ``0000103``).
    The corrupt bytes were also injected into their tar (img2dataset never stores them itself),
    so one member fails to decode while its sidecar row says ``success``.

    Unpacks as ``out_dir, truth``; ``truth`` maps URL → group id and ``truth.kind[url]`` tells
    ``original`` / ``exact`` / an edit name / ``missing`` / ``corrupt``; ``truth_by_key()`` keys
    it by img2dataset key. Shared by the whole session: treat it as read-only (copy it with
    ``shutil.copytree`` before changing anything).
    """
    root = tmp_path_factory.mktemp("i2d_webdataset")
    return make_i2d_dataset(root, 40, inject_corrupt=True, number_sample_per_shard=32, seed=0)


@pytest.fixture
def sample_images_dir(tmp_path: Path) -> PlantedDataset:
    """A fresh folder of generated JPEGs with planted copies; unpacks as ``root, truth``.

    ``originals/orig_000.jpg`` ... (6 originals, 160x120), ``copies/copy_000_<kind>.jpg`` (3 + 2 + 1
    copies of the first three originals: exact byte copies or edits) and one undecodable
    ``broken_00.jpg`` at the top. ``truth`` maps each POSIX path relative to ``root`` to its
    group id; ``truth.kind`` says how each file was made.
    """
    root = tmp_path / "images"
    return PlantedDataset(root, make_image_folder(root))
