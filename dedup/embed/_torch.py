"""What the PyTorch embedders share: lazy imports with the install hint, device, batching.

torch is a multi-GB install, kept behind the ``dedup[torch]`` extra, so it is imported only
when one of these embedders is built, and its absence is reported with the pip hint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dedup.config import EmbedConfig
from dedup.embed.base import l2_normalize, parse_device
from dedup.errors import ConfigError, ModelError, missing_dependency


def import_torch(purpose: str) -> Any:
    """The torch module, or MissingDependencyError naming ``purpose`` and the extra."""
    try:
        import torch
    except ImportError:
        raise missing_dependency("torch", "torch", purpose) from None
    return torch


def torch_device(torch: Any, device: str) -> Any:
    """The torch.device for ``embed.device``; ModelError if CUDA is asked for but absent."""
    kind, index = parse_device(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                "embed.device='cuda' but torch sees no CUDA device; install a CUDA build of "
                "torch or set embed.device='cpu'"
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


def set_threads(torch: Any, cfg: EmbedConfig, threads: int | None) -> None:
    """Bound torch's intra-op threads (process-wide in torch, so per worker process)."""
    count = threads if threads is not None else cfg.threads
    if count and count > 0:
        torch.set_num_threads(count)


def local_file(cfg: EmbedConfig, what: str, hint: str) -> Path:
    """``cfg.model_path`` as an existing local file, else ModelError saying what to pass."""
    if not cfg.model_path:
        raise ModelError(f"the {cfg.model.value} model needs {what}: {hint}")
    path = Path(cfg.model_path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"{what} not found: {path}; check embed.model_path")
    return path


def require_trust(cfg: EmbedConfig, path: Path, what: str) -> None:
    """Refuse to load ``path`` (``what``: a file format that runs code when loaded) unless the
    user said they trust it: ``embed.trust_code`` / ``--trust-model-code``.

    TorchScript files carry code, and pickled checkpoints (``torch.save``'s ``.pt``/``.bin``)
    can run any code on unpickling: a model file from the web must not get to run code just
    because a config named it.
    """
    if cfg.trust_code:
        return
    raise ConfigError(
        f"{path} is {what}, which can run code when loaded; hint: pass --trust-model-code "
        "(embed.trust_code = true) if you trust this file"
        + ("" if what.startswith("a TorchScript") else ", or use a .safetensors file, which needs no trust")
    )


def run_batch(torch: Any, forward: Any, batch: np.ndarray, device: Any, dim: int) -> np.ndarray:
    """float32 NCHW batch -> unit-norm float32 (n, dim) through ``forward``, no autograd."""
    if batch.shape[0] == 0:
        return np.empty((0, dim), dtype=np.float32)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
        out = forward(x)
        out = torch.nn.functional.normalize(out.float(), dim=1)
        vectors = out.cpu().numpy()
    return l2_normalize(vectors)
