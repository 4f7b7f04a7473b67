"""Cross-class interference probes (in the spirit of SNL, Deng and Li 2024): images made of two
normal categories, which a multi-class model should score as anomalies.

- `mixup`: the pixel average of normal images of two different categories;
- `paste`: a square patch of one category's normal image pasted into another category's.

Probes are built from normal *test* images only, so the model never trained on their parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from plantad.data.images import load_rgb

PROBE_KINDS = ("mixup", "paste")


@dataclass(frozen=True)
class Probe:
    kind: str  # 'mixup' | 'paste'
    base: str  # category of the image the probe starts from
    other: str  # category mixed or pasted in
    image: Image.Image  # RGB, the base image's size


def mixup(a: np.ndarray, b: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) x 2 -> round((1 - weight) * a + weight * b)."""
    if a.shape != b.shape:
        raise ValueError(f"mixup needs images of one shape, got {a.shape} and {b.shape}")
    mixed = (1.0 - weight) * a.astype(np.float32) + weight * b.astype(np.float32)
    return np.rint(mixed).astype(np.uint8)


def paste_patch(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, side_fraction: float = 0.4) -> np.ndarray:
    """A copy of `a` with a square of `b` (side = side_fraction of a's shorter side) pasted in.

    Source and target corners are drawn independently, so the patch is usually moved as well.
    """
    if a.shape != b.shape:
        raise ValueError(f"paste_patch needs images of one shape, got {a.shape} and {b.shape}")
    h, w = a.shape[:2]
    side = max(1, int(round(side_fraction * min(h, w))))
    sy, sx = (int(rng.integers(0, d - side + 1)) for d in (h, w))
    ty, tx = (int(rng.integers(0, d - side + 1)) for d in (h, w))
    out = a.copy()
    out[ty : ty + side, tx : tx + side] = b[sy : sy + side, sx : sx + side]
    return out


def _normal_test_images(manifest: pd.DataFrame, root: Path) -> dict[str, list[np.ndarray]]:
    rows = manifest[(manifest["split"] == "test") & (manifest["label"] == 0)]
    images: dict[str, list[np.ndarray]] = {}
    for category, group in rows.groupby("category", sort=True):
        images[str(category)] = [np.asarray(load_rgb(root / p)) for p in group["path"]]
    if len(images) < 2:
        raise ValueError(f"cross-class probes need normal test images of 2+ categories, found {sorted(images)}")
    return images


def interference_probes(manifest: pd.DataFrame, root: Path, per_pair: int, seed: int = 0) -> list[Probe]:
    """`per_pair` probes of each kind for every ordered pair of distinct categories.

    Images of different sizes are resized to the base image's size before mixing.
    """
    rng = np.random.default_rng(seed)
    images = _normal_test_images(manifest, root)
    probes: list[Probe] = []
    for base, base_images in images.items():
        for other, other_images in images.items():
            if other == base:
                continue
            for _ in range(per_pair):
                a = base_images[int(rng.integers(len(base_images)))]
                b = other_images[int(rng.integers(len(other_images)))]
                if b.shape != a.shape:
                    b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR))
                probes.append(Probe("mixup", base, other, Image.fromarray(mixup(a, b))))
                probes.append(Probe("paste", base, other, Image.fromarray(paste_patch(a, b, rng))))
    return probes
