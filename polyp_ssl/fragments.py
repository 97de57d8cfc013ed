"""Cutting tracklets into fragments (docs/method.md "fragment"): pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Fragment:
    frame_indices: tuple[int, ...]  # indices into the tracklet's frames (JPEG members), in time order
    first_frame_id: int
    position: float  # first frame_id normalised over the video's annotated span, in [0, 1]


def video_position(frame_id: int, video_first: int, video_last: int) -> float:
    span = video_last - video_first
    if span <= 0:
        return 0.0
    return min(1.0, max(0.0, (frame_id - video_first) / span))


def fragment_index_lists(
    n_frames: int, fragment_length: int, fragment_stride: int, drop_last: bool
) -> list[list[int]]:
    """Frame indices of each fragment of an n_frames tracklet.

    Every stride-th frame, cut in consecutive pieces of fragment_length; the last short piece is
    dropped (drop_last) or padded by repeating its last frame. fragment_length -1 = one fragment,
    the whole strided tracklet.
    """
    if fragment_stride < 1:
        raise ValueError(f"fragment_stride {fragment_stride} must be >= 1")
    strided = list(range(0, n_frames, fragment_stride))
    if not strided:
        return []
    if fragment_length == -1:
        return [strided]
    if fragment_length < 1:
        raise ValueError(f"fragment_length {fragment_length} must be >= 1 or -1")
    pieces = []
    for start in range(0, len(strided), fragment_length):
        piece = strided[start : start + fragment_length]
        if len(piece) < fragment_length:
            if drop_last:
                break
            piece = piece + [piece[-1]] * (fragment_length - len(piece))
        pieces.append(piece)
    return pieces


def count_fragments(n_frames: int, fragment_length: int, fragment_stride: int, drop_last: bool) -> int:
    """len(fragment_index_lists(...)) without building the lists (the catalog's counts)."""
    m = math.ceil(n_frames / fragment_stride) if n_frames > 0 else 0
    if m == 0:
        return 0
    if fragment_length == -1:
        return 1
    return m // fragment_length if drop_last else math.ceil(m / fragment_length)


def cut_tracklet(
    frame_ids: Sequence[int],
    video_first: int,
    video_last: int,
    fragment_length: int,
    fragment_stride: int,
    drop_last: bool,
    min_tracklet_length: int = 0,
) -> list[Fragment]:
    """The fragments of one tracklet; none when it is shorter than min_tracklet_length (counted
    before striding)."""
    if len(frame_ids) < min_tracklet_length:
        return []
    out = []
    for idx in fragment_index_lists(len(frame_ids), fragment_length, fragment_stride, drop_last):
        first = int(frame_ids[idx[0]])
        out.append(Fragment(tuple(idx), first, video_position(first, video_first, video_last)))
    return out


def even_subsample(indices: Sequence[int], max_len: int) -> list[int]:
    """At most max_len items of `indices`, evenly spread, first and last kept (eval tracklets)."""
    n = len(indices)
    if max_len <= 0 or n <= max_len:
        return list(indices)
    if max_len == 1:
        return [indices[0]]
    picks = [round(i * (n - 1) / (max_len - 1)) for i in range(max_len)]
    return [indices[p] for p in picks]
