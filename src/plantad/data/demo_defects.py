"""Procedural defects with exact pixel masks: scratch, spot, cutpaste and (nut only) missing.

Each defect changes pixels only inside its mask and covers roughly 1-8% of the image, with random
size, contrast and place, so detection is possible but not trivial. Sizes scale with the image side.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from plantad.data.demo_textures import CATEGORIES, Scene, render_normal, render_nut

DEFECTS: dict[str, tuple[str, ...]] = {
    "weave": ("cutpaste", "scratch", "spot"),
    "metal": ("cutpaste", "scratch", "spot"),
    "nut": ("cutpaste", "missing", "scratch", "spot"),
}
MIN_AREA, MAX_AREA = 0.008, 0.09  # share of the image a defect mask may cover
_TRIES = 50


def _centre(rng: np.random.Generator, support: np.ndarray, margin: int) -> tuple[float, float]:
    """A random (x, y) on the support, `margin` px away from the image border."""
    inner = np.zeros_like(support)
    inner[margin:-margin, margin:-margin] = support[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(inner if inner.any() else support)
    k = rng.integers(len(ys))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def _scratch_mask(rng: np.random.Generator, scene: Scene, size: int) -> np.ndarray:
    """A thin random polyline of 2-4 segments."""
    x, y = _centre(rng, scene.support, size // 6)
    heading = rng.uniform(0, 2 * np.pi)
    segments = int(rng.integers(2, 5))
    step = rng.uniform(0.45, 0.8) * size / segments
    points = [(x, y)]
    for _ in range(segments):
        heading += rng.normal(0, 0.45)
        x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        points.append((x, y))
    canvas = Image.new("L", (size, size), 0)
    width = max(1, round(rng.uniform(0.018, 0.032) * size))
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    return (np.asarray(canvas) > 0) & scene.support


def _scratch(rng: np.random.Generator, scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright (polished) or dark (groove) line; strength varies so some scratches are faint."""
    mask = _scratch_mask(rng, scene, size)
    strength = rng.uniform(0.35, 0.8)
    img = scene.image.copy()
    if rng.random() < 0.5:
        img[mask] += (1 - img[mask]) * strength
    else:
        img[mask] *= 1 - strength
    return img, mask


def _off_colour(rng: np.random.Generator, local: np.ndarray, min_distance: float = 0.4) -> np.ndarray:
    """A random RGB colour at least `min_distance` (Euclidean) from the local mean colour."""
    for _ in range(_TRIES):
        colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        if np.linalg.norm(colour - local) >= min_distance:
            return colour
    return np.where(local < 0.5, 1.0, 0.0).astype(np.float32)  # farthest corner: >= 0.87 away


def _spot(rng: np.random.Generator, scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A blob of off-colour contamination with a wobbly outline; the texture shows through."""
    cx, cy = _centre(rng, scene.support, size // 8)
    radius = rng.uniform(0.05, 0.13) * size
    y, x = np.mgrid[0:size, 0:size] + 0.5
    phi = np.arctan2(y - cy, x - cx)
    wobble = sum(rng.uniform(0, 0.15) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    mask = (np.hypot(x - cx, y - cy) < radius * (1 + wobble)) & scene.support
    img = scene.image.copy()
    colour = _off_colour(rng, img[mask].mean(axis=0))
    alpha = rng.uniform(0.35, 0.75)
    luminance = img[mask].mean(axis=1, keepdims=True)
    img[mask] = (1 - alpha) * img[mask] + alpha * colour * (0.6 + 0.8 * luminance)
    return img, mask


def _cutpaste(
    rng: np.random.Generator, scene: Scene, size: int, category: str
) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle cut from an image of another category pasted onto this one."""
    other = [c for c in CATEGORIES if c != category][int(rng.integers(len(CATEGORIES) - 1))]
    source = render_normal(other, rng, size).image
    h, w = (np.maximum(2, rng.uniform(0.1, 0.24, 2) * size)).astype(int)
    sy, sx = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    cx, cy = _centre(rng, scene.support, size // 8)
    ty = int(np.clip(cy - h / 2, 0, size - h))
    tx = int(np.clip(cx - w / 2, 0, size - w))
    img = scene.image.copy()
    img[ty : ty + h, tx : tx + w] = source[sy : sy + h, sx : sx + w]
    mask = np.zeros((size, size), dtype=bool)
    mask[ty : ty + h, tx : tx + w] = True
    return img, mask


def _missing(rng: np.random.Generator, scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A round chunk bitten out of the nut's rim, showing the background behind it."""
    pose = scene.nut
    if pose is None:
        raise ValueError("the 'missing' defect needs a nut scene")
    phi = rng.uniform(0, 2 * np.pi)
    reach = pose.radius * rng.uniform(0.8, 1.0)
    bx, by = pose.cx + reach * np.cos(phi), pose.cy + reach * np.sin(phi)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    bite = np.hypot(x - bx, y - by) < rng.uniform(0.1, 0.18) * size
    img = render_nut(pose, size, removed=bite)
    mask = np.any(np.abs(img - scene.image) > 0, axis=2)
    return img, mask


def add_defect(
    defect: str, category: str, scene: Scene, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of `scene` with one defect; redrawn until the mask covers MIN..MAX_AREA."""
    if defect not in DEFECTS.get(category, ()):
        known = DEFECTS.get(category)
        raise ValueError(f"demo category '{category}' has no defect '{defect}'; it has {known}")
    for _ in range(_TRIES):
        if defect == "cutpaste":
            img, mask = _cutpaste(rng, scene, size, category)
        else:
            img, mask = {"scratch": _scratch, "spot": _spot, "missing": _missing}[defect](rng, scene, size)
        if MIN_AREA <= mask.mean() <= MAX_AREA:
            return np.clip(img, 0, 1), mask
    raise RuntimeError(
        f"could not place a '{defect}' defect of {MIN_AREA:.1%}-{MAX_AREA:.1%} area in {_TRIES} tries"
    )
