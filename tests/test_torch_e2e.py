"""The [torch] extra end to end: `dedup run` with the TorchScript SSCD and with CLIP, on the
bundled sample (real public-domain pictures in img2dataset's webdataset format), with model
files the test builds (no hub, no download). Runs under `make test-torch`; skipped without torch.

Each run is checked against the model itself: the index's vectors are what the model file gives
for each sample's decoded (border-trimmed) image, so a run that silently used another model, or
none, fails.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dedup.cli import app
from dedup.config import EmbedModel, load_config
from dedup.embed import build_embedder
from dedup.fingerprint import fingerprint
from dedup.sources import discover, read_shard

pytestmark = pytest.mark.torch
SAMPLE = Path(str(resources.files("dedup").joinpath("data", "sample")))
runner = CliRunner()


def _run(out: Path, *options: str) -> dict[str, object]:
    result = runner.invoke(app, ["run", str(SAMPLE), "--out", str(out), "--workers", "1", "-q", "--trust-model-code", *options])
    assert result.exit_code == 0, result.output
    return json.loads((out / "config.json").read_text())


def _assert_index_holds_the_models_vectors(out: Path, options: dict[str, object]) -> np.ndarray:
    """Re-embed every decodable sample with the run's own settings and compare."""
    cfg = load_config("default").with_overrides(options)
    embedder = build_embedder(cfg.embed, threads=1)
    assert embedder is not None
    from dedup.store import open_index

    index = open_index(out, columns=["sample_id", "emb_row"], vectors=True)
    samples = index.samples.to_pydict()
    rows = dict(zip(samples["sample_id"], samples["emb_row"], strict=True))
    vectors = index.vectors
    assert vectors is not None
    assert vectors.shape[1] == embedder.dim
    checked = 0
    for shard in discover([str(SAMPLE)]):
        for sample in read_shard(shard):
            if sample.status != "ok":
                continue
            features, prepared = fingerprint(sample.data, cfg.fingerprint, prepare=embedder.preprocess)
            if features.status != "ok":
                continue
            expected = embedder.embed(prepared[None])[0]
            np.testing.assert_allclose(vectors[rows[sample.sample_id]], expected, atol=2e-3, err_msg=sample.sample_id)
            checked += 1
    assert checked >= 20
    return vectors


def test_torchscript_sscd_run_end_to_end(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    # A stand-in for Meta's sscd_disc_mixup.torchscript.pt: a small conv net, traced and saved.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 24, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(24, 48, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
    ).eval()
    model = tmp_path / "sscd_tiny.torchscript.pt"
    with warnings.catch_warnings():  # torch >= 2.10 deprecates tracing; loading still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(net, torch.zeros(1, 3, 96, 96)).save(str(model))
    out = tmp_path / "out"
    cfg = _run(out, "--model", "sscd-torchscript", "--model-path", str(model), "--threshold", "0.98")
    assert cfg["embed"]["model"] == "sscd-torchscript"
    vectors = _assert_index_holds_the_models_vectors(
        out, {"embed.model": "sscd-torchscript", "embed.model_path": str(model), "embed.trust_code": True}
    )
    assert vectors.shape[1] == 192
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["samples"] == pq.read_metadata(out / "manifest.parquet").num_rows


def test_clip_run_end_to_end(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    # A tiny CLIP architecture registered under a test name; its random weights saved locally.
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "dedup-tiny-e2e.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "clip_tiny.pt"
    torch.save(open_clip.create_model("dedup-tiny-e2e").state_dict(), weights)
    out = tmp_path / "out"
    options = ["--model", "clip", "--model-path", str(weights), "--threshold", "0.99"]
    # the architecture's name is a setting of its own (embed.clip_model): a --config file
    mine = tmp_path / "clip.toml"
    mine.write_text('[embed]\nclip_model = "dedup-tiny-e2e"\n')
    cfg = _run(out, *options, "--config", str(mine))
    assert cfg["embed"]["model"] == EmbedModel.CLIP.value and cfg["embed"]["clip_model"] == "dedup-tiny-e2e"
    vectors = _assert_index_holds_the_models_vectors(
        out, {"embed.model": "clip", "embed.model_path": str(weights), "embed.clip_model": "dedup-tiny-e2e", "embed.trust_code": True}
    )
    assert vectors.shape[1] == 32
    manifest = pq.read_table(out / "manifest.parquet", columns=["signal"]).column("signal").to_pylist()
    assert all(s is None or isinstance(s, str) for s in manifest)
