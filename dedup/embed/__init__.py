"""Image embedders behind one interface (:class:`Embedder`), built from an EmbedConfig.

=====================  ===================================================  ===============
model                  what                                                 needs
=====================  ===================================================  ===============
``sscd`` (default)     Meta's SSCD ``sscd_disc_mixup``, int8 ONNX           core install
``sscd_distilled``     MobileNetV4 student of SSCD, ONNX (several x faster)  core install
``sscd-torchscript``   Meta's official TorchScript file, given by path      ``dedup[torch]``
``clip``               open_clip image tower, local weights file            ``dedup[torch]``
``none``               no embeddings: hashes only                           -
=====================  ===================================================  ===============

Heavy runtimes (onnxruntime, torch) are imported only when an embedder is built, so the CLI
starts fast and a missing extra is reported with its pip hint at build time.

Model files that run code when loaded (TorchScript, pickled ``.pt``/``.bin`` CLIP weights) are
loaded only with ``embed.trust_code`` (``--trust-model-code``); ONNX and ``.safetensors`` files
need no trust. Without it the builder raises ConfigError naming the flag.
"""

from __future__ import annotations

from collections.abc import Callable

from dedup.config import EmbedConfig, EmbedModel
from dedup.embed.base import Embedder, l2_normalize
from dedup.errors import ConfigError

__all__ = ["Embedder", "build_embedder", "l2_normalize"]


def _onnx(cfg: EmbedConfig, threads: int | None) -> Embedder:
    from dedup.embed.onnx import build_onnx_sscd

    return build_onnx_sscd(cfg, threads=threads)


def _torchscript(cfg: EmbedConfig, threads: int | None) -> Embedder:
    from dedup.embed.torchscript import build_sscd_torchscript

    return build_sscd_torchscript(cfg, threads=threads)


def _clip(cfg: EmbedConfig, threads: int | None) -> Embedder:
    from dedup.embed.clip import build_clip

    return build_clip(cfg, threads=threads)


_BUILDERS: dict[EmbedModel, Callable[[EmbedConfig, int | None], Embedder] | None] = {
    EmbedModel.SSCD: _onnx,
    EmbedModel.SSCD_DISTILLED: _onnx,
    EmbedModel.SSCD_TORCHSCRIPT: _torchscript,
    EmbedModel.CLIP: _clip,
    EmbedModel.NONE: None,
}


def build_embedder(cfg: EmbedConfig, *, threads: int | None = None) -> Embedder | None:
    """The embedder ``cfg`` describes, loaded and ready; None for ``EmbedModel.NONE``.

    ``threads`` overrides ``cfg.threads`` (the executor passes cores / workers). Call it once
    per worker and reuse the result: loading a model is the expensive part.

    Raises:
        MissingDependencyError: the model's runtime is not installed (message has the hint).
        ModelError: the model file is missing or cannot be loaded.
        ConfigError: an unknown model or device.
    """
    try:
        builder = _BUILDERS[EmbedModel(cfg.model)]
    except (KeyError, ValueError):
        choices = ", ".join(m.value for m in EmbedModel)
        raise ConfigError(f"embed.model must be one of: {choices} (got {cfg.model!r})") from None
    return None if builder is None else builder(cfg, threads)
