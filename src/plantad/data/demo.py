"""Procedural demo dataset in the MVTec-AD layout: nothing is downloaded, everything is seeded.

Each image draws from its own numpy Generator seeded by (seed, category, split/defect, index), so a
seed gives byte-identical files and adding categories or images never changes existing ones:
`add_normal` continues the numbering with exactly the images a larger `n_train` would have made.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from plantad.config import DemoConfig, SemanticDemoConfig
from plantad.data.demo_defects import DEFECTS, add_defect
from plantad.data.demo_semantic import write_semantic_category
from plantad.data.demo_textures import CATEGORIES, render_normal
from plantad.data.layout import EXPECTED_LAYOUT, DatasetLayoutError, find_categories, list_images

_TRAIN, _TEST_GOOD, _TEST_DEFECT = 0, 1, 2
_NUMBERED = re.compile(r"^\d+$")


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


def sample_rng(seed: int, category: str, split: str, defect: str, index: int) -> np.random.Generator:
    """The Generator of one demo image; independent of every other image and of the config."""
    part = _TRAIN if split == "train" else (_TEST_GOOD if defect == "good" else _TEST_DEFECT)
    entropy = [seed % 2**63, _key(category), part, _key(defect), index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def render_sample(
    seed: int, category: str, split: str, defect: str, index: int, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (S, S, 3) image, bool (S, S) mask or None for normal images) of one demo file."""
    rng = sample_rng(seed, category, split, defect, index)
    scene = render_normal(category, rng, size)
    if defect == "good":
        image, mask = scene.image, None
    else:
        image, mask = add_defect(defect, category, scene, rng, size)
    return np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """Write a PNG via a temp file and rename, refusing to overwrite an existing file."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; demo files are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels).save(tmp, format="PNG", compress_level=6)
    os.replace(tmp, path)


def _write_sample(
    root: Path, seed: int, category: str, split: str, defect: str, index: int, size: int
) -> Path:
    image, mask = render_sample(seed, category, split, defect, index, size)
    name = f"{index:03d}"
    path = root / category / split / defect / f"{name}.png"
    _save_png(image, path)
    if mask is not None:
        mask_png = np.where(mask, 255, 0).astype(np.uint8)
        _save_png(mask_png, root / category / "ground_truth" / defect / f"{name}_mask.png")
    return path


def _write_category(root: Path, category: str, cfg: DemoConfig) -> None:
    size, seed = cfg.image_size, cfg.seed
    for i in range(cfg.n_train):
        _write_sample(root, seed, category, "train", "good", i, size)
    for i in range(cfg.n_test_good):
        _write_sample(root, seed, category, "test", "good", i, size)
    for defect in DEFECTS[category]:
        for i in range(cfg.n_test_defect):
            _write_sample(root, seed, category, "test", defect, i, size)


def generate_demo(out: Path, cfg: DemoConfig) -> Path:
    """Write the demo dataset to `out` (must be absent or empty) and return it.

    Files appear all at once: they are written to a sibling temp folder that is renamed at the end.
    """
    def write(staging: Path) -> None:
        for category in sorted(set(cfg.categories)):
            _write_category(staging, category, cfg)

    return _write_staged(Path(out), write)


def generate_semantic_demo(out: Path, cfg: SemanticDemoConfig, seed: int = 0) -> Path:
    """Write the image-level semantic demo (no masks) to `out` (absent or empty), all at once."""

    def write(staging: Path) -> None:
        for category in sorted(set(cfg.categories)):
            write_semantic_category(staging, category, cfg, seed, save=_save_png, rng_for=sample_rng)

    return _write_staged(Path(out), write)


def _write_staged(out: Path, write: Callable[[Path], object]) -> Path:
    """Run `write(staging)` into a sibling temp folder, then rename it to `out` (absent or empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} already exists and is not an empty folder; demo data never overwrites stored data "
            "(delete it or choose another folder)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    try:
        write(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _next_index(train_good: Path) -> int:
    """One past the highest numeric file stem in train/good (0 when there is none)."""
    numbers = [int(p.stem) for p in list_images(train_good) if _NUMBERED.match(p.stem)]
    return max(numbers, default=-1) + 1


def _check_size(train_good: Path, image_size: int) -> None:
    """Refuse to mix sizes: the first existing image must be image_size x image_size."""
    existing = list_images(train_good)
    if existing:
        with Image.open(existing[0]) as im:
            if im.size != (image_size, image_size):
                raise ValueError(
                    f"{existing[0]} is {im.size[0]}x{im.size[1]} but image_size={image_size}; "
                    "add images of the size already stored"
                )


def _add_categories(out: Path, categories: list[str] | None) -> list[str]:
    found = find_categories(out)
    if not found:
        raise DatasetLayoutError(f"{out} is not an MVTec-AD layout folder (expected {EXPECTED_LAYOUT})")
    chosen = found if categories is None else sorted(set(categories))
    missing = [c for c in chosen if c not in found]
    if missing:
        raise DatasetLayoutError(f"category {missing} not found under {out}; found: {found}")
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown:
        raise ValueError(
            f"cannot generate images for category {unknown}; demo categories are {list(CATEGORIES)}"
        )
    return chosen


def add_normal(
    out: Path, n: int, seed: int, image_size: int, categories: list[str] | None = None
) -> list[Path]:
    """Append `n` new normal train images per category, numbered after the highest existing file.

    Existing files are never touched; image k is the same for a given (seed, category, k).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = Path(out)
    added: list[Path] = []
    for category in _add_categories(out, categories):
        train_good = out / category / "train" / "good"
        _check_size(train_good, image_size)
        start = _next_index(train_good)
        for index in range(start, start + n):
            added.append(_write_sample(out, seed, category, "train", "good", index, image_size))
    return added
