"""SSCD through Meta's official TorchScript files (the ``dedup[torch]`` extra).

Security: loading TorchScript runs code stored in the file, so the file is never fetched or
guessed: it must be given explicitly as ``embed.model_path`` (e.g.
``sscd_disc_mixup.torchscript.pt`` from the SSCD repository's model zoo, downloaded by the
user), and it is loaded only with ``embed.trust_code`` (``--trust-model-code``) set.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from PIL import Image

from dedup.config import EmbedConfig
from dedup.embed._torch import import_torch, local_file, require_trust, run_batch, set_threads, torch_device
from dedup.errors import ModelError

__all__ = ["TorchScriptEmbedder", "build_sscd_torchscript"]

# ImageNet statistics, as SSCD's own evaluation transforms use them.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class TorchScriptEmbedder:
    """SSCD TorchScript model: resize to size x size, ToTensor, ImageNet normalisation."""

    def __init__(self, torch: Any, model: Any, device: Any, *, size: int) -> None:
        self.name = "sscd-torchscript"
        self.size = size
        self._torch = torch
        self._model = model
        self._device = device
        self.dim = 0  # set from one probe run: the file does not declare its output size
        probe = np.zeros((1, 3, size, size), dtype=np.float32)
        self.dim = int(self._forward_raw(probe).shape[1])

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 (3, size, size), normalised like torchvision would."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        arr = np.asarray(resized, dtype=np.float32) / 255.0
        return np.ascontiguousarray(((arr - _MEAN) / _STD).transpose(2, 0, 1))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 (n, 3, size, size) -> float32 (n, dim), unit-norm rows."""
        return run_batch(self._torch, self._model, batch, self._device, self.dim)

    def _forward_raw(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(batch).to(self._device)
            out: np.ndarray = self._model(x).float().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"TorchScriptEmbedder(size={self.size}, dim={self.dim}, device={self._device})"


def build_sscd_torchscript(cfg: EmbedConfig, *, threads: int | None = None) -> TorchScriptEmbedder:
    """Load the TorchScript file at ``cfg.model_path`` (required; it runs code, see above).

    Raises:
        MissingDependencyError: torch is not installed.
        ModelError: no model_path, the file is missing, or it does not load as TorchScript.
        ConfigError: ``embed.trust_code`` is not set.
    """
    torch = import_torch("the sscd-torchscript model")
    path = local_file(
        cfg,
        "a TorchScript file",
        "set embed.model_path (--model-path) to a file you trust, such as Meta's "
        "sscd_disc_mixup.torchscript.pt; TorchScript files run code when loaded, so dedup "
        "never picks or downloads one itself",
    )
    require_trust(cfg, path, "a TorchScript file")
    device = torch_device(torch, cfg.device)
    set_threads(torch, cfg, threads)
    # torch >= 2.10 deprecates TorchScript, but Meta publishes SSCD only as TorchScript (the
    # ONNX default does not depend on it). The warning is not actionable for our users, and
    # a library must not print: silence exactly that message. A process-wide filter rather
    # than catch_warnings, which is not thread-safe and may run while workers decode.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning
    )
    try:
        model = torch.jit.load(str(path), map_location=device).eval()
        return TorchScriptEmbedder(torch, model, device, size=cfg.size)
    except Exception as err:  # torch raises RuntimeError and friends
        raise ModelError(
            f"cannot load TorchScript model {path}: {' '.join(str(err).split())[:300]}; "
            "embed.model_path must be an SSCD TorchScript file"
        ) from None
