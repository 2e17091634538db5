"""Reader for img2dataset's ``webdataset`` output: ``NNNNN.tar`` plus its sidecar ``NNNNN.parquet``.

The tar holds the samples that downloaded (``key.jpg``, ``key.txt``, ``key.json``); the sidecar
lists every sample of the shard, failed downloads included. Reading both is what lets the
manifest have one row per input sample.
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Self

from dedup._types import Sample, Shard
from dedup.sources._common import (
    open_failure,
    open_input,
    ENVIRONMENT_ERRORS,
    MAX_FILE_BYTES,
    OUTSIDE_SOURCE,
    Fields,
    clean_text,
    decode_text,
    failed_sample,
    filesystem,
    is_local,
    map_fields,
    one_line,
    outside,
    parse_json,
    pick_image_field,
    read_sidecar,
    source_root,
    split_name,
    too_large,
)

# Raised by tarfile and its decompressors on damaged data (as opposed to a failing disk or network).
DAMAGE_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)

MISSING_TRUNCATED = "missing from tar (shard truncated?)"
MISSING = "missing from tar"
NO_IMAGE = "no image member in tar"
DAMAGED_KEY = "<damaged>"
SIDECAR_KEY = "<sidecar>"
OUTSIDE_KEY = "<outside>"

_DRAIN_CHUNK = 1 << 16


def sidecar_path(tar_path: str) -> str:
    """``.../00000.tar`` -> ``.../00000.parquet`` (img2dataset names both after the shard)."""
    return tar_path[: -len(".tar")] + ".parquet"


class GroupIds:
    """The sample ids of a tar's member groups, in tar order: ``f"{shard_id}/{key}"``.

    A key split across non-adjacent members (never img2dataset) must not repeat an id: its
    second group is ``f"{shard_id}/{key}#2"``. Shared by the reader and ``dedup apply``, which
    must name the groups of a tar exactly as the run did.
    """

    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self._times_seen: dict[str, int] = {}

    def next(self, raw_key: str) -> tuple[str, str]:
        """``(sample_id, key)`` of the next group, whose members are named ``raw_key.*``."""
        key = clean_text(raw_key)
        count = self._times_seen.get(key, 0) + 1
        self._times_seen[key] = count
        return (f"{self.shard_id}/{key}" if count == 1 else f"{self.shard_id}/{key}#{count}"), key


def member_key(member: tarfile.TarInfo) -> str:
    """The raw key of a tar member: its name up to the first dot of the basename."""
    return split_name(_strip_dot_slash(member.name))[0]


@dataclass(slots=True)
class _Damage:
    """Filled in by :func:`_tar_groups` when the tar turns out to be damaged."""

    reason: str | None = None


def read_webdataset(shard: Shard) -> Iterator[Sample]:
    """Yield every sample of a webdataset shard: those in the tar, then those only in the sidecar.

    Order: tar order first (img2dataset writes in download-completion order, a property of the
    file, hence deterministic), then the sidecar-only samples sorted by key. Sorting the tar
    samples by key would mean holding the whole tar in memory.

    Damage (a truncated or corrupt tar): the samples read before the damage are yielded as
    usual. When a sidecar exists, every sample it lists that the tar lacked becomes a failed
    sample with error ``"missing from tar (shard truncated?)"``: one row per real sample, no
    made-up rows. Without a sidecar nobody knows which samples were lost, so one extra failed
    sample ``f"{shard_id}/<damaged>"`` carries the damage instead (and so it does when no row
    would otherwise say that the tar is damaged). An unreadable sidecar likewise
    adds a failed ``f"{shard_id}/<sidecar>"`` sample and the tar is read on its own.

    Tar members are only ever names: nothing is written to disk, so absolute or ``..`` names
    are harmless and simply become keys (names that are not valid UTF-8 are escaped, see
    :func:`~dedup.sources._common.clean_text`). Links, devices and other non-file members
    are passed over: they hold no bytes.
    """
    fs, path = filesystem(shard.path)
    confine_to = source_root(shard.source)
    if confine_to is not None and is_local(fs) and outside(path, confine_to):
        # Discovery never makes such a shard; the tar was swapped for a link since.
        yield failed_sample(f"{shard.shard_id}/{OUTSIDE_KEY}", OUTSIDE_KEY, OUTSIDE_SOURCE)
        return
    sidecar = read_sidecar(fs, sidecar_path(path), confine_to=confine_to)
    if sidecar.error is not None:
        yield failed_sample(f"{shard.shard_id}/{SIDECAR_KEY}", SIDECAR_KEY, sidecar.error)
    damage = _Damage()
    ids = GroupIds(shard.shard_id)
    reported = False  # whether a row already says the tar was cut short
    try:
        fh = open_input(fs, path, stream=True)
    except ENVIRONMENT_ERRORS as err:
        raise open_failure(shard.path, err) from err
    with fh:
        for raw_key, members in _tar_groups(fh, damage):
            listed = sidecar.pop(raw_key)
            sample_id, key = ids.next(raw_key)
            sample = _tar_sample(sample_id, key, members, listed, damaged=damage.reason is not None)
            reported = reported or sample.error == MISSING_TRUNCATED
            yield sample
    if sidecar.rows:
        for key in sorted(sidecar.rows):
            fields = sidecar.rows[key]
            if not fields.succeeded:
                error = fields.failure()
            else:
                error = MISSING_TRUNCATED if damage.reason is not None else MISSING
            reported = reported or error == MISSING_TRUNCATED
            yield failed_sample(f"{shard.shard_id}/{key}", key, error, fields)
    if damage.reason is not None and (sidecar.rows is None or not reported):
        # No row has said the tar is damaged: without a sidecar, or with one that does not list
        # what was lost (a cut at a member boundary past its last listed sample, say).
        yield failed_sample(f"{shard.shard_id}/{DAMAGED_KEY}", DAMAGED_KEY, f"tar damaged: {damage.reason}")


def _tar_sample(
    sample_id: str, key: str, members: dict[str, bytes | int], listed: Fields | None, *, damaged: bool
) -> Sample:
    """One tar sample: image from the image member, caption from ``.txt``, the rest from ``.json``.

    The sidecar row (``listed``) fills what the ``.json`` lacks, e.g. when the json is
    malformed; a malformed json alone costs the metadata, never the sample.
    """
    record: dict[str, Any] = {}
    if listed is not None:
        record.update(listed.as_record())
    meta = members.get("json")
    if isinstance(meta, bytes):
        record.update(parse_json(meta))
    fields = map_fields(record)
    text = members.get("txt")
    caption = decode_text(text) if isinstance(text, bytes) else fields.caption
    image_field = pick_image_field(members)
    if image_field is None:
        # ``damaged`` is only ever set while the last group (the one cut short) is yielded.
        error = MISSING_TRUNCATED if damaged else NO_IMAGE
        fields.caption = caption
        return failed_sample(sample_id, key, error, fields)
    data = members[image_field]
    if isinstance(data, int):  # over MAX_FILE_BYTES: never read
        fields.caption = caption
        return failed_sample(sample_id, key, f"tar member {too_large(data)}", fields)
    return Sample(
        sample_id=sample_id,
        key=key,
        data=data,
        url=fields.url,
        caption=caption,
        width=fields.width,
        height=fields.height,
        extra=fields.extra,
    )


def _tar_groups(fh: IO[bytes], damage: _Damage) -> Iterator[tuple[str, dict[str, bytes | int]]]:
    """Stream ``(key, {field: bytes})`` groups of adjacent members, one group in memory at a time.

    ``tarfile`` in stream mode ends *silently* at a truncated or garbled header once past the
    first member, so the header errors it swallows are recorded (through a ``TarInfo`` subclass,
    the documented hook) and a stop at anything but the end-of-archive marker counts as damage.
    ``damage.reason`` is set before the last group is yielded.
    """
    stops: list[tarfile.HeaderError] = []

    class _RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as err:
                stops.append(err)
                raise

    key: str | None = None
    members: dict[str, bytes | int] = {}
    try:
        with tarfile.open(fileobj=fh, mode="r|*", tarinfo=_RecordingTarInfo) as tar:
            while (member := tar.next()) is not None:
                # Stream mode keeps every TarInfo it has seen; a shard has tens of thousands.
                tar.members = []  # type: ignore[attr-defined]  # (untyped, but public since 2.x)
                if not member.isfile():
                    continue
                raw_key, name = split_name(_strip_dot_slash(member.name))
                if raw_key != key:
                    if key is not None:
                        yield key, members
                    key, members = raw_key, {}
                if name in members:
                    # The same field twice in one sample (``x.jpg`` and ``x.JPG``): the first
                    # wins, so a tar cut short can never change the bytes of a sample it keeps.
                    continue
                if member.size > MAX_FILE_BYTES:
                    members[name] = member.size  # not read: stream mode skips its data
                    continue
                extracted = tar.extractfile(member)
                if extracted is not None:
                    members[name] = extracted.read()
            damage.reason = _end_state(stops, tar)
    except DAMAGE_ERRORS as err:
        damage.reason = one_line(str(err)) or type(err).__name__
    if key is not None:
        yield key, members


def _strip_dot_slash(name: str) -> str:
    """``tar -cf x.tar .`` names members ``./000.jpg``; the key is still ``000``."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _end_state(stops: list[tarfile.HeaderError], tar: tarfile.TarFile) -> str | None:
    """None for a clean end-of-archive, else why the stream stopped early.

    The header error classes are matched by name: they are real ``tarfile`` module attributes
    but missing from the type stubs.
    """
    last = type(stops[-1]).__name__ if stops else None
    if last == "EOFHeaderError":
        # The zero block may be a hole punched in the middle: the rest must be zeros too.
        stream = tar.fileobj
        if stream is not None:
            while chunk := stream.read(_DRAIN_CHUNK):
                if chunk.count(0) != len(chunk):
                    return "data after the end-of-archive marker (zeroed block?)"
        return None
    if last == "EmptyHeaderError":
        return "no end-of-archive marker (truncated at a member boundary?)"
    if last == "TruncatedHeaderError":
        return "truncated header"
    if last is not None:
        return f"corrupt header ({one_line(str(stops[-1]))})"
    return None
