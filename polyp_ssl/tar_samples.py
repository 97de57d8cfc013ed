"""Reading a shard's samples sequentially for training, and checking each against the catalog
before use (the loader's sequential path, and validation).
"""

from __future__ import annotations

import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch

from polyp_ssl.loader_errors import ShardError
from polyp_ssl.shards.locations import (
    HashingReader,
    ShardChanged,
    ShardIdentity,
    local_size,
)
from polyp_ssl.shards.reader import DecompressionBomb, open_shard, read_members, safe_member_name
from polyp_ssl.shards.sample import (
    JpegSizeError,
    SampleError,
    TrackletSample,
    check_jpeg,
    jpeg_size,
    sample_meta,
)

# ---------------------------------------------------------------- reading shards


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
        key = current["__key__"] if current is not None else None
        if isinstance(exc, DecompressionBomb):
            raise ShardError.at(url, key, "decompression_bomb", f"not read further: {exc}") from exc
        raise ShardError.at(
            url, key, "truncated_shard", f"truncated or unreadable tar from here on ({exc})"
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


class SampleDamage(ValueError):
    """A sample that cannot be used as the catalog describes it; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


PARSED_META = "__meta__"  # a checked sample carries its parsed TrackletSample under this key
# decoded frames a worker keeps for reuse within one batch (a 256 x 256 batch of 480 frames is 31 M);
# past it frames are decoded again, so memory stays bounded whatever sizes the JSON declares
DECODE_CACHE_PIXELS = 64 << 20


def check_sample(sample: dict[str, Any], catalog_frames: int | None) -> TrackletSample:
    """The sample's metadata, after checking it against the catalog; raises SampleDamage.

    The JSON is validated as data (shards.sample.parse_sample: `bad_json`, or `json_mismatch`
    when its per-frame lists disagree in length). JPEGs get a cheap structural check here (start
    and end markers) and their header's size is compared with the JSON's crop_sizes before any
    decoding (`json_mismatch`); a JPEG that passes but does not decode, or whose header cannot be
    read, is named when its batch is decoded, where it is never handed to a decoder.
    """
    key = sample["__key__"]
    try:
        meta = sample_meta(sample)
    except SampleError as exc:
        reason = "json_mismatch" if exc.kind == "length" else "bad_json"
        raise SampleDamage(reason, f"JSON member: {exc}") from exc
    if meta.key != key:
        raise SampleDamage("json_mismatch", f"JSON key {meta.key!r} differs from the member key")
    if catalog_frames is not None and meta.n_frames != catalog_frames:
        raise SampleDamage("json_mismatch", f"JSON has {meta.n_frames} frames, the catalog {catalog_frames}")
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
            continue  # never decoded: named by check_frame when its batch is made
        if [w, h] != list(meta.crop_sizes[i]):
            raise SampleDamage(
                "json_mismatch",
                f"member .{name} is a {w}x{h} JPEG, the JSON's crop_sizes say "
                f"{meta.crop_sizes[i][0]}x{meta.crop_sizes[i][1]}",
            )
    return meta


def check_frame(data: bytes, meta: TrackletSample, i: int, shard: str) -> tuple[int, int]:
    """Frame i's JPEG header against the JSON's crop_sizes (and shards.sample.MAX_FRAME_PIXELS),
    before anything decodes it: ShardError `corrupt_jpeg` when it has no readable header,
    `json_mismatch` when its size differs."""
    try:
        return check_jpeg(data, meta.crop_sizes[i])
    except JpegSizeError as exc:
        if exc.kind == "no_header":
            detail = f"frame {i} does not decode ({exc})"
            raise ShardError.at(shard, meta.key, "corrupt_jpeg", detail) from None
        raise ShardError.at(shard, meta.key, "json_mismatch", f"frame {i} is {exc}") from None


def decode_frame(
    data: bytes, meta: TrackletSample, i: int, shard: str, decode: Callable[[bytes], torch.Tensor]
) -> torch.Tensor:
    """Frame i decoded, its header checked first (check_frame) and its decoded size after."""
    check_frame(data, meta, i, shard)
    try:
        img = decode(data)
    except (RuntimeError, ValueError) as exc:
        raise ShardError.at(shard, meta.key, "corrupt_jpeg", f"frame {i} does not decode ({exc})") from exc
    check_size(img.shape[-1], img.shape[-2], meta, i, shard)
    return img


def check_size(width: int, height: int, meta: TrackletSample, i: int, shard: str) -> None:
    """A frame's JPEG must have the size its JSON gives (crop_sizes), which the anchor-crop windows
    are computed from; ShardError (json_mismatch) otherwise."""
    if [width, height] != list(meta.crop_sizes[i]):
        raise ShardError.at(
            shard,
            meta.key,
            "json_mismatch",
            f"frame {i} is a {width}x{height} JPEG, the JSON's crop_sizes say "
            f"{meta.crop_sizes[i][0]}x{meta.crop_sizes[i][1]}",
        )
