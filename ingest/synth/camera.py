"""The camera's path over the wall: a sequence of visits (dwell near a polyp, or on plain mucosa)
joined by smooth travel, with jitter, zoom, rotation and tilt, plus artifact frames (water,
bubbles, heavy blur) where no box is drawn.

The visit order is what makes temporal self-supervision noisy: the camera often goes back to the
polyp it just left (temporal neighbours are the same polyp), and sometimes alternates between two
polyps (temporal neighbours are a different polyp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CameraParams:
    dwell: tuple[int, int] = (30, 110)  # frames spent at a visit
    speed: float = 6.0  # frame pixels per frame during travel, at most
    p_empty: float = 0.35  # a visit to plain mucosa
    p_back: float = 0.6  # after plain mucosa, the camera returns to the polyp it left
    p_alternate: float = 0.2  # after a polyp, the camera goes back to the polyp seen before it
    p_artifact: float = 0.8  # a visit has an artifact burst (water, bubbles, blur)
    artifact_len: tuple[int, int] = (3, 12)
    zoom: tuple[float, float] = (0.8, 2.0)


@dataclass
class CameraPath:
    cx: np.ndarray  # world units (frame pixels at zoom 1), per frame
    cy: np.ndarray
    zoom: np.ndarray
    angle: np.ndarray  # radians
    tilt: np.ndarray  # anisotropy a: axes scaled by (1 + a, 1 - a)
    artifact: np.ndarray  # int8: 0 none, 1 heavy blur, 2 water / bubbles


def _ease(t: np.ndarray) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(t, 0, 1))


def _smooth_jitter(rng: np.random.Generator, n: int, amp: float, periods: tuple[float, float]) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    out = np.zeros(n)
    for _ in range(3):
        period = rng.uniform(*periods)
        out += np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.3, 1.0)
    return amp * out / 2.0


def plan_path(
    rng: np.random.Generator,
    n_frames: int,
    polyp_xy: np.ndarray,
    polyp_zoom: np.ndarray,
    world_wh: tuple[float, float],
    frame_wh: tuple[int, int],
    params: CameraParams | None = None,
) -> CameraPath:
    """Per-frame camera states. polyp_xy: P x 2 world positions; polyp_zoom: the zoom at which
    each polyp is viewed (closer for small polyps)."""
    params = params or CameraParams()
    fw, fh = frame_wh
    ww, wh = world_wh
    n_polyps = len(polyp_xy)
    margin_x, margin_y = fw * 0.6, fh * 0.6

    def empty_spot(near: np.ndarray | None = None) -> np.ndarray:
        """Plain wall, preferably a short look away from `near` (so the camera does not sweep
        across the other polyps to get there)."""
        lo, hi = np.array([margin_x, margin_y]), np.array([ww - margin_x, wh - margin_y])
        for attempt in range(80):
            if near is not None and attempt < 50:
                ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 1.6) * fw
                p = np.clip(near + dist * np.array([np.cos(ang), np.sin(ang)]), lo, hi)
            else:
                p = rng.uniform(lo, hi)
            if n_polyps == 0 or np.min(np.hypot(*(polyp_xy - p).T)) > 0.8 * fw:
                return p
        return p

    # keyframes: (frame, x, y, zoom, angle, tilt)
    keys: list[tuple[float, float, float, float, float, float]] = []
    artifact = np.zeros(n_frames, np.int8)
    t = 0.0
    current, previous = -1, -1
    seen: set[int] = set()
    state = np.array([*(polyp_xy[0] if n_polyps else empty_spot()), 1.0, 0.0, 0.0])
    first = True
    while t < n_frames:
        unseen = [k for k in range(n_polyps) if k not in seen]
        if unseen and n_frames - t < 140 * len(unseen):  # running out of video: visit the rest
            target_polyp = int(rng.choice(unseen))
        elif n_polyps == 0 or (not first and rng.random() < params.p_empty):
            target_polyp = -1
        elif current < 0 and previous >= 0 and rng.random() < params.p_back:
            target_polyp = previous  # left a polyp for plain wall, comes back to it
        elif current >= 0 and previous >= 0 and previous != current and rng.random() < params.p_alternate:
            target_polyp = previous  # back and forth between two polyps
        else:  # another polyp, one not yet seen first, so that every polyp appears
            unseen = [k for k in range(n_polyps) if k not in seen and k != current]
            choices = unseen or [k for k in range(n_polyps) if k != current] or [current]
            target_polyp = int(rng.choice(choices))
        seen.add(target_polyp)
        if target_polyp >= 0:
            z = polyp_zoom[target_polyp] * rng.uniform(0.85, 1.15)
            off = rng.uniform(-0.22, 0.22, 2) * np.array([fw, fh]) / z
            xy = polyp_xy[target_polyp] + off
        else:
            z = rng.uniform(*params.zoom) * 0.8
            xy = empty_spot(state[:2])
        target = np.array([xy[0], xy[1], z, state[3] + rng.normal(0, 0.5), rng.uniform(-0.15, 0.15)])
        if first:
            state = target
            keys.append((0.0, *state))
            first = False
        else:
            # travel: frame-space speed ~ world speed x zoom, so slow down when zoomed in
            dist = np.hypot(*(target[:2] - state[:2])) * max(state[2], target[2])
            travel = max(12.0, dist / params.speed)
            t += travel
            keys.append((t, *target))
            state = target
        dwell = float(rng.integers(*params.dwell))
        if rng.random() < params.p_artifact:
            a0 = int(t + rng.uniform(0.2, 0.8) * dwell)
            a1 = a0 + int(rng.integers(*params.artifact_len))
            artifact[max(0, a0) : max(0, min(n_frames, a1))] = int(rng.integers(1, 3))
        drift = np.array(
            [
                *rng.normal(0, 0.06, 2) * np.array([fw, fh]) / state[2],
                state[2] * rng.uniform(-0.15, 0.2),
                rng.normal(0, 0.25),
                rng.normal(0, 0.05),
            ]
        )
        t += dwell
        state = state + drift
        keys.append((t, *state))
        if target_polyp != current:
            previous, current = current, target_polyp
    # a few isolated artifact frames anywhere
    n_iso = max(1, n_frames // 150)
    artifact[rng.integers(0, n_frames, n_iso)] = 1

    kt = np.array([k[0] for k in keys])
    kv = np.array([k[1:] for k in keys])
    frames = np.arange(n_frames, dtype=np.float64)
    idx = np.clip(np.searchsorted(kt, frames, side="right") - 1, 0, len(kt) - 2)
    span = np.maximum(kt[idx + 1] - kt[idx], 1e-6)
    w = _ease((frames - kt[idx]) / span)[:, None]
    vals = kv[idx] * (1 - w) + kv[idx + 1] * w
    zoom = np.clip(vals[:, 2], 0.5, 3.5)
    jit = np.array([fw, fh]) * 0.012
    return CameraPath(
        cx=vals[:, 0] + _smooth_jitter(rng, n_frames, jit[0], (20, 60)) / zoom,
        cy=vals[:, 1] + _smooth_jitter(rng, n_frames, jit[1], (20, 60)) / zoom,
        zoom=zoom * (1 + _smooth_jitter(rng, n_frames, 0.03, (30, 90))),
        angle=vals[:, 3] + _smooth_jitter(rng, n_frames, 0.04, (30, 90)),
        tilt=np.clip(vals[:, 4], -0.25, 0.25),
        artifact=artifact,
    )
