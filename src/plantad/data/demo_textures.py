"""Procedural normal images of the demo categories: weave, brushed metal and a hexagonal nut.

Every parameter (colour, period, angle, lighting, pose) is drawn from the caller's numpy Generator,
so normal images vary like real production parts and no two files are equal. Images are float32
(H, W, 3) in [0, 1]; `support` marks where a defect may sit (the part, not the background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CATEGORIES = ("weave", "metal", "nut")
_WEAVE_WARP = np.array([0.66, 0.55, 0.40], dtype=np.float32)  # tan fabric; jittered per image
_WEAVE_WEFT_RATIO = np.array([0.88, 0.86, 0.9], dtype=np.float32)


@dataclass(frozen=True)
class NutPose:
    """Geometry and shading of one nut, kept so the 'missing' defect can re-render it with a bite."""

    cx: float
    cy: float
    radius: float  # circumradius of the hexagon, px
    angle: float  # rad
    hole: float  # hole radius, px
    face: np.ndarray  # (H, W, 3) shaded metal of the nut
    background: np.ndarray  # (H, W, 3)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    support: np.ndarray  # (H, W) bool
    nut: NutPose | None = None


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (S, S)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return y, x


def _gradient(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """A linear lighting ramp in a random direction, mean 0, (S, S)."""
    y, x = _grid(size)
    phi = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(phi) * x + np.sin(phi) * y) / size
    return (amplitude * (ramp - ramp.mean())).astype(np.float32)


def _thread_jitter(rng: np.random.Generator, index: np.ndarray, spread: float) -> np.ndarray:
    """A random brightness factor per thread index, looked up for every pixel."""
    lo = int(index.min())
    table = 1.0 + spread * rng.standard_normal(int(index.max()) - lo + 1).astype(np.float32)
    return table[index - lo]


def weave(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain weave: warp and weft threads alternate over/under, with jittered colour, period, angle."""
    y, x = _grid(size)
    period = rng.uniform(8.0, 10.0) * size / 128
    theta = rng.uniform(-0.1, 0.1)
    u = (x * np.cos(theta) + y * np.sin(theta)) / period + rng.uniform(0, 1)
    v = (-x * np.sin(theta) + y * np.cos(theta)) / period + rng.uniform(0, 1)
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - iu, v - iv
    warp_on_top = (iu + iv) % 2 == 0
    across = np.where(warp_on_top, np.sin(np.pi * fu), np.sin(np.pi * fv)) ** 0.6
    along = np.where(warp_on_top, np.sin(np.pi * fv), np.sin(np.pi * fu))
    shade = across * (0.78 + 0.22 * along)
    shade *= np.where(warp_on_top, _thread_jitter(rng, iu, 0.05), _thread_jitter(rng, iv, 0.05))
    base = (_WEAVE_WARP * rng.uniform(0.93, 1.07) + rng.normal(0, 0.02, 3)).astype(np.float32)
    weft = (base * _WEAVE_WEFT_RATIO + rng.normal(0, 0.02, 3)).astype(np.float32)
    colour = np.where(warp_on_top[..., None], base, weft)
    img = colour * (0.25 + 0.75 * shade[..., None]) + _gradient(rng, size, 0.08)[..., None]
    img += rng.normal(0, 0.02, (size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def metal(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed metal: streak noise stretched along a jittered direction, a lighting ramp and band."""
    big = int(size * 1.5)
    noise = rng.standard_normal((big, big)).astype(np.float32)
    streaks = ndimage.gaussian_filter(noise, sigma=(0.6, size * rng.uniform(0.15, 0.35)))
    streaks = ndimage.rotate(streaks, rng.uniform(-8, 8), reshape=False, order=1, mode="reflect")
    start = (big - size) // 2
    streaks = streaks[start : start + size, start : start + size]
    streaks = streaks / (streaks.std() + 1e-6) * rng.uniform(0.035, 0.06)
    y, _ = _grid(size)
    band = np.exp(-(((y - rng.uniform(0.2, 0.8) * size) / (rng.uniform(0.15, 0.4) * size)) ** 2))
    grey = rng.uniform(0.5, 0.65) + streaks + _gradient(rng, size, 0.1) + rng.uniform(0.03, 0.08) * band
    tint = (1.0 + rng.normal(0, 0.02, 3)).astype(np.float32)
    img = grey[..., None] * tint + rng.normal(0, 0.01, (size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def nut_alpha(pose: NutPose, size: int) -> np.ndarray:
    """Anti-aliased coverage of the nut (hexagon minus the hole), (S, S) in [0, 1]."""
    y, x = _grid(size)
    dx, dy = x - pose.cx, y - pose.cy
    apothem = pose.radius * np.cos(np.pi / 6)
    normals = pose.angle + np.pi / 6 + np.arange(6) * np.pi / 3
    reach = np.max([dx * np.cos(a) + dy * np.sin(a) for a in normals], axis=0)
    inside_hex = np.clip(apothem - reach + 0.5, 0, 1)
    outside_hole = np.clip(np.hypot(dx, dy) - pose.hole + 0.5, 0, 1)
    return (inside_hex * outside_hole).astype(np.float32)


def _nut_face(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Shaded metal of the nut: base grey, lighting ramp, darker chamfered corners, grain."""
    y, x = _grid(size)
    r = np.hypot(x - cx, y - cy) / radius
    chamfer = np.clip((r - 0.82) / 0.18, 0, 1)
    grey = rng.uniform(0.6, 0.75) + _gradient(rng, size, 0.15) - rng.uniform(0.12, 0.2) * chamfer
    tint = (1.0 + rng.normal(0, 0.02, 3)).astype(np.float32)
    return grey[..., None] * tint + rng.normal(0, 0.015, (size, size, 3)).astype(np.float32)


def nut_pose(rng: np.random.Generator, size: int) -> NutPose:
    """A random nut: small offset and rotation, size, hole, lighting and a plain background."""
    cx, cy = size / 2 + rng.uniform(-0.06, 0.06, 2) * size
    radius = rng.uniform(0.31, 0.34) * size
    angle = rng.uniform(-0.2, 0.2)
    hole = rng.uniform(0.34, 0.38) * radius
    face = _nut_face(rng, size, cx, cy, radius)
    bg_level = rng.uniform(0.15, 0.25) + _gradient(rng, size, 0.06)
    bg_tint = rng.uniform(0.95, 1.05, 3).astype(np.float32)
    background = bg_level[..., None] * bg_tint + rng.normal(0, 0.012, (size, size, 3)).astype(np.float32)
    return NutPose(float(cx), float(cy), float(radius), float(angle), float(hole), face, background)


def render_nut(pose: NutPose, size: int, removed: np.ndarray | None = None) -> np.ndarray:
    """The nut composited on its background; `removed` (S, S) bool cuts a chunk out of it."""
    alpha = nut_alpha(pose, size)
    if removed is not None:
        alpha = np.where(removed, 0.0, alpha)
    img = pose.background * (1 - alpha[..., None]) + pose.face * alpha[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def render_normal(category: str, rng: np.random.Generator, size: int) -> Scene:
    """One normal image of `category` and where defects may be placed on it."""
    if category == "weave":
        return Scene(weave(rng, size), np.ones((size, size), dtype=bool))
    if category == "metal":
        return Scene(metal(rng, size), np.ones((size, size), dtype=bool))
    if category == "nut":
        pose = nut_pose(rng, size)
        return Scene(render_nut(pose, size), nut_alpha(pose, size) > 0.99, pose)
    raise ValueError(f"unknown demo category '{category}'; demo categories are {list(CATEGORIES)}")
