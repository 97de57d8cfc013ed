"""Reading samples back from shards, checked once: the one damage type (`ShardError`, whose
reasons `DAMAGE_REASONS` lists) and the checks of a sample against what the catalog says of it.

Samples are read sequentially (`iter_tar_samples`: a shard's members in order, grouped by key)
or at their catalog spans (shards.members.MemberReader; `check_json` for a JSON read there).
Every check raises `SampleDamage` (a reason of DAMAGE_REASONS and a detail, before the shard is
named); the reader turns it into a `ShardError` naming the shard and the sample
(`ShardError.at`). Two verdicts: `check_sample` for the training loader (cheap JPEG checks; a
frame's header is checked in full where the frame is used) and `check_stored_sample` for readers
that use every frame (`verify`, embeddings). What a consumer does with damage (fail, or skip
and count) is its own policy.
"""

from __future__ import annotations

import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

from polyp_ssl.shards.locations import HashingReader, ShardChanged, ShardIdentity, local_size
from polyp_ssl.shards.reader import DecompressionBomb, open_shard, read_members, safe_member_name
from polyp_ssl.shards.sample import (
    JSON_EXT,
    JpegSizeError,
    SampleError,
    TrackletSample,
    check_jpeg,
    frame_ext,
    jpeg_size,
    parse_sample,
)

# why a sample (or the rest of a shard) cannot be used as the catalog describes it
DAMAGE_REASONS = (
    "truncated_shard",
    "unreadable_shard",
    "bad_json",
    "json_mismatch",
    "jpeg_missing",
    "corrupt_jpeg",
    "sample_missing_from_shard",
    "shard_changed",  # size or sha256 differs from the catalog's shards table
    "decompression_bomb",  # a compressed shard expands past shards.reader.expanded_limit
    "duplicate_sample",  # a sample key seen twice in one shard
    "span_mismatch",  # the tar header before a catalog span names another member (spans swapped)
)


class ShardError(RuntimeError):
    """A damaged shard or sample; the message names the shard, the sample key and the reason
    (one of DAMAGE_REASONS)."""

    def __init__(self, message: str, reason: str = "unreadable_shard", key: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.key = key  # the sample it is about, when there is one

    @classmethod
    def at(cls, shard: str, key: str | None, reason: str, detail: str) -> ShardError:
        where = f"sample {key!r}" if key is not None else "before its first sample"
        return cls(f"{shard}: {where}: {detail} [{reason}]", reason, key)


class SampleDamage(ValueError):
    """A sample that cannot be used as the catalog describes it, found by a check before the
    shard is named; `reason` is one of DAMAGE_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------- checks


def _json_damage(exc: SampleError) -> SampleDamage:
    """A JSON member that is not a valid TrackletSample: `json_mismatch` when its per-frame lists
    disagree in length, else `bad_json`."""
    return SampleDamage("json_mismatch" if exc.kind == "length" else "bad_json", f"JSON member: {exc}")


def check_json(data: bytes, key: str, key_source: str = "the member key") -> TrackletSample:
    """The TrackletSample of a JSON member, validated as data (shards.sample.parse_sample:
    `bad_json`, or `json_mismatch` when its per-frame lists disagree in length) and naming the
    sample `key` (`json_mismatch`; `key_source` says where that key comes from)."""
    try:
        meta = parse_sample(data)
    except SampleError as exc:
        raise _json_damage(exc) from exc
    if meta.key != key:
        raise SampleDamage("json_mismatch", f"JSON key {meta.key!r} differs from {key_source}")
    return meta


def check_frame_count(meta: TrackletSample, catalog_frames: int | None) -> None:
    """`json_mismatch` when the JSON's frame count is not the catalog's (None: not known)."""
    if catalog_frames is not None and meta.n_frames != catalog_frames:
        raise SampleDamage("json_mismatch", f"JSON has {meta.n_frames} frames, the catalog {catalog_frames}")


def check_sample(sample: dict[str, Any], catalog_frames: int | None) -> TrackletSample:
    """The metadata of a sample read sequentially, after checking it against the catalog;
    raises SampleDamage.

    The JSON is checked by check_json and check_frame_count. JPEGs get a cheap structural check
    here (start and end markers) and their header's size is compared with the JSON's crop_sizes
    before any decoding (`json_mismatch`); a JPEG that passes but does not decode, or whose header
    cannot be read, is named by its consumer when it is used (never handed to a decoder).
    """
    key = sample["__key__"]
    if JSON_EXT not in sample:
        detail = f"sample {key!r} has no .json member"
        raise SampleDamage("bad_json", f"JSON member: {SampleError('json', detail)}")
    meta = check_json(sample[JSON_EXT], key)
    check_frame_count(meta, catalog_frames)
    for i in range(meta.n_frames):
        name = f"{i:04d}.jpg"
        data = sample.get(name)
        if data is None:
            raise SampleDamage("jpeg_missing", f"no member .{name}")
        if not data.startswith(b"\xff\xd8") or b"\xff\xd9" not in data[-64:]:
            raise SampleDamage("corrupt_jpeg", f"member .{name} is not a complete JPEG ({len(data)} bytes)")
        try:
            w, h = jpeg_size(data)
        except ValueError:
            continue  # never decoded: named when it is used
        if [w, h] != list(meta.crop_sizes[i]):
            raise SampleDamage(
                "json_mismatch",
                f"member .{name} is a {w}x{h} JPEG, the JSON's crop_sizes say "
                f"{meta.crop_sizes[i][0]}x{meta.crop_sizes[i][1]}",
            )
    return meta


def check_stored_sample(members: dict[str, Any], key: str) -> TrackletSample:
    """The metadata of a sample after the strict check of everything stored in it, for a reader
    that uses every frame (`verify`, embeddings): its JSON as data, its key, and per frame a JPEG
    whose header gives the JSON's crop_sizes within the pixel bound (shards.sample.check_jpeg).
    Raises SampleDamage naming the first problem by its field."""
    if JSON_EXT not in members:
        raise SampleDamage("bad_json", "no .json member")
    try:
        meta = parse_sample(members[JSON_EXT])
    except SampleError as exc:
        raise _json_damage(exc) from exc
    if meta.key != key:
        raise SampleDamage("json_mismatch", f"JSON field 'key' is {meta.key!r}, not the member key")
    for i in range(meta.n_frames):
        data = members.get(frame_ext(i))
        if data is None:
            raise SampleDamage("jpeg_missing", f"no member .{frame_ext(i)} for frame {i}")
        try:
            check_jpeg(data, meta.crop_sizes[i])
        except JpegSizeError as exc:
            reason = "corrupt_jpeg" if exc.kind == "no_header" else "json_mismatch"
            raise SampleDamage(reason, f"field 'crop_sizes[{i}]': frame {i} is {exc}") from None
    return meta


# ---------------------------------------------------------------- sequential reading


def _wanted_member(name: str) -> bool:
    """Read a member only if it is a sample's `.json` or a `.jpg` frame under a safe name."""
    ext = name.rpartition("/")[2].partition(".")[2]
    return (ext == "json" or ext.endswith(".jpg")) and safe_member_name(name)


def iter_tar_samples(
    url: str, stats: Counter | None = None, expect: ShardIdentity | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__` plus member suffix -> bytes) of one tar, in order. `url` is a
    location from polyp_ssl.shards.locations.shard_location: a local path, or under the user's --shard_base
    a `pipe:` command, a URL webdataset.gopen opens (http, https, gs, ...) or any other URL that
    fsspec opens (s3://, gcs://, az://, ...; shards.reader.open_shard).

    Only `.json` and `.jpg` members are read; any other member (`.pyd`, `.pickle`, ...) and any
    member whose name is absolute or climbs with `..` is left unread and counted in `stats`.
    A tar that cannot be opened or ends mid-member raises ShardError naming the last sample key;
    the incomplete sample is not yielded.

    With `expect` (the catalog's size and sha256 of this shard) every byte read is counted and
    hashed; after the last sample a shard of another size (known at open for a local file) or
    another sha256 raises ShardError `shard_changed`. It comes last, so a damaged sample is still
    named by its own reason first.
    """
    stats = stats if stats is not None else Counter()
    current: dict[str, Any] | None = None
    try:
        stream = open_shard(url)
    except (OSError, ValueError, ImportError) as exc:
        raise ShardError.at(url, None, "unreadable_shard", f"cannot open ({exc})") from exc
    reader: Any = stream
    changed: str | None = None
    if expect is not None:
        size = local_size(stream)
        if size is not None and expect.n_bytes >= 0 and size != expect.n_bytes:
            changed = f"{size} bytes, the catalog says {expect.n_bytes}"  # no need to hash it
        else:
            reader = HashingReader(stream, expect)
    try:
        for name, data in read_members(reader, _wanted_member):
            if data is None:
                stats["member_not_decoded" if safe_member_name(name) else "member_unsafe_name"] += 1
                continue
            key, _, ext = name.rpartition("/")[2].partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current
        if isinstance(reader, HashingReader):
            try:
                reader.finish()
            except ShardChanged as exc:
                changed = str(exc)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        last = current["__key__"] if current is not None else None
        if isinstance(exc, DecompressionBomb):
            raise ShardError.at(url, last, "decompression_bomb", f"not read further: {exc}") from exc
        raise ShardError.at(
            url, last, "truncated_shard", f"truncated or unreadable tar from here on ({exc})"
        ) from exc
    finally:
        stream.close()
    if changed is not None:
        raise ShardError(
            f"{url}: after its last sample: {changed}: not the shard the catalog's shards table "
            "describes (changed or replaced since ingest; `polyp-ssl verify ROOT` checks every shard) "
            "[shard_changed]",
            "shard_changed",
        )
