"""Procedural image-level (semantic) demo: normal images are one family of drawn objects, anomalies
are other families. No masks: the layout is `<family>/train/good`, `<family>/test/good` and
`<family>/test/<other family>`.

Every image draws pose (place, size, rotation), object colour, background colour, lighting and
texture from its own seeded Generator, the same for every family, so colour and brightness do not
tell the families apart; only the shape does (the semantic anomalies of CIFAR-style one-class
benchmarks, in miniature).
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from plantad.config import SemanticDemoConfig

FAMILIES = ("gear", "star", "wheel", "cross")
_SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down, for smooth edges
Polygon = list[tuple[float, float]]


def _rotate(points: np.ndarray, angle: float, cx: float, cy: float) -> Polygon:
    """(K, 2) points around the origin -> rotated by `angle` and moved to (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    xy = points @ np.array([[c, s], [-s, c]])
    return [(float(x + cx), float(y + cy)) for x, y in xy]


def _radial(radii: np.ndarray) -> np.ndarray:
    """Points at evenly spaced angles with the given radii: (K,) -> (K, 2)."""
    t = np.linspace(0.0, 2 * np.pi, len(radii), endpoint=False)
    return np.column_stack([radii * np.cos(t), radii * np.sin(t)])


def _draw_gear(draw: ImageDraw.ImageDraw, rng: np.random.Generator, r: float, a: float, cx: float, cy: float) -> None:
    teeth = int(rng.integers(8, 13))
    pattern = np.tile([1.0, 1.0, 0.78, 0.78], teeth)  # square-ish teeth: two outer, two inner points
    draw.polygon(_rotate(_radial(r * pattern), a, cx, cy), fill=255)
    hole = r * rng.uniform(0.2, 0.3)
    draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=0)


def _draw_star(draw: ImageDraw.ImageDraw, rng: np.random.Generator, r: float, a: float, cx: float, cy: float) -> None:
    points = int(rng.integers(5, 8))
    inner = rng.uniform(0.42, 0.55)
    draw.polygon(_rotate(_radial(r * np.tile([1.0, inner], points)), a, cx, cy), fill=255)


def _draw_wheel(draw: ImageDraw.ImageDraw, rng: np.random.Generator, r: float, a: float, cx: float, cy: float) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    rim = r * rng.uniform(0.72, 0.8)
    draw.ellipse((cx - rim, cy - rim, cx + rim, cy + rim), fill=0)
    half = r * 0.07
    spokes = int(rng.integers(3, 7))
    for k in range(spokes):
        t = a + 2 * np.pi * k / spokes
        spoke = np.array([[0.0, -half], [rim, -half], [rim, half], [0.0, half]])
        draw.polygon(_rotate(spoke, t, cx, cy), fill=255)
    hub = r * 0.22
    draw.ellipse((cx - hub, cy - hub, cx + hub, cy + hub), fill=255)


def _draw_cross(draw: ImageDraw.ImageDraw, rng: np.random.Generator, r: float, a: float, cx: float, cy: float) -> None:
    w = r * rng.uniform(0.3, 0.42)
    arm = np.array([[-r, -w], [r, -w], [r, w], [-r, w]])
    draw.polygon(_rotate(arm, a, cx, cy), fill=255)
    draw.polygon(_rotate(arm, a + np.pi / 2, cx, cy), fill=255)


_DRAW: dict[str, Callable[..., None]] = {
    "gear": _draw_gear, "star": _draw_star, "wheel": _draw_wheel, "cross": _draw_cross,
}


def object_mask(family: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft coverage (S, S) in [0, 1] of one object of `family` in a random pose."""
    if family not in _DRAW:
        raise ValueError(f"unknown semantic demo family {family!r}; families are {list(FAMILIES)}")
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    r = big * rng.uniform(0.24, 0.36)
    cx, cy = (big / 2 + rng.uniform(-0.12, 0.12, 2) * big).tolist()
    _DRAW[family](ImageDraw.Draw(canvas), rng, r, rng.uniform(0, 2 * np.pi), cx, cy)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _random_colour(rng: np.random.Generator, value: tuple[float, float]) -> np.ndarray:
    hue, sat = rng.uniform(0, 1), rng.uniform(0.25, 0.8)
    return np.array(colorsys.hsv_to_rgb(hue, sat, rng.uniform(*value)), dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random colour with a lighting ramp and smooth blotches, (S, S, 3) in [0, 1]."""
    base = _random_colour(rng, (0.25, 0.85))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phi = rng.uniform(0, 2 * np.pi)
    ramp = rng.uniform(0.05, 0.25) * ((np.cos(phi) * x + np.sin(phi) * y) - 0.5)
    blotch = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), size / 16)
    blotch *= rng.uniform(0.05, 0.15) / max(1e-6, float(blotch.std()))
    return base[None, None, :] * (1.0 + ramp + blotch)[..., None]


def render_object(family: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (S, S, 3): one object of `family` on a random background."""
    background = _background(rng, size)
    cover = object_mask(family, rng, size)[..., None]
    colour = _random_colour(rng, (0.3, 1.0))
    shade = 1.0 + 0.1 * ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 1.0)
    image = background * (1.0 - cover) + (colour[None, None, :] * shade[..., None]) * cover
    image += rng.normal(0.0, 0.015, image.shape).astype(np.float32)  # sensor noise
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _split_files(cfg: SemanticDemoConfig, category: str) -> list[tuple[str, str, int]]:
    """(split, folder, index) of every image of one category: folder 'good' or an outlier family."""
    files = [("train", "good", i) for i in range(cfg.n_train)]
    files += [("test", "good", i) for i in range(cfg.n_test_good)]
    outliers = [f for f in cfg.outlier_families if f != category]
    files += [("test", family, i) for family in outliers for i in range(cfg.n_test_anomalous)]
    return files


def write_semantic_category(
    root: Path,
    category: str,
    cfg: SemanticDemoConfig,
    seed: int,
    save: Callable[[np.ndarray, Path], None],
    rng_for: Callable[..., np.random.Generator],
) -> None:
    """Write one category: normal images of its own family, test anomalies of the outlier families."""
    for split, folder, index in _split_files(cfg, category):
        family = category if folder == "good" else folder
        rng = rng_for(seed, category, split, folder, index)
        save(render_object(family, rng, cfg.image_size), root / category / split / folder / f"{index:03d}.png")
