"""Tiny PNG files written with PIL and their manifest rows, measured the way `prepare` does.

Images are 48x40 so a swapped width/height is caught. Bad-case tests add or edit rows with
`add_image`/`describe`. (A uniquely named module: test folders share one import namespace.)
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

SIZE = (48, 40)  # (width, height)
CATEGORIES = ("metal", "weave")  # the good dataset fixture
N_TRAIN = 3
NULLABLE_INT_COLUMNS = ("width", "height", "channels", "mask_width", "mask_height")


def write_png(root: Path, rel: str, size: tuple[int, int] = SIZE, mode: str = "RGB") -> Path:
    """Random pixels of mode L, LA, RGB or RGBA, seeded by `rel`: distinct files, same every run."""
    rng = np.random.default_rng(zlib.crc32(rel.encode()))
    pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels)
    assert image.mode == mode, (image.mode, mode)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _decode(path: Path) -> tuple[Image.Image | None, str | None]:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy(), None
    except (OSError, UnidentifiedImageError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def describe(
    root: Path, rel: str, category: str, split: str, defect_type: str, mask_rel: str | None = None
) -> dict:
    """One manifest row for a file under root, measured from the file itself."""
    image, error = _decode(root / rel)
    mask = _decode(root / mask_rel)[0] if mask_rel else None
    gray = np.asarray(image.convert("L"), dtype=float) if image else None
    return {
        "path": rel, "category": category, "split": split, "label": int(defect_type != "good"),
        "defect_type": defect_type, "mask_path": mask_rel,
        "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest(),
        "width": image.width if image else None, "height": image.height if image else None,
        "channels": len(image.getbands()) if image else None,
        "mask_width": mask.width if mask else None, "mask_height": mask.height if mask else None,
        "mean_intensity": float(gray.mean()) if gray is not None else None,
        "std_intensity": float(gray.std()) if gray is not None else None,
        "decode_error": error,
    }  # fmt: skip


def add_image(
    root: Path,
    rel: str,
    category: str,
    split: str,
    defect_type: str = "good",
    *,
    size: tuple[int, int] = SIZE,
    mode: str = "RGB",
    mask_size: tuple[int, int] | None = None,
) -> dict:
    """Write a PNG (and a mask when mask_size is given) and return its manifest row."""
    write_png(root, rel, size, mode)
    mask_rel = None
    if mask_size is not None:
        mask_rel = rel.replace(".png", "_mask.png")
        write_png(root, mask_rel, mask_size, "L")
    return describe(root, rel, category, split, defect_type, mask_rel)


def to_manifest(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame with the manifest's dtypes (nullable Int64 sizes and channels)."""
    df = pd.DataFrame(rows)
    for col in NULLABLE_INT_COLUMNS:
        df[col] = df[col].astype("Int64")
    return df


def with_rows(df: pd.DataFrame, *rows: dict) -> pd.DataFrame:
    return pd.concat([df, to_manifest(list(rows))], ignore_index=True)
