"""Thumbnails of test tracklets for report.html: the eval anchor crop (shards.crops rule, as the
gallery figure draws it) of a few stored frames per tracklet, read by member name from the shards
the catalog names, as small JPEG data: URIs.

Each tracklet gets its middle frame (gallery, pairs) and HOVER_FRAMES frames spread over its length
(the map's hover). A shard that cannot be read costs its tracklets' thumbnails, not the report:
the page says how many are missing and why.
"""

from __future__ import annotations

import base64
import io
import logging
import tarfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("polyp_ssl.eval.report")

THUMB_PX = 64  # thumbnails are THUMB_PX x THUMB_PX (anchor crops are square once resized)
JPEG_QUALITY = 70
HOVER_FRAMES = 4


@dataclass
class TrackletRef:
    shard: str  # relative to the root, checked (shards.locations)
    key: str
    n_frames: int


@dataclass
class Thumbs:
    """tracklet id -> {"mid": data URI, "frames": [data URI, ...]}; the tracklets without one."""

    images: dict[str, dict[str, object]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # tracklet id -> why


def catalog_refs(root: Path, wanted: set[str]) -> dict[str, TrackletRef]:
    """The shard, sample key and frame count of the `wanted` tracklets from ROOT's catalog; a shard
    path that leaves the root is an error naming the catalog file and the tracklet."""
    from polyp_ssl.eval.report_subjects import ReportError
    from polyp_ssl.shards.locations import UnsafeLocation, check_shard_value
    from polyp_ssl.shards.tables import read_catalog_table

    path = root / "catalog" / "tracklets.parquet"
    cols = ["tracklet_id", "shard", "sample_key", "n_frames"]
    t = read_catalog_table(root, "tracklets", cols, checked=False).to_pydict()
    refs = {}
    try:
        for tid, rel, key, n in zip(*(t[c] for c in cols), strict=True):
            if str(tid) not in wanted:
                continue
            check_shard_value(rel, path, f"tracklet {tid!r}")
            refs[str(tid)] = TrackletRef(str(rel), str(key), int(n or 0))
    except UnsafeLocation as exc:
        raise ReportError(str(exc)) from None
    return refs


def frame_picks(n_frames: int) -> tuple[int, list[int]]:
    """The middle frame (the gallery figure's) and HOVER_FRAMES frames spread over the tracklet,
    first and last included (arithmetic only: a catalog's frame count allocates nothing)."""
    n = max(int(n_frames), 1)
    hover = dict.fromkeys(int(round(j * (n - 1) / (HOVER_FRAMES - 1))) for j in range(HOVER_FRAMES))
    return n // 2, list(hover)


def data_uri(crop) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_thumbs(root: Path, tracklet_ids: Iterable[str], scale: float) -> Thumbs:
    """Thumbnails of `tracklet_ids` (each read once, shard by shard)."""
    wanted = list(dict.fromkeys(str(t) for t in tracklet_ids))
    out = Thumbs()
    if not wanted:
        return out
    refs = catalog_refs(root, set(wanted))
    by_shard: dict[str, list[str]] = defaultdict(list)
    for tid in wanted:
        ref = refs.get(tid)
        if ref is None:
            out.missing[tid] = "not in the catalog"
        else:
            by_shard[ref.shard].append(tid)
    for shard, tids in by_shard.items():
        try:
            _read_shard(root, shard, [(t, refs[t]) for t in tids], scale, out)
        except (ValueError, OSError, tarfile.TarError) as e:
            for t in tids:
                out.missing.setdefault(t, f"{shard}: {e}")
            log.warning("report.html: thumbnails of %d tracklets not drawn: %s: %s", len(tids), shard, e)
    return out


def _read_shard(
    root: Path, shard: str, items: list[tuple[str, TrackletRef]], scale: float, out: Thumbs
) -> None:
    from polyp_ssl.eval.gallery import anchor_crop
    from polyp_ssl.shards.locations import shard_location
    from polyp_ssl.shards.reader import open_shard, read_members, safe_member_name
    from polyp_ssl.shards.remote import remote_root
    from polyp_ssl.shards.sample import JSON_EXT, SampleError, frame_ext, parse_sample

    url = remote_root(root)  # a root in an object store: the object, streamed
    path = Path(shard_location(shard, root)) if url is None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"{path}: shard named by the catalog is missing")
    wanted: set[str] = set()
    for _, ref in items:
        mid, hover = frame_picks(ref.n_frames)
        wanted.add(f"{ref.key}.{JSON_EXT}")
        wanted.update(f"{ref.key}.{frame_ext(i)}" for i in {mid, *hover})
    members: dict[str, bytes] = {}
    opened = open_shard(shard_location(shard, url)) if url is not None else open(path or "", "rb")  # noqa: SIM115
    with opened as f:  # the shard reader: sizes bounded by the file, never extracted
        for name, data in read_members(f, lambda n: n in wanted and safe_member_name(n)):
            if data is not None:
                members[name] = data
    for tid, ref in items:
        try:
            raw = members.get(f"{ref.key}.{JSON_EXT}")
            if raw is None:
                raise ValueError(f"sample {ref.key!r} has no .json member")
            meta = parse_sample(raw)
            if meta.n_frames != ref.n_frames:
                raise ValueError(f"sample {ref.key!r} has {meta.n_frames} frames, the catalog {ref.n_frames}")
            mid, hover = frame_picks(meta.n_frames)
            crops = {}
            for i in dict.fromkeys([mid, *hover]):
                jpeg = members.get(f"{ref.key}.{frame_ext(i)}")
                if jpeg is None:
                    raise ValueError(f"sample {ref.key!r} has no member .{frame_ext(i)}")
                crops[i] = data_uri(anchor_crop(meta, jpeg, i, scale, THUMB_PX))
            out.images[tid] = {"mid": crops[mid], "frames": [crops[i] for i in hover]}
        except (ValueError, SampleError) as e:
            out.missing[tid] = f"{path}: {e}"
            log.warning("report.html: no thumbnail for tracklet %r: %s: %s", tid, path, e)
