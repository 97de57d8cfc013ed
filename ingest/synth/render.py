"""One video's world (wall texture with polyps baked in) and the rendering of one frame: the
camera's affine view of the texture, lighting, vignetting, lumen, specular highlights, motion
blur, artifacts and noise, plus the polyps' boxes in frame pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from polyp_ssl.ingest.synth.camera import CameraParams, CameraPath, plan_path
from polyp_ssl.ingest.synth.polyps import PolypLabel, draw_look, paste_sprite, render_sprite
from polyp_ssl.ingest.synth.scene import lumen_map, mucosa_texture, noise_tile, smooth_noise, vignette

TEX_SCALE = 1.5  # texture pixels per world unit (a world unit = one frame pixel at zoom 1)
PX_PER_MM = 5.0  # world units per millimetre, for a 384-pixel-wide frame
MIN_VISIBLE = 0.35  # least fraction of a polyp's box inside the frame for it to be annotated
MIN_BOX = 4.0  # least box side in pixels


@dataclass
class World:
    texture: np.ndarray  # uint8 BGR, texture pixels
    polyp_xy: np.ndarray  # P x 2, world units
    contours: list[np.ndarray]  # per polyp, N x 2 outline in world units
    radii: np.ndarray  # P, world units
    glints: np.ndarray  # G x 2, wall highlight positions in world units
    path: CameraPath
    gain: np.ndarray  # T x 3 per-channel light gain
    lumen_xy: np.ndarray  # T x 2 lumen centre in frame pixels
    frame_wh: tuple[int, int]


def _place_polyps(rng: np.random.Generator, n: int, ww: float, wh: float, fw: int, fh: int) -> np.ndarray:
    """Positions at least ~0.8 frame widths apart, inside the wall with a frame's margin."""
    pts: list[np.ndarray] = []
    min_d = 0.8 * fw
    for _ in range(n):
        best, best_d = None, -1.0
        for _ in range(60):
            p = np.array([rng.uniform(0.7 * fw, ww - 0.7 * fw), rng.uniform(0.7 * fh, wh - 0.7 * fh)])
            d = min((np.hypot(*(p - q)) for q in pts), default=np.inf)
            if d >= min_d:
                best = p
                break
            if d > best_d:
                best, best_d = p, d
        pts.append(best)
    return np.array(pts, np.float64).reshape(n, 2)


def build_world(
    rng: np.random.Generator,
    labels: list[PolypLabel],
    n_frames: int,
    frame_wh: tuple[int, int],
    camera: CameraParams | None = None,
) -> World:
    fw, fh = frame_wh
    unit = fw / 384.0  # feature sizes follow the frame size
    n = len(labels)
    ww, wh = fw * (2.0 + 0.6 * n), fh * 2.2
    th, tw = int(wh * TEX_SCALE), int(ww * TEX_SCALE)
    tex = mucosa_texture(rng, th, tw, TEX_SCALE * unit)
    mucosa = tex[::8, ::8].reshape(-1, 3).mean(0)
    xy = _place_polyps(rng, n, ww, wh, fw, fh)
    ppm = PX_PER_MM * unit
    contours, radii, zooms = [], [], []
    for k, label in enumerate(labels):
        look = draw_look(rng, label, mucosa)
        radius_world = label.size_mm * ppm / 2.0
        sprite = render_sprite(look, radius_world * TEX_SCALE, ppm * TEX_SCALE)
        paste_sprite(tex, sprite, xy[k, 0] * TEX_SCALE, xy[k, 1] * TEX_SCALE)
        s = sprite.alpha.shape[0]
        contours.append((sprite.contour - s // 2) / TEX_SCALE + xy[k])
        radii.append(radius_world)
        zooms.append(np.clip(rng.uniform(0.8, 1.7) * (6.0 / label.size_mm) ** 0.35, 0.6, 2.6))
    path = plan_path(rng, n_frames, xy, np.array(zooms), (ww, wh), frame_wh, camera or CameraParams())
    t = np.arange(n_frames)
    slow = np.stack([np.sin(2 * np.pi * t / rng.uniform(80, 240) + rng.uniform(0, 6.3)) for _ in range(3)], 1)
    common = np.sin(2 * np.pi * t / rng.uniform(60, 200) + rng.uniform(0, 6.3))[:, None]
    gain = (1.0 + 0.12 * common + 0.05 * slow) * (0.8 + 0.2 * np.clip(path.zoom, 0.5, 2.0) ** 0.4)[:, None]
    lumen_angle = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.03, n_frames))
    lumen_r = 0.45 + 0.1 * np.sin(2 * np.pi * t / rng.uniform(100, 300))
    lumen_xy = np.stack(
        [fw / 2 + lumen_r * fw * np.cos(lumen_angle), fh / 2 + lumen_r * fh * np.sin(lumen_angle)], 1
    )
    glints = np.stack([rng.uniform(0, ww, int(ww * wh / 6000)), rng.uniform(0, wh, int(ww * wh / 6000))], 1)
    return World(
        texture=(tex * 255).astype(np.uint8),
        polyp_xy=xy,
        contours=contours,
        radii=np.array(radii),
        glints=glints,
        path=path,
        gain=gain.astype(np.float32),
        lumen_xy=lumen_xy,
        frame_wh=frame_wh,
    )


def frame_to_world(path: CameraPath, t: int, frame_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with world = A @ frame_px + b at frame t."""
    z, a, th = path.zoom[t], path.tilt[t], path.angle[t]
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    A = rot @ np.diag([1.0 / (z * (1 + a)), 1.0 / (z * (1 - a))])
    centre = np.array([frame_wh[0] / 2.0, frame_wh[1] / 2.0])
    b = np.array([path.cx[t], path.cy[t]]) - A @ centre
    return A, b


class FrameRenderer:
    """Renders the frames of one world in order (state: the previous camera position, for blur)."""

    def __init__(self, world: World, rng: np.random.Generator):
        self.world = world
        self.rng = rng
        fw, fh = world.frame_wh
        self.vignette = vignette(fh, fw)
        self.lumen = lumen_map(fh, fw)
        self.noise = noise_tile(rng, fh, fw, 0.018)
        self.unit = fw / 384.0

    def boxes(self, t: int) -> list[tuple[int, list[float]]]:
        """(polyp index, [x, y, w, h]) of every polyp annotated in frame t."""
        w = self.world
        fw, fh = w.frame_wh
        if w.path.artifact[t]:
            return []
        A, b = frame_to_world(w.path, t, w.frame_wh)
        Ainv = np.linalg.inv(A)
        out = []
        for k, contour in enumerate(w.contours):
            pts = (contour - b) @ Ainv.T
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            full = (x1 - x0) * (y1 - y0)
            cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, fw), min(y1, fh)
            if cx1 - cx0 < MIN_BOX or cy1 - cy0 < MIN_BOX:
                continue
            if (cx1 - cx0) * (cy1 - cy0) < MIN_VISIBLE * full:
                continue
            out.append((k, [round(cx0, 2), round(cy0, 2), round(cx1 - cx0, 2), round(cy1 - cy0, 2)]))
        return out

    def render(self, t: int) -> np.ndarray:
        """Frame t as uint8 BGR."""
        w, rng = self.world, self.rng
        fw, fh = w.frame_wh
        A, b = frame_to_world(w.path, t, w.frame_wh)
        M = np.hstack([A * TEX_SCALE, (b * TEX_SCALE)[:, None]])
        img = cv2.warpAffine(
            w.texture,
            M,
            (fw, fh),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
        lx, ly = w.lumen_xy[t]
        ox, oy = int(np.clip(fw - lx, 0, fw)), int(np.clip(fh - ly, 0, fh))
        light = self.vignette * self.lumen[oy : oy + fh, ox : ox + fw]
        f = img * (light[..., None] * (w.gain[t] * np.float32(1.0 / 255.0)))
        self._glints(f, t, A, b)
        # motion blur along the camera's motion
        if t > 0:
            d = np.array([w.path.cx[t] - w.path.cx[t - 1], w.path.cy[t] - w.path.cy[t - 1]]) * w.path.zoom[t]
            speed = float(np.hypot(*d))
            if speed > 2.0:
                L = int(min(speed * 0.8, 15)) | 1
                k = np.zeros((L, L), np.float32)
                c = L // 2
                ang = np.arctan2(d[1], d[0])
                p0 = (int(round(c - c * np.cos(ang))), int(round(c - c * np.sin(ang))))
                p1 = (int(round(c + c * np.cos(ang))), int(round(c + c * np.sin(ang))))
                cv2.line(k, p0, p1, 1.0, 1)
                f = cv2.filter2D(f, -1, k / k.sum())
        art = int(w.path.artifact[t])
        if art == 1:
            f = cv2.GaussianBlur(f, (0, 0), rng.uniform(4, 8) * self.unit)
        elif art == 2:
            f = self._water(f)
        nx, ny = rng.integers(0, 64, 2)
        f += self.noise[ny : ny + fh, nx : nx + fw]
        return cv2.convertScaleAbs(f, alpha=255.0)  # scaled, rounded, saturated to uint8

    def _glints(self, f: np.ndarray, t: int, A: np.ndarray, b: np.ndarray) -> None:
        """Specular highlights: on each visible polyp near the point facing the light (the camera),
        and on random wall points, flickering."""
        w, rng = self.world, self.rng
        fw, fh = w.frame_wh
        Ainv = np.linalg.inv(A)
        z = w.path.zoom[t]
        centre = np.array([fw / 2.0, fh / 2.0])
        for k in range(len(w.polyp_xy)):
            p = Ainv @ (w.polyp_xy[k] - b)
            r = w.radii[k] * z
            if not (-r < p[0] < fw + r and -r < p[1] < fh + r):
                continue
            towards = centre - p
            n = np.hypot(*towards) + 1e-6
            q = p + towards / n * min(0.45 * r, n * 0.1)
            size = max(1, int(r * 0.12))
            cv2.ellipse(
                f,
                (int(q[0]), int(q[1])),
                (size, max(1, size // 2)),
                float(np.degrees(w.path.angle[t])),
                0,
                360,
                (1.0, 1.0, 1.0),
                -1,
                cv2.LINE_AA,
            )
        pts = (w.glints - b) @ Ainv.T
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < fw) & (pts[:, 1] >= 0) & (pts[:, 1] < fh)
        for x, y in pts[inside]:
            if rng.random() < 0.7:
                s = max(1, int(rng.uniform(1, 3.5) * self.unit * z))
                cv2.ellipse(
                    f,
                    (int(x), int(y)),
                    (s, max(1, s // 2)),
                    float(rng.uniform(0, 180)),
                    0,
                    360,
                    (0.98, 0.98, 0.98),
                    -1,
                    cv2.LINE_AA,
                )

    def _water(self, f: np.ndarray) -> np.ndarray:
        """Water flush with bubbles: hazy, greyish-blue, blurred, with ringed bubbles."""
        rng = self.rng
        fh, fw = f.shape[:2]
        f = cv2.GaussianBlur(f, (0, 0), 2.5 * self.unit)
        haze = np.array([0.62, 0.58, 0.5], np.float32)
        f = f * 0.5 + haze * 0.5
        f *= (1.0 + 0.08 * smooth_noise(rng, fh, fw, 40 * self.unit, 1))[..., None]
        for _ in range(int(rng.integers(8, 30))):
            c = (int(rng.uniform(0, fw)), int(rng.uniform(0, fh)))
            r = max(2, int(rng.uniform(3, 22) * self.unit))
            cv2.circle(f, c, r, (0.9, 0.92, 0.92), max(1, r // 6), cv2.LINE_AA)
            cv2.circle(f, (c[0] - r // 3, c[1] - r // 3), max(1, r // 5), (1.0, 1.0, 1.0), -1, cv2.LINE_AA)
        return f
