"""Polyps: labels (size, histology) drawn for the whole dataset, and each polyp's stable look
(shape, colour, surface pattern) rendered once as an RGBA sprite on the wall texture.

The look depends on histology through overlapping distributions (adenomas tend to be redder with
tubular pits, hyperplastic polyps paler with dots, serrated lesions flat, pale and mucus-capped,
TSA red and villous), so histology is visible but not a function of the look.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from polyp_ssl.ingest.synth.scene import smooth_noise

HISTOLOGIES = ("AD", "HP", "SSL", "TSA")
ADENOMA = "AD"


@dataclass(frozen=True)
class PolypLabel:
    size_mm: float
    histology: str


def draw_labels(rng: np.random.Generator, n: int) -> list[PolypLabel]:
    """Labels of n polyps: exactly round(n/2) diminutive (<= 5 mm) and round(n/2) adenomas, the
    rest HP/SSL/TSA about 5:3:2, in random order, so small datasets keep balanced fractions."""
    n_dim = round(n / 2)
    diminutive = rng.permutation(np.arange(n) < n_dim)
    n_ad = round(n / 2)
    rest = n - n_ad
    n_ssl = round(rest * 0.3)
    n_tsa = round(rest * 0.2)
    hist = ["AD"] * n_ad + ["SSL"] * n_ssl + ["TSA"] * n_tsa + ["HP"] * (rest - n_ssl - n_tsa)
    hist = [hist[i] for i in rng.permutation(n)]
    labels = []
    for dim, h in zip(diminutive, hist, strict=True):
        size = rng.uniform(2.0, 5.0) if dim else min(30.0, 5.5 + rng.gamma(2.0, 3.5))
        labels.append(PolypLabel(size_mm=round(float(size), 1), histology=h))
    return labels


@dataclass(frozen=True)
class PolypLook:
    colour: tuple[float, float, float]  # BGR in [0, 1], relative to nothing: absolute base colour
    lobes: tuple[tuple[float, float], ...]  # (amplitude, phase) of harmonics 2.. of the outline
    elongation: float  # axis ratio >= 1
    orientation: float  # radians
    pattern: str  # "pits", "dots", "cloud", "villi"
    pattern_scale: float  # in texture pixels per mm (multiplied by px_per_mm)
    pattern_strength: float
    edge_softness: float  # fraction of the radius
    dome: float  # height profile exponent: small = flat, large = domed
    mucus: float  # yellowish cap strength (SSL-like)
    seed: int


_COLOURS = {  # mean BGR and spread by histology
    "AD": ((0.30, 0.28, 0.78), 0.07),
    "TSA": ((0.28, 0.26, 0.74), 0.07),
    "HP": ((0.50, 0.50, 0.82), 0.07),
    "SSL": ((0.45, 0.55, 0.80), 0.07),
}
_PATTERNS = {"AD": "pits", "TSA": "villi", "HP": "dots", "SSL": "cloud"}


def draw_look(rng: np.random.Generator, label: PolypLabel, mucosa: np.ndarray) -> PolypLook:
    """One polyp's look. A quarter of polyps take colour and pattern of another histology."""
    h = label.histology
    look_h = h if rng.random() < 0.75 else str(rng.choice(HISTOLOGIES))
    mean, spread = _COLOURS[look_h]
    colour = np.array(mean, np.float32) + rng.normal(0, spread, 3).astype(np.float32)
    # polyps sit in the same wall: pull the colour partly towards this video's mucosa
    colour = 0.55 * colour + 0.45 * mucosa * rng.uniform(0.9, 1.15)
    n_lobes = 5
    lobe_amp = 0.05 if look_h in ("HP", "SSL") else 0.09
    lobes = tuple((float(rng.uniform(0, lobe_amp)), float(rng.uniform(0, 2 * np.pi))) for _ in range(n_lobes))
    return PolypLook(
        colour=tuple(float(c) for c in np.clip(colour, 0.05, 0.98)),
        lobes=lobes,
        elongation=float(rng.uniform(1.0, 1.5)),
        orientation=float(rng.uniform(0, np.pi)),
        pattern=_PATTERNS[look_h],
        pattern_scale=float(rng.uniform(0.6, 1.4)),
        pattern_strength=float(rng.uniform(0.06, 0.18)),
        edge_softness=float(rng.uniform(0.15, 0.3) if h == "SSL" else rng.uniform(0.04, 0.12)),
        dome=float(rng.uniform(0.3, 0.7) if h in ("SSL", "HP") else rng.uniform(0.6, 1.6)),
        mucus=float(rng.uniform(0.2, 0.5) if h == "SSL" and rng.random() < 0.7 else 0.0),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


@dataclass
class Sprite:
    rgb: np.ndarray  # float32 BGR, s x s x 3
    alpha: np.ndarray  # float32 s x s
    contour: np.ndarray  # float32 N x 2, outline points in sprite pixels (x, y)


def _outline_radius(look: PolypLook, phi: np.ndarray) -> np.ndarray:
    r = np.ones_like(phi)
    for i, (amp, phase) in enumerate(look.lobes, start=2):
        r += amp * np.cos(i * phi + phase)
    return r


def render_sprite(look: PolypLook, radius_px: float, px_per_mm: float) -> Sprite:
    """The polyp seen from the front, radius_px texture pixels (major semi-axis)."""
    rng = np.random.default_rng(look.seed)
    half = int(np.ceil(radius_px * 1.35)) + 2
    s = 2 * half + 1
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    c, sn = np.cos(look.orientation), np.sin(look.orientation)
    u = (c * x + sn * y) / look.elongation
    v = -sn * x + c * y
    rho = np.sqrt(u * u + v * v) / radius_px
    phi = np.arctan2(v, u)
    rel = rho / _outline_radius(look, phi)  # 1 on the outline
    soft = max(look.edge_softness, 1.5 / radius_px)
    alpha = np.clip((1.0 - rel) / soft + 0.5, 0, 1).astype(np.float32)
    height = np.clip(1.0 - rel**2, 0, 1) ** (0.5 * look.dome)

    cell = max(1.5, look.pattern_scale * px_per_mm * 0.6)
    if look.pattern == "pits":  # elongated tubular pits: noise stretched along one direction
        n = smooth_noise(rng, s, s, cell, 2)
        n = cv2.resize(cv2.resize(n, (s, max(2, s // 3))), (s, s))
        pattern = np.sin(n * 6.0)
    elif look.pattern == "villi":  # radial ridges (pinecone / villous)
        pattern = np.sin(rho * radius_px / cell * 2.0 + 2.0 * smooth_noise(rng, s, s, cell * 2, 2))
    elif look.pattern == "dots":  # small round pits
        pattern = -np.clip(smooth_noise(rng, s, s, cell * 0.7, 1) * 2.5, 0, 1)
    else:  # cloud-like, indistinct
        pattern = smooth_noise(rng, s, s, cell * 2.5, 2)
    pattern = pattern.astype(np.float32)

    colour = np.array(look.colour, np.float32)
    rgb = np.empty((s, s, 3), np.float32)
    rgb[:] = colour
    shade = 0.78 + 0.32 * height - 0.25 * (y / (radius_px * 1.4)) * height  # lit from the top
    rgb *= (shade * (1.0 + look.pattern_strength * pattern))[..., None]
    if look.mucus > 0:
        cap = np.clip(smooth_noise(rng, s, s, radius_px * 0.6, 2) + 0.3, 0, 1) * height
        rgb = rgb * (1 - look.mucus * cap[..., None]) + np.array([0.55, 0.8, 0.85], np.float32) * (
            look.mucus * cap[..., None]
        )
    rgb = np.clip(rgb, 0, 1)

    phi_c = np.linspace(0, 2 * np.pi, 48, endpoint=False, dtype=np.float32)
    rc = radius_px * _outline_radius(look, phi_c)
    uc, vc = rc * np.cos(phi_c) * look.elongation, rc * np.sin(phi_c)
    cx = c * uc - sn * vc + half
    cy = sn * uc + c * vc + half
    return Sprite(rgb=rgb, alpha=alpha, contour=np.stack([cx, cy], 1).astype(np.float32))


def paste_sprite(texture: np.ndarray, sprite: Sprite, cx: float, cy: float) -> None:
    """Alpha-blend a sprite centred at (cx, cy) into the texture, with a soft shadow ring at its
    base; in place. The sprite must lie inside the texture."""
    s = sprite.alpha.shape[0]
    x0, y0 = int(round(cx)) - s // 2, int(round(cy)) - s // 2
    region = texture[y0 : y0 + s, x0 : x0 + s]
    k = max(3, (s // 8) | 1)
    shadow = cv2.GaussianBlur(sprite.alpha, (k, k), 0)
    region *= (1.0 - 0.25 * shadow)[..., None]
    a = sprite.alpha[..., None]
    region[:] = region * (1 - a) + sprite.rgb * a
