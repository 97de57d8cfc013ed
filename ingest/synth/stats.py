"""Measured properties of a dataset root (synthetic or real, the seed's COCO layout): counts,
how noisy temporal self-supervision is on it, label balance, and how hard appearance alone makes
re-identification.

- temporal association precision: for each tracklet, the nearest-in-time other tracklet of the
  same video (smallest frame gap between the two spans, 0 when they overlap; ties: nearest
  midpoint, then earliest start) is the same polyp. Tracklets alone in their video are excluded.
- appearance difficulty: retrieval mAP on the test split of `describe_tracklet` (colour
  histogram), cosine similarity, positives = same identity, queries without positives excluded.
Tracklets are `ingest.tracklets.build_tracklets` (separation 1, iou_min 0.1) per identity.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from polyp_ssl.ingest.media import HEAD_BYTES, check_image_head
from polyp_ssl.ingest.synth.descriptor import describe_tracklet
from polyp_ssl.ingest.tracklets import Box, build_tracklets
from polyp_ssl.shards.files import open_regular, open_regular_text
from polyp_ssl.shards.retrieval import cosine_map

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ADENOMA_LABELS = {"AD"}
KNOWN_HISTOLOGY = {"AD", "HP", "SSL", "TSA"}
DIMINUTIVE_MM = 5.0
MIN_TRACKLET_LENGTH = 30

# the ranges the default synthetic dataset is tuned to (closed intervals; None = unbounded)
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "temporal_association_precision": (0.55, 0.85),
    "mean_tracklets_per_polyp": (2.5, None),
    "diminutive_fraction": (0.3, 0.7),
    "adenoma_fraction": (0.3, 0.7),
    "appearance_map": (0.25, 0.75),
}


@dataclass(frozen=True)
class Tracklet:
    video: str
    identity: str  # unique over the dataset: "{video}|{identity_id}"
    split: str
    boxes: tuple[Box, ...]

    @property
    def start(self) -> int:
        return self.boxes[0].frame_id

    @property
    def end(self) -> int:
        return self.boxes[-1].frame_id


def video_key(image: dict) -> str:
    """`{dataset_id}/{sequence_id}` when the image has a dataset_id, else `sequence_id`."""
    ds = image.get("dataset_id")
    return f"{ds}/{image['sequence_id']}" if ds not in (None, "") else str(image["sequence_id"])


def coco_tracklets(coco: dict, split: str) -> list[Tracklet]:
    """Tracklets of one COCO dict, per (video, identity), in (video, identity, time) order."""
    images = {im["id"]: im for im in coco["images"]}
    by_identity: dict[tuple[str, str], list[Box]] = defaultdict(list)
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        key = (video_key(im), str(a["identity_id"]))
        by_identity[key].append(Box(a["id"], a["image_id"], int(im["frame_id"]), tuple(a["bbox"])))
    out = []
    for (video, ident), boxes in sorted(by_identity.items()):
        for tr in build_tracklets(boxes, separation=1, iou_min=0.1):
            out.append(Tracklet(video, f"{video}|{ident}", split, tuple(tr)))
    return out


def temporal_association_precision(
    spans: Sequence[tuple[str, str, int, int]],
) -> tuple[float | None, int, int]:
    """spans: (video, identity, start_frame, end_frame). Returns (precision, queries, excluded)."""
    by_video: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for video, ident, s, e in spans:
        by_video[video].append((ident, s, e))
    hits = queries = excluded = 0
    for items in by_video.values():
        if len(items) < 2:
            excluded += len(items)
            continue
        for i, (ident, s, e) in enumerate(items):
            mid = (s + e) / 2.0
            others = [
                (max(0, sj - e, s - ej), abs((sj + ej) / 2.0 - mid), sj, idj)
                for j, (idj, sj, ej) in enumerate(items)
                if j != i
            ]
            hits += min(others)[3] == ident  # gap, then midpoint distance, then start
            queries += 1
    return (hits / queries if queries else None), queries, excluded


def retrieval_map(descriptors: np.ndarray, identities: Sequence[str]) -> tuple[float | None, int, int]:
    """Mean over queries of sklearn's average precision, ranking all other items by cosine
    similarity; positives = same identity. Returns (mAP, queries, excluded: no positive)."""
    mean_ap, queries, excluded = cosine_map(descriptors, np.asarray(identities))
    return (mean_ap if queries else None), queries, excluded


def appearance_transfer(
    first: np.ndarray, second: np.ndarray, identities: Sequence[str], videos: Sequence[str]
) -> dict:
    """Does a polyp look alike across its tracklets as within one? From each tracklet's two
    halves' descriptors (`first`, `second`), mean cosine similarities: `within` (a tracklet's two
    halves), `cross` (halves of two tracklets of the same polyp) and `other` (halves of different
    polyps of the same video), and `transfer` = (cross - other) / (within - other): 1 when
    tracklet-level invariance already covers a polyp's other tracklets (a tracklet sampler then
    learns what temporal bags would add), 0 when a polyp's tracklets look as unlike as two polyps."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit(first), unit(second)
    ids, vids = np.asarray(identities), np.asarray(videos)
    n = len(ids)
    if n == 0:
        return {"within": None, "cross": None, "other": None, "transfer": None, "cross_pairs": 0}
    within = float(np.mean(np.sum(a * b, axis=1)))
    sim = a @ b.T  # first half of i vs second half of j (a pair's two directions both count)
    off = ~np.eye(n, dtype=bool)
    same_id = (ids[:, None] == ids[None, :]) & off
    other = (ids[:, None] != ids[None, :]) & (vids[:, None] == vids[None, :])
    cross = float(sim[same_id].mean()) if same_id.any() else None
    oth = float(sim[other].mean()) if other.any() else None
    known = cross is not None and oth is not None and within > oth
    transfer = (cross - oth) / (within - oth) if known else None
    return {
        "within": round(within, 4),
        "cross": round(cross, 4) if cross is not None else None,
        "other": round(oth, 4) if oth is not None else None,
        "transfer": round(transfer, 4) if transfer is not None else None,
        "cross_pairs": int(same_id.sum() // 2),
    }


def _describe(root: Path, coco: dict, tracklets: list[Tracklet], part: str = "all") -> np.ndarray:
    images = {im["id"]: im for im in coco["images"]}
    cache: dict[int, np.ndarray] = {}

    def load(image_id: int) -> np.ndarray:
        if image_id not in cache:
            path = root / "images" / images[image_id]["file_name"]
            with open_regular(path, f"image {image_id}") as f:  # a FIFO or device: refused by name
                data = f.read()
            check_image_head(path, data[:HEAD_BYTES])  # JPEG, PNG or BMP by its bytes
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise FileNotFoundError(f"{path}: image {image_id} cannot be read")
            cache[image_id] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return cache[image_id]

    out = []
    for tr in tracklets:
        boxes = tr.boxes
        half = max(1, len(boxes) // 2)
        boxes = {"all": boxes, "first": boxes[:half], "second": boxes[half:] or boxes[-1:]}[part]
        out.append(describe_tracklet([load(b.image_id) for b in boxes], [b.bbox for b in boxes]))
        if len(cache) > 4096:
            cache.clear()
    return np.stack(out) if out else np.zeros((0, 1), np.float32)


def _split_counts(coco: dict, tracklets: list[Tracklet]) -> dict:
    images = coco["images"]
    with_polyp = {a["image_id"] for a in coco["annotations"]}
    lengths = [len(t.boxes) for t in tracklets]
    return {
        "videos": len({video_key(im) for im in images}),
        "frames": len(images),
        "annotations": len(coco["annotations"]),
        "polyps": len({t.identity for t in tracklets}),
        "tracklets": len(tracklets),
        f"tracklets_ge_{MIN_TRACKLET_LENGTH}": sum(n >= MIN_TRACKLET_LENGTH for n in lengths),
        "mean_tracklet_length": round(float(np.mean(lengths)), 2) if lengths else None,
        "frames_with_polyp_fraction": round(len(with_polyp) / len(images), 4) if images else None,
    }


def _label_fractions(cocos: dict[str, dict]) -> dict:
    sizes: dict[str, float] = {}
    hists: dict[str, str] = {}
    for coco in cocos.values():
        images = {im["id"]: im for im in coco["images"]}
        for a in coco["annotations"]:
            ident = f"{video_key(images[a['image_id']])}|{a['identity_id']}"
            if a.get("size") is not None:
                sizes.setdefault(ident, float(a["size"]))
            if a.get("histology") is not None:
                hists.setdefault(ident, str(a["histology"]))
    known = [h for h in hists.values() if h in KNOWN_HISTOLOGY]
    return {
        "diminutive_fraction": round(sum(s <= DIMINUTIVE_MM for s in sizes.values()) / len(sizes), 4)
        if sizes
        else None,
        "adenoma_fraction": round(sum(h in ADENOMA_LABELS for h in known) / len(known), 4) if known else None,
        "polyps_with_size": len(sizes),
        "histology_counts": dict(sorted(Counter(hists.values()).items())),
        "histology_unknown": len(hists) - len(known),
    }


def load_root(root: Path) -> dict[str, dict]:
    """The split annotation files present under root/annotations (at least one)."""
    cocos = {}
    for split in SPLITS:
        path = root / "annotations" / f"instances_{split}.json"
        if path.exists():
            try:
                with open_regular_text(path, "annotation file") as f:
                    cocos[split] = json.loads(f.read())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
            for field in ("images", "annotations"):
                if field not in cocos[split]:
                    raise ValueError(f"{path}: missing field {field!r}")
    if not cocos:
        raise FileNotFoundError(f"{root}: no annotations/instances_{{train,val,test}}.json")
    return cocos


def dataset_stats(root: str | Path, appearance_split: str = "test") -> dict:
    """Every measured property of a dataset root, as a JSON-ready dict."""
    root = Path(root)
    cocos = load_root(root)
    tracklets = {s: coco_tracklets(c, s) for s, c in cocos.items()}
    every = [t for ts in tracklets.values() for t in ts]
    splits = {s: _split_counts(cocos[s], tracklets[s]) for s in cocos}
    totals = {
        k: sum(v[k] or 0 for v in splits.values())
        for k in (
            "videos",
            "frames",
            "annotations",
            "polyps",
            "tracklets",
            f"tracklets_ge_{MIN_TRACKLET_LENGTH}",
        )
    }
    lengths = [len(t.boxes) for t in every]
    totals["mean_tracklet_length"] = round(float(np.mean(lengths)), 2) if lengths else None
    n_with = sum(len({a["image_id"] for a in c["annotations"]}) for c in cocos.values())
    totals["frames_with_polyp_fraction"] = round(n_with / totals["frames"], 4) if totals["frames"] else None
    precision, tap_q, tap_x = temporal_association_precision(
        [(t.video, t.identity, t.start, t.end) for t in every]
    )
    out = {
        "root": str(root),
        "splits": splits,
        "totals": totals,
        "temporal_association_precision": round(precision, 4) if precision is not None else None,
        "temporal_association_queries": tap_q,
        "temporal_association_excluded": tap_x,
        "mean_tracklets_per_polyp": round(len(every) / totals["polyps"], 3) if totals["polyps"] else None,
    }
    out.update(_label_fractions(cocos))
    app = tracklets.get(appearance_split, [])
    if app:
        desc = _describe(root, cocos[appearance_split], app)
        m, q, x = retrieval_map(desc, [t.identity for t in app])
        halves = [_describe(root, cocos[appearance_split], app, part) for part in ("first", "second")]
        transfer = appearance_transfer(*halves, [t.identity for t in app], [t.video for t in app])
    else:
        m, q, x = None, 0, 0
        transfer = appearance_transfer(np.zeros((0, 1)), np.zeros((0, 1)), [], [])
    out.update(
        appearance_split=appearance_split,
        appearance_map=round(m, 4) if m is not None else None,
        appearance_queries=q,
        appearance_excluded=x,
        appearance_transfer=transfer,
    )
    return out


def out_of_range(stats: dict) -> list[str]:
    """The measured properties outside TARGETS, as messages (empty when all are in range)."""
    problems = []
    for key, (lo, hi) in TARGETS.items():
        v = stats.get(key)
        if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
            problems.append(f"{key} = {v} not in [{lo}, {hi}]")
    return problems
