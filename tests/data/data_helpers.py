"""File helpers for the data tests (a uniquely named module: test folders share one import namespace)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from plantad.config import DemoConfig

SMALL = DemoConfig(seed=3, image_size=48, n_train=6, n_test_good=3, n_test_defect=2)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file under root."""
    return {p.relative_to(root).as_posix(): sha256_of(p) for p in sorted(root.rglob("*")) if p.is_file()}


def write_image(path: Path, pixels: np.ndarray) -> Path:
    """Save an array as an image file (format from the suffix), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def random_pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
