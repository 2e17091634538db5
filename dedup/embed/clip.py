"""CLIP image embeddings through open_clip (the ``dedup[torch]`` extra).

CLIP finds semantic near-duplicates (same scene, other photo) better than it finds copies;
SSCD is the default for copy detection. Weights are always a local file: a hub name would
make a run download at run time, which breaks offline clusters and reproducibility. A pickled
checkpoint (``.pt``, ``.bin``, ...) can run code when loaded, so it needs ``embed.trust_code``
(``--trust-model-code``); ``.safetensors`` weights are plain data and need nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from dedup.config import EmbedConfig
from dedup.embed._torch import import_torch, local_file, require_trust, run_batch, set_threads, torch_device
from dedup.errors import ModelError, missing_dependency

__all__ = ["ClipEmbedder", "build_clip"]


class ClipEmbedder:
    """open_clip's image tower with open_clip's own eval transform (resize, crop, normalise).

    ``cfg.size`` does not apply: the transform uses the input size the model was trained at.
    """

    def __init__(self, torch: Any, model: Any, transform: Any, device: Any, *, name: str) -> None:
        self.name = name
        self._torch = torch
        self._model = model
        self._transform = transform
        self._device = device
        self.dim = _clip_dim(torch, model, transform, device)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 (3, H, W) through open_clip's eval transform."""
        tensor = self._transform(image.convert("RGB") if image.mode != "RGB" else image)
        arr: np.ndarray = tensor.numpy()
        return arr

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, 3, H, W) -> float32 (n, dim), unit-norm rows."""
        return run_batch(self._torch, self._model.encode_image, batch, self._device, self.dim)

    def __repr__(self) -> str:
        return f"ClipEmbedder(name={self.name!r}, dim={self.dim}, device={self._device})"


def build_clip(cfg: EmbedConfig, *, threads: int | None = None) -> ClipEmbedder:
    """open_clip ``cfg.clip_model`` with the local weights file ``cfg.model_path``.

    Raises:
        MissingDependencyError: torch or open_clip_torch is not installed.
        ModelError: no model_path, a hub model name, a missing file, or weights that do not
            fit the architecture.
        ConfigError: pickled weights without ``embed.trust_code``.
    """
    torch = import_torch("the clip model")
    try:
        import open_clip
    except ImportError:
        raise missing_dependency("open_clip_torch", "torch", "the clip model") from None
    if cfg.clip_model.startswith("hf-hub:"):
        raise ModelError(
            f"embed.clip_model={cfg.clip_model!r} names a hub model, which would be downloaded "
            "at run time; use an architecture name (e.g. 'ViT-B-32') and a local weights file"
        )
    # An absolute path: open_clip reads a bare word as a pretrained tag and downloads it.
    path = local_file(
        cfg,
        "a local CLIP weights file",
        "set embed.model_path (--model-path) to an open_clip checkpoint for "
        f"{cfg.clip_model} (.pt/.bin/.safetensors); dedup never downloads weights at run time",
    )
    if path.suffix.lower() != ".safetensors":
        require_trust(cfg, path, "a pickled checkpoint (not .safetensors)")
    device = torch_device(torch, cfg.device)
    set_threads(torch, cfg, threads)
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            cfg.clip_model, pretrained=str(path), device=device
        )
        model.eval()
        return ClipEmbedder(torch, model, transform, device, name=f"clip:{cfg.clip_model}")
    except Exception as err:  # open_clip raises RuntimeError, KeyError, ...
        raise ModelError(
            f"cannot load CLIP model {cfg.clip_model} from {path}: "
            f"{' '.join(str(err).split())[:300]}; check embed.clip_model and embed.model_path"
        ) from None


def _clip_dim(torch: Any, model: Any, transform: Any, device: Any) -> int:
    """The embedding length: declared by the visual tower, else from one probe image."""
    declared = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    probe = transform(Image.new("RGB", (64, 64))).unsqueeze(0).to(device)
    with torch.inference_mode():
        return int(model.encode_image(probe).shape[1])
