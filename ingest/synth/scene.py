"""The colon wall of one video: a large mucosa texture (colour, vessels, folds) that the camera
samples, plus frame-space maps (vignetting, lumen darkness, sensor noise) that move with the
camera rather than the wall.

Images are float32 BGR in [0, 1] while being built (OpenCV's channel order).
"""

from __future__ import annotations

import cv2
import numpy as np


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Value noise in about [-1, 1]: random grids of `cell`-pixel cells upsampled bicubically, summed
    over octaves of halving cell size and amplitude."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
        grid = rng.standard_normal((gh, gw)).astype(np.float32)
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.5
        cell = max(2.0, cell / 2.0)
    return out / total


def mucosa_colour(rng: np.random.Generator) -> np.ndarray:
    """A pink-to-orange mucosa base colour (BGR, [0, 1]) for one video."""
    r = rng.uniform(0.72, 0.88)
    g = r * rng.uniform(0.40, 0.58)
    b = g * rng.uniform(0.72, 1.0)
    return np.array([b, g, r], np.float32)


def _draw_vessels(rng: np.random.Generator, layer: np.ndarray, n: int, scale: float) -> None:
    """Branching random-walk curves (submucosal vessels) drawn into a single-channel layer."""
    h, w = layer.shape
    for _ in range(n):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        heading = rng.uniform(0, 2 * np.pi)
        width = int(rng.integers(1, 4))
        strength = float(rng.uniform(0.35, 1.0))
        pts = [(x, y)]
        for _ in range(int(rng.integers(8, 30))):
            heading += rng.normal(0, 0.45)
            step = rng.uniform(6, 16) * scale
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
            pts.append((x, y))
            if rng.random() < 0.08:  # a side branch
                bx, by, bh = x, y, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
                branch = [(bx, by)]
                for _ in range(int(rng.integers(3, 10))):
                    bh += rng.normal(0, 0.5)
                    bx, by = bx + 8 * scale * np.cos(bh), by + 8 * scale * np.sin(bh)
                    branch.append((bx, by))
                cv2.polylines(
                    layer, [np.int32(branch)], False, strength * 0.7, max(1, width - 1), cv2.LINE_AA
                )
        cv2.polylines(layer, [np.int32(pts)], False, strength, width, cv2.LINE_AA)


def _fold_height(rng: np.random.Generator, h: int, w: int, n: int, scale: float) -> np.ndarray:
    """Haustral folds as thick blurred arcs in a height map."""
    height = np.zeros((h, w), np.float32)
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(-0.2 * h, 1.2 * h)
        ax, ay = rng.uniform(0.4, 1.2) * w / 3, rng.uniform(0.3, 1.0) * h / 3
        angle = rng.uniform(0, 180)
        start = rng.uniform(0, 360)
        span = rng.uniform(60, 200)
        thick = max(1, int(rng.uniform(30, 70) * scale))
        cv2.ellipse(
            height,
            (int(cx), int(cy)),
            (int(ax), int(ay)),
            angle,
            start,
            start + span,
            float(rng.uniform(0.4, 0.8)),
            thick,
            cv2.LINE_AA,
        )
    k = int(20 * scale) * 2 + 1
    return cv2.GaussianBlur(height, (k, k), 0)


def mucosa_texture(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """The wall texture, float32 BGR [0, 1], h x w texture pixels; `scale` = texture pixels per
    frame pixel at zoom 1 times the frame-size factor (feature sizes grow with it).

    Low-frequency layers (colour blotches, folds) are built at a quarter of the resolution and
    upsampled, which keeps a multi-megapixel texture under a fraction of a second."""
    base = mucosa_colour(rng)
    qh, qw = max(8, h // 4), max(8, w // 4)
    # blotchy colour variation, stronger in red (inflammation, bile tints)
    low = cv2.resize(smooth_noise(rng, qh, qw, 30 * scale, 3), (w, h))
    # folds: raised ridges, lit from above-left, shadow below
    fold = _fold_height(rng, qh, qw, int(h * w / (160000 * scale * scale)) + 3, scale / 4)
    gy, gx = np.gradient(fold)
    shade_q = np.clip(1.0 + 0.2 * fold - 14.0 * scale / 4 * (gy * 0.8 + gx * 0.3), 0.45, 1.5)
    lum = cv2.resize(shade_q.astype(np.float32), (w, h))
    lum *= 1.0 + 0.04 * smooth_noise(rng, h, w, 18 * scale, 2) + 0.035 * smooth_noise(rng, h, w, 3 * scale, 1)
    tint = np.array([0.5, 0.8, 1.0], np.float32) * 0.07
    tex = np.empty((h, w, 3), np.float32)
    for c in range(3):
        tex[..., c] = lum * (base[c] * (1.0 + tint[c] * low))
    # vessels: darker, bluish-purple lines
    vessels = np.zeros((h, w), np.float32)
    _draw_vessels(rng, vessels, int(h * w / (9000 * scale * scale)), scale)
    a = cv2.GaussianBlur(vessels, (3, 3), 0) * 0.55
    vessel_colour = np.array([0.35, 0.18, 0.45], np.float32) * rng.uniform(0.8, 1.1)
    for c in range(3):
        ch = tex[..., c]
        ch -= a * (ch - vessel_colour[c] * lum)
    return np.clip(tex, 0, 1, out=tex)


def vignette(h: int, w: int, strength: float = 0.55) -> np.ndarray:
    """Endoscope light fall-off: 1 at the centre, 1 - strength in the corners (float32 h x w)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((x - w / 2) / (w / 2)) ** 2 + ((y - h / 2) / (h / 2)) ** 2
    return (1.0 - strength * np.clip(r2 / 2.0, 0, 1) ** 1.2).astype(np.float32)


def lumen_map(h: int, w: int) -> np.ndarray:
    """A dark lumen blob on a 2h x 2w canvas; slicing an h x w window at an offset moves it."""
    y, x = np.mgrid[0 : 2 * h, 0 : 2 * w].astype(np.float32)
    r = np.sqrt(((x - w) / (0.35 * w)) ** 2 + ((y - h) / (0.35 * h)) ** 2)
    return (1.0 - 0.8 * np.exp(-(r**2))).astype(np.float32)


def noise_tile(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Sensor noise on a (h + 64) x (w + 64) tile; frames take a window at a random offset."""
    return (rng.standard_normal((h + 64, w + 64, 1)) * sigma).astype(np.float32)
