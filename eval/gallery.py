"""Retrieval gallery: a few query tracklets, each with its top-k results marked right or wrong.

The crops are the anchor crops of each tracklet's middle frame, read straight from the shard
members (`{key}.json`, `{key}.{i:04d}.jpg`, shards/sample.py) by name, so a handful of crops
costs a handful of member reads, not a pass over the split.
"""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyp_ssl.eval.plots import save_figure
from polyp_ssl.shards.crops import enlarge_box
from polyp_ssl.shards.locations import shard_location
from polyp_ssl.shards.reader import open_shard, read_members, safe_member_name
from polyp_ssl.shards.remote import remote_root
from polyp_ssl.shards.sample import (
    JSON_EXT,
    JpegSizeError,
    SampleError,
    TrackletSample,
    check_jpeg,
    frame_ext,
    parse_sample,
)

RIGHT = (0.10, 0.65, 0.20)  # green
WRONG = (0.85, 0.10, 0.10)  # red


@dataclass
class GalleryRow:
    query: int  # row index into the embedded tracklets
    results: list[int]  # row indices of the top-k, best first
    correct: list[bool]  # result shares the query's identity


def cosine_top_k(vectors: np.ndarray, query: int, k: int) -> list[int]:
    """Indices of the k rows most similar (cosine) to row `query`, itself excluded, best first;
    ties broken by row index so the gallery is deterministic."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = x @ x[query]
    sims[query] = -np.inf
    order = np.lexsort((np.arange(len(sims)), -sims))
    return [int(i) for i in order[: min(k, len(sims) - 1)]]


def pick_gallery_rows(
    vectors: np.ndarray, identities: Sequence[str], n_queries: int = 4, k: int = 5
) -> list[GalleryRow]:
    """Queries spread over the split (evenly spaced among tracklets that have a positive), each
    with its top-k results."""
    ids = [str(v) for v in identities]
    counts: dict[str, int] = defaultdict(int)
    for v in ids:
        counts[v] += 1
    eligible = [i for i, v in enumerate(ids) if counts[v] > 1]
    if not eligible or len(ids) < 2:
        return []
    n = min(n_queries, len(eligible))
    picks = [eligible[int(round(j * (len(eligible) - 1) / max(n - 1, 1)))] for j in range(n)]
    rows = []
    for q in dict.fromkeys(picks):
        res = cosine_top_k(vectors, q, k)
        rows.append(GalleryRow(q, res, [ids[r] == ids[q] for r in res]))
    return rows


def anchor_crop(meta: TrackletSample, jpeg: bytes, frame_index: int, scale: float, size: int) -> np.ndarray:
    """The eval anchor crop (shards.crops rule) of one stored frame as uint8 [size, size, 3]."""
    from PIL import Image

    w, h = check_jpeg(jpeg, meta.crop_sizes[frame_index])  # before PIL allocates anything
    with Image.open(io.BytesIO(jpeg)) as raw:
        if raw.size != (w, h):
            got = f"{raw.size[0]}x{raw.size[1]}"
            raise ValueError(f"sample {meta.key!r}: frame {frame_index}: PIL reads {got}, its header {w}x{h}")
        img = raw.convert("RGB")
    box = enlarge_box(meta.boxes_in_crop[frame_index], scale, img.width, img.height)
    img = img.crop(box).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def read_middle_crops(
    root: str | Path, shard_and_keys: Sequence[tuple[str, str]], scale: float, size: int = 96
) -> list[np.ndarray]:
    """Anchor crops of the middle frame of each (shard path relative to root, sample_key)."""
    root = Path(root)
    by_shard: dict[str, list[str]] = defaultdict(list)
    for shard, key in shard_and_keys:
        by_shard[shard].append(key)
    crops: dict[tuple[str, str], np.ndarray] = {}
    for shard, keys in by_shard.items():
        url = remote_root(root)  # a root in an object store: the object is streamed
        path = Path(shard_location(shard, url or root))  # a plain relative path inside the root, or an error
        if url is None and not path.is_file():
            raise FileNotFoundError(f"{path}: shard named by the catalog is missing")
        wanted = set(keys)
        members: dict[str, dict[str, bytes]] = defaultdict(dict)

        def select(name: str, wanted: set[str] = wanted) -> bool:
            return name.split(".", 1)[0] in wanted and safe_member_name(name)

        try:
            opened = open_shard(shard_location(shard, url)) if url else open(path, "rb")  # noqa: SIM115
            with opened as f:  # the shard reader: sizes bounded by the file, never extracted
                for name, data in read_members(f, select):
                    if data is not None:
                        key, _, ext = name.partition(".")
                        members[key][ext] = data
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{path}: cannot read the shard ({e})") from e
        for key in dict.fromkeys(keys):
            sample = members.get(key, {})
            if JSON_EXT not in sample:
                raise ValueError(f"{path}: sample {key!r} has no .json member")
            try:
                meta = parse_sample(sample[JSON_EXT])
            except SampleError as e:
                raise ValueError(f"{path}: sample {key!r}: {e}") from e
            mid = meta.n_frames // 2
            jpeg = sample.get(frame_ext(mid))
            if jpeg is None:
                raise ValueError(f"{path}: sample {key!r} has no member .{frame_ext(mid)}")
            try:
                crops[(shard, key)] = anchor_crop(meta, jpeg, mid, scale, size)
            except JpegSizeError as e:
                field = f"crop_sizes[{mid}]"
                raise ValueError(f"{path}: sample {key!r}: field {field!r}: frame {mid} is {e}") from e
    return [crops[(s, k)] for s, k in shard_and_keys]


def plot_gallery(
    query_crops: Sequence[np.ndarray],
    result_crops: Sequence[Sequence[np.ndarray]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    query_labels: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """One row per query: the query crop (blue frame), then its results framed green (same polyp)
    or red (another polyp). Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(query_crops)
    if n_rows == 0:
        raise ValueError("gallery needs at least one query")
    k = max(len(r) for r in result_crops)
    fig, axes = plt.subplots(n_rows, k + 1, figsize=(1.4 * (k + 1), 1.55 * n_rows), dpi=80, squeeze=False)
    for r in range(n_rows):
        cells = [(query_crops[r], (0.15, 0.35, 0.9), "query")]
        for j, crop in enumerate(result_crops[r]):
            ok = bool(correct[r][j])
            cells.append((crop, RIGHT if ok else WRONG, f"#{j + 1} {'right' if ok else 'wrong'}"))
        for c in range(k + 1):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            img, colour, text = cells[c]
            ax.imshow(img)
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(4)
            if c == 0 and query_labels is not None:
                text = f"query {query_labels[r]}"
            ax.set_title(text, fontsize=7, color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
