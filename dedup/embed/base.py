"""The interface every embedder implements, and the helpers they share."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from dedup.config import parse_device  # noqa: F401  # re-exported: the embedders parse devices

__all__ = ["Embedder", "l2_normalize", "parse_device"]


@runtime_checkable
class Embedder(Protocol):
    """A copy-detection image embedder, split in two halves for the pipeline.

    ``preprocess`` runs per image right after decoding (in the fingerprint step), so the
    full-size image can be freed at once and only the small model input is kept; ``embed``
    runs on stacked preprocess outputs in batches, where the model is efficient.
    """

    name: str  # e.g. "sscd", "clip:ViT-B-32": says which model made a set of vectors
    dim: int  # length of each embedding

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB image as this model's input array (no batch axis)."""
        ...

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Stacked ``preprocess`` outputs -> float32 ``(n, dim)`` rows of unit L2 norm."""
        ...


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (all-zero rows stay zero, never NaN).

    Every embedder normalises its own output, even a model that claims to, so that cosine
    similarity is a plain inner product downstream and float16/int8 models cannot drift.
    """
    out = np.asarray(vectors, dtype=np.float32)
    if out.ndim != 2:
        raise ValueError(f"expected a 2-D array of embeddings, got shape {out.shape}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    unit: np.ndarray = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
    return unit
