"""The catalog's tables, defined once: every writer and reader of the catalog uses these schemas.

A catalog is a folder `catalog/` of one Parquet file per table plus `manifest.json`. Readers
pin these schemas (never infer them from the first file) so that an older or newer part is
caught instead of silently re-interpreted by column position.
"""

from __future__ import annotations

import pyarrow as pa

CATALOG_VERSION = 3  # 2: position_in_video over the video's annotated frames; 3: member byte spans

# What a root's identity_id stands for, the manifest's field "identities": "polyps" (one physical
# polyp: retrieval, re-id, counting, probes and the multipos sampler use it) or "tracks" (one
# tracker's track, made by `convert mot --tracks`: a polyp may have several, so nothing may use
# them as polyps). A manifest without the field (every root before it) is "polyps".
IDENTITY_KINDS = ("polyps", "tracks")


def identity_kind(manifest: dict) -> str:
    """The identity kind a manifest (or convert report) states; ValueError naming the field for a
    value that is not one of IDENTITY_KINDS."""
    value = manifest.get("identities", "polyps")
    if value not in IDENTITY_KINDS:
        raise ValueError(f"field 'identities' is {str(value)[:40]!r}, expected one of {IDENTITY_KINDS}")
    return value


VIDEOS = pa.schema(
    [
        # unique within the dataset root: sequence_id, prefixed by "{dataset_id}/" if any
        ("video_id", pa.string()),
        ("dataset_id", pa.string()),
        ("sequence_id", pa.string()),
        ("split", pa.string()),
        ("first_frame", pa.int64()),  # span of the video's frames in the annotation file
        ("last_frame", pa.int64()),
        ("n_images", pa.int64()),
        ("n_polyps", pa.int32()),
        ("n_tracklets", pa.int32()),
    ]
)

POLYPS = pa.schema(
    [
        ("identity_id", pa.string()),
        ("video_id", pa.string()),
        ("dataset_id", pa.string()),
        ("split", pa.string()),
        ("size_mm", pa.float64()),  # null when unknown
        ("histology", pa.string()),  # the dataset's own label, null when unknown
        ("n_tracklets", pa.int32()),
        ("n_frames", pa.int64()),
    ]
)

TRACKLETS = pa.schema(
    [
        ("tracklet_id", pa.string()),  # "{identity_id}#{k}", k = 0.. in time order within the identity
        ("split", pa.string()),
        ("dataset_id", pa.string()),
        ("video_id", pa.string()),
        ("identity_id", pa.string()),
        ("start_frame", pa.int64()),
        ("end_frame", pa.int64()),
        ("n_frames", pa.int32()),
        ("position_in_video", pa.float64()),  # start_frame in [0, 1] over the video's annotated span
        ("size_mm", pa.float64()),
        ("histology", pa.string()),
        ("shard", pa.string()),  # path relative to the output root, e.g. shards/train/train-000000.tar
        ("sample_key", pa.string()),  # webdataset __key__ of the tracklet's sample in that shard
        ("json_offset", pa.int64()),  # byte offset of the `{sample_key}.json` member's data in the shard
        ("json_size", pa.int64()),  # its length in bytes
        ("json_crc32", pa.int64()),  # CRC-32 of those bytes (zlib.crc32, unsigned)
    ]
)

FRAMES = pa.schema(
    [
        ("tracklet_id", pa.string()),
        ("frame_index", pa.int32()),  # 0.. within the tracklet; member `{sample_key}.{frame_index:04d}.jpg`
        ("frame_id", pa.int64()),
        ("image_id", pa.int64()),
        ("annotation_id", pa.int64()),
        ("file_name", pa.string()),
        ("bbox_x", pa.float64()),  # original box, source-frame pixels
        ("bbox_y", pa.float64()),
        ("bbox_w", pa.float64()),
        ("bbox_h", pa.float64()),
        ("crop_x0", pa.int32()),  # stored crop rectangle in source-frame pixels, [x0, x1) x [y0, y1)
        ("crop_y0", pa.int32()),
        ("crop_x1", pa.int32()),
        ("crop_y1", pa.int32()),
        ("stored_w", pa.int32()),  # size of the stored JPEG
        ("stored_h", pa.int32()),
        ("jpeg_offset", pa.int64()),  # byte offset of the frame's JPEG member's data in the shard
        ("jpeg_size", pa.int64()),  # its length in bytes
        ("jpeg_crc32", pa.int64()),  # CRC-32 of those bytes (zlib.crc32, unsigned)
    ]
)

SHARDS = pa.schema(
    [
        ("path", pa.string()),  # relative to the output root
        ("split", pa.string()),
        ("n_samples", pa.int64()),
        ("n_bytes", pa.int64()),
        ("sha256", pa.string()),
        ("first_video", pa.string()),
        ("last_video", pa.string()),
    ]
)

ERRORS = pa.schema(
    [
        ("source", pa.string()),  # the file the problem is in
        ("id", pa.string()),  # the annotation / image / video id, when there is one
        ("field", pa.string()),  # the offending field, when there is one
        ("reason", pa.string()),  # short stable code, e.g. "missing_image", "zero_area_box"
        ("detail", pa.string()),  # human-readable message
        ("action", pa.string()),  # "skipped" (data left out) or "fixed" (e.g. box clamped, data kept)
    ]
)

TABLES: dict[str, pa.Schema] = {
    "videos": VIDEOS,
    "polyps": POLYPS,
    "tracklets": TRACKLETS,
    "frames": FRAMES,
    "shards": SHARDS,
    "errors": ERRORS,
}


def embeddings_schema(dim: int) -> pa.Schema:
    """One row per embedded tracklet (fragment_index = -1) or fragment (0..)."""
    return pa.schema(
        [
            ("tracklet_id", pa.string()),
            ("sample_key", pa.string()),
            ("split", pa.string()),
            ("video_id", pa.string()),
            ("identity_id", pa.string()),
            ("fragment_index", pa.int32()),
            ("start_frame", pa.int64()),
            ("vector", pa.list_(pa.float32(), dim)),
        ]
    )
