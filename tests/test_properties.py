"""Properties (hypothesis) of the readers and of clustering, on generated inputs.

Readers: whatever a tar, a folder or a parquet file holds, reading never raises, yields unique
sample ids whose text can be written to parquet, and loses nothing silently: a sample that an
intact tar yields is, in a truncated copy, either yielded with the very same bytes or the
damage is reported. Clustering: every sample is in exactly one cluster, each cluster keeps
exactly one sample, and the clusters (as sets of sample keys) do not depend on shard order.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent / "fuzz"))
from badinputs import encode, meta_row, picture, sample_members, sidecar_bytes, tar_bytes  # noqa: E402

from _configs import PLAIN  # noqa: E402
from dedup import run  # noqa: E402
from dedup._types import Sample, Shard, ShardKind  # noqa: E402
from dedup.cluster import components  # noqa: E402
from dedup.config import KeepPolicy  # noqa: E402
from dedup.featurize import SCHEMA  # noqa: E402
from dedup.manifest import build_manifest  # noqa: E402
from dedup.signals import find_edges  # noqa: E402
from dedup.select import keepers  # noqa: E402
from dedup.sources import discover, read_shard  # noqa: E402
from dedup.sources._common import IMAGE_EXTENSIONS, split_name  # noqa: E402

# DEDUP_PROPERTY_EXAMPLES=2000 for a longer hunt than CI's.
EXAMPLES = int(os.environ.get("DEDUP_PROPERTY_EXAMPLES", "60"))
PROPS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# readers


def _check_samples(samples: Sequence[Sample]) -> None:
    """What every reader promises, whatever the input."""
    ids = [s.sample_id for s in samples]
    assert len(set(ids)) == len(ids), "sample ids must be unique"
    for s in samples:
        for text in (s.sample_id, s.key, s.url, s.caption, s.error):
            if text is not None:
                text.encode("utf-8")  # parquet strings: a lone surrogate would fail the shard
        json.dumps(s.extra)
        assert s.status in ("ok", "failed")
        if s.status == "failed":
            assert s.error and "\n" not in s.error
        assert s.data is None or isinstance(s.data, bytes)


_IMG = encode(picture(0, (8, 6)), "JPEG")

# Tar member names from raw bytes (what a tar really holds), decoded as tarfile does.
_names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b).map(lambda b: b.decode("utf-8", "surrogateescape"))
_image_fields = st.sampled_from(["jpg", "png", "webp", "seg.png", "JPG"])
_other_fields = st.sampled_from(["txt", "json", "cls", ""])
_payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b'{"url": "http://x", "caption": "c"}', b"{bad json", b'{"caption": "\\ud83d"}', b"caf\xe9", b"[1, 2]"]),
)


@st.composite
def _tar_members(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    keys = draw(st.lists(st.one_of(_names, st.sampled_from(["000000001", "../up", "/abs/x", "./dot", "a/b/c"])), min_size=1, max_size=6, unique=True))
    # A name once per tar and at most one image per sample, as img2dataset writes them (which
    # of two images a sample cut short keeps is a question of its own).
    members: dict[str, bytes] = {}
    for key in keys:
        fields = draw(st.lists(_other_fields, max_size=2))
        image = draw(st.one_of(st.none(), _image_fields))
        if image is not None:
            fields.insert(draw(st.integers(0, len(fields))), image)
        for field in fields:
            members.setdefault(f"{key}.{field}" if field else key, draw(_payloads))
    return list(members.items()) or [("000000000.jpg", b"x")]


def _shard(path: Path, kind: ShardKind = ShardKind.WEBDATASET) -> Shard:
    return Shard(str(path.parent), str(path), kind, path.name, "stamp")


def _groups(members: Sequence[tuple[str, bytes]]) -> int:
    """How many samples an intact tar holds: runs of adjacent members with one key."""
    keys = []
    for name, _ in members:
        while name.startswith("./"):
            name = name[2:]
        keys.append(split_name(name)[0])
    return sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)


@PROPS
@given(members=_tar_members(), cut=st.floats(0, 1), listed=st.lists(st.sampled_from(["000000001", "000000002", "x"]), unique=True), with_sidecar=st.booleans())
def test_tar_reader_never_raises_and_loses_nothing_silently(
    members: list[tuple[str, bytes]], cut: float, listed: list[str], with_sidecar: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000.tar"
        data = tar_bytes(members)
        path.write_bytes(data)
        if with_sidecar:
            (Path(tmp) / "00000.parquet").write_bytes(sidecar_bytes([meta_row(k) for k in listed]))
        intact = list(read_shard(_shard(path)))
        _check_samples(intact)
        # one row per run of adjacent members with one key, plus the listed keys the tar lacks
        tar_keys = {split_name(n[2:] if n.startswith("./") else n)[0] for n, _ in members}
        only_listed = [k for k in listed if k not in tar_keys] if with_sidecar else []
        assert len(intact) == _groups(members) + len(only_listed)
        assert not any(s.key == "<damaged>" for s in intact)

        path.write_bytes(data[: int(len(data) * cut)])
        truncated = list(read_shard(_shard(path)))
        _check_samples(truncated)
        whole = {s.sample_id: s for s in intact if s.status == "ok"}
        kept = {s.sample_id: s for s in truncated if s.status == "ok"}
        for sample_id, sample in kept.items():  # nothing damaged passes as ok
            assert sample_id in whole and sample.data == whole[sample_id].data
        if set(whole) - set(kept):  # something was lost: the damage is said
            assert any(s.key == "<damaged>" or "truncated" in (s.error or "") for s in truncated)


_filenames = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="/\0"), min_size=1, max_size=24
).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)


@PROPS
@given(names=st.lists(st.tuples(_filenames, st.sampled_from([*IMAGE_EXTENSIONS, "JPG", "txt", "json"])), min_size=1, max_size=8, unique_by=lambda t: f"{t[0]}.{t[1]}"))
def test_folder_reader_one_sample_per_image_file(names: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        root.mkdir()
        made = set()
        for stem, ext in names:
            name = f"{stem}.{ext}"
            (root / name).write_bytes(_IMG)
            if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                made.add(name)
        if not made:
            return
        samples = [s for shard in discover([str(root)], folder_batch=3) for s in read_shard(shard)]
        _check_samples(samples)
        assert sorted(s.sample_id for s in samples) == sorted(made)
        assert all(s.status == "ok" and s.data == _IMG for s in samples)


def test_folder_reader_names_that_are_not_utf8(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for raw in (b"caf\xe9.jpg", b"caf\xe8.jpg", b"\xff\xfe.png"):
        (root / raw.decode("utf-8", "surrogateescape")).write_bytes(_IMG)
    samples = [s for shard in discover([str(root)]) for s in read_shard(shard)]
    _check_samples(samples)
    assert sorted(s.sample_id for s in samples) == ["\\xff\\xfe.png", "caf\\xe8.jpg", "caf\\xe9.jpg"]
    assert all(s.status == "ok" for s in samples)


_cells = st.one_of(st.none(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=20), st.booleans())


@PROPS
@given(rows=st.lists(st.fixed_dictionaries({"URL": st.one_of(st.none(), st.text(max_size=20)), "TEXT": st.one_of(st.none(), st.text(max_size=20)), "WIDTH": _cells, "extra": _cells}), max_size=12), as_i2d=st.booleans())
def test_parquet_readers_one_sample_per_row(rows: list[dict[str, Any]], as_i2d: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.Table.from_pylist([{k: (str(v) if k in ("WIDTH", "extra") and v is not None else v) for k, v in r.items()} for r in rows])
        if as_i2d:
            table = table.append_column("jpg", pa.array([_IMG if i % 2 else None for i in range(len(rows))], pa.binary()))
        path = Path(tmp) / "part.parquet"
        pq.write_table(table, path)
        kind = ShardKind.I2D_PARQUET if as_i2d else ShardKind.LAION_METADATA
        samples = list(read_shard(_shard(path, kind)))
        _check_samples(samples)
        assert len(samples) == len(rows)


# --------------------------------------------------------------------------------------------
# clustering, on synthetic features: every sample in one cluster, one kept, order-free

_BASE = np.random.default_rng(0).normal(size=(12, 16)).astype(np.float32)


@st.composite
def _feature_shards(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    """Shards of samples drawn from a few groups: members of a group share bytes, pixels, PDQ
    or an embedding (the signals the global stage links on); some samples failed."""
    shards = []
    n = 0
    for s in range(draw(st.integers(1, 4))):
        rows = []
        for _ in range(draw(st.integers(0, 6))):
            group = draw(st.integers(0, 11))
            how = draw(st.sampled_from(["bytes", "pixels", "pdq", "embedding", "failed", "alone"]))
            rows.append({"key": f"k{n}", "shard": f"s{s}", "group": group, "how": how})
            n += 1
        shards.append(rows)
    return shards


def _table(shards: Sequence[Sequence[dict[str, Any]]]) -> tuple[pa.Table, np.ndarray]:
    rows, vectors = [], []
    for shard in shards:
        for r in shard:
            g, how = r["group"], r["how"]
            ok = how != "failed"
            unique = (int(r["key"][1:]) + 1000).to_bytes(4, "big") * 8  # this sample's own
            vec = _BASE[g] if how == "embedding" else np.random.default_rng(int(r["key"][1:]) + 1000).normal(size=16)
            embedded = ok
            if embedded:
                vectors.append(vec / np.linalg.norm(vec))
            rows.append(
                {
                    "sample_id": f"{r['shard']}/{r['key']}",
                    "source": "synthetic",
                    "shard": r["shard"],
                    "key": r["key"],
                    "status": "ok" if ok else "failed",
                    "error": None if ok else "synthetic failure",
                    "width": 10 + g,
                    "height": 10,
                    "sha256": bytes([g]) * 32 if how == "bytes" else (unique if ok else None),
                    "pixel_sha256": bytes([g, 1]) * 16 if how == "pixels" else (unique if ok else None),
                    "pdq": bytes([g, 2]) * 16 if how == "pdq" else (None if not ok else unique[::-1]),
                    "has_image": ok,
                    "embedded": embedded,
                }
            )
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    emb = np.asarray(vectors, np.float32).reshape(-1, 16)
    return table, emb


def _clusters(table: pa.Table, vectors: np.ndarray, policy: KeepPolicy) -> tuple[set[frozenset[str]], pa.Table]:
    cfg = PLAIN.with_overrides({"search.threshold": 0.999, "search.pdq_distance": 0, "keep.policy": policy.value})
    edges, _ = find_edges(table, vectors, cfg)
    labels = components(table.num_rows, edges)
    ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")
    width = np.asarray(table.column("width").to_numpy(zero_copy_only=False), np.float64)
    keep_row = keepers(labels, policy=policy, eligible=ok, pixels=width * 10)
    manifest = build_manifest(table, labels, keep_row, edges)
    by_cluster: dict[int, set[str]] = {}
    for key, cid in zip(manifest.column("key").to_pylist(), manifest.column("cluster_id").to_pylist(), strict=True):
        if cid is not None:
            by_cluster.setdefault(cid, set()).add(key)
    return {frozenset(v) for v in by_cluster.values()}, manifest


@settings(max_examples=EXAMPLES, deadline=None)
@given(shards=_feature_shards(), order=st.randoms(use_true_random=False), policy=st.sampled_from([KeepPolicy.FIRST, KeepPolicy.LARGEST]))
def test_clusters_partition_keep_one_and_ignore_shard_order(shards: list[list[dict[str, Any]]], order: Any, policy: KeepPolicy) -> None:
    table, vectors = _table(shards)
    clusters, manifest = _clusters(table, vectors, policy)
    m = manifest.to_pylist()
    ok_keys = {r["key"] for r in m if r["status"] == "ok"}
    # every ok sample in exactly one cluster; failed samples in none, and never kept
    assert sorted(k for c in clusters for k in c) == sorted(ok_keys)
    assert all(r["cluster_id"] is None and not r["keep"] for r in m if r["status"] == "failed")
    # a cluster id is the row of its first member, and that member is in the cluster
    for row_number, r in enumerate(m):
        if r["cluster_id"] is not None:
            assert r["cluster_id"] <= row_number and m[r["cluster_id"]]["cluster_id"] == r["cluster_id"]
    # exactly one kept per cluster; every dropped sample names its cluster's keeper
    kept = {r["cluster_id"]: r["sample_id"] for r in m if r["keep"]}
    assert sum(r["keep"] for r in m) == len(clusters) == len(kept)
    for r in m:
        if r["status"] == "ok" and not r["keep"]:
            assert r["reason"] == "duplicate" and r["duplicate_of"] == kept[r["cluster_id"]] and r["signal"]
        if r["status"] == "ok" and r["keep"]:
            assert r["reason"] in ("unique", "representative")
    # members of one group linked by one signal always end up together
    for shard in shards:
        for r in shard:
            if r["how"] in ("bytes", "pixels", "pdq", "embedding"):
                mates = {x["key"] for s in shards for x in s if (x["group"], x["how"]) == (r["group"], r["how"])}
                assert any(mates <= c for c in clusters)
    # the same samples in another shard order: the same clusters
    permuted = list(shards)
    order.shuffle(permuted)
    table2, vectors2 = _table(permuted)
    assert _clusters(table2, vectors2, policy)[0] == clusters


# --------------------------------------------------------------------------------------------
# and end to end: shards renamed so they come in another order


def _tar_with(keys_and_images: Sequence[tuple[str, bytes]]) -> bytes:
    return tar_bytes([m for key, img in keys_and_images for m in sample_members(key, img, url=f"http://example.com/{key}")])


@pytest.mark.parametrize("permutation", [(2, 0, 1)])
def test_renaming_shards_to_reorder_them_gives_the_same_clusters(tmp_path: Path, permutation: tuple[int, ...]) -> None:
    pics = [picture(70 + i, (64, 48)) for i in range(5)]
    jpeg = [encode(p, "JPEG", quality=90) for p in pics]
    recoded = [encode(p, "JPEG", quality=60) for p in pics]  # near copies, other bytes
    content = [
        [("a0", jpeg[0]), ("a1", jpeg[1]), ("a2", jpeg[2])],
        [("b0", jpeg[0]), ("b1", recoded[1]), ("b3", jpeg[3])],
        [("c0", recoded[0]), ("c4", jpeg[4]), ("c3", jpeg[3]), ("c9", b"not an image")],
    ]
    cfg = PLAIN.with_overrides({"embed.model": "sscd_distilled", "embed.size": 224})
    results = []
    for name, order in (("first", (0, 1, 2)), ("second", permutation)):
        src = tmp_path / name
        src.mkdir()
        for position, which in enumerate(order):
            (src / f"{position:05d}.tar").write_bytes(_tar_with(content[which]))
        run([str(src)], tmp_path / f"out-{name}", config=cfg)
        m = pq.read_table(tmp_path / f"out-{name}" / "manifest.parquet").to_pylist()
        clusters: dict[int, set[str]] = {}
        for r in m:
            if r["cluster_id"] is not None:
                clusters.setdefault(r["cluster_id"], set()).add(r["key"])
        assert sum(r["keep"] for r in m) == len(clusters)
        assert sorted(r["key"] for r in m) == sorted(k for shard in content for k, _ in shard)
        results.append({frozenset(c) for c in clusters.values()})
    assert results[0] == results[1]
    assert frozenset({"a0", "b0", "c0"}) in results[0] and frozenset({"b3", "c3"}) in results[0]
