"""Torch dataset over manifest rows, and the normal hold-out used for calibration.

The hold-out gives the calibration and the decision threshold normal images the model never trained
on; a bad file always raises (naming it) so a model is never trained on a silently shrunk dataset.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from plantad.data.images import ImageTransform, load_mask, load_rgb, mask_to_tensor


def _holdout_count(n: int, fraction: float, min_images: int = 0) -> int:
    """round(fraction * n), at least 1 when fraction > 0 and at least `min_images`, never all n."""
    if (fraction <= 0.0 and min_images <= 0) or n < 2:
        return 0
    return min(max(1 if fraction > 0.0 else 0, round(fraction * n), min_images), n - 1)


def split_holdout(
    df: pd.DataFrame, fraction: float, seed: int, min_images: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the normal train rows into (train_rows, holdout_rows), `fraction` held out per category,
    and at least `min_images` of each (data.holdout_min_images), always leaving one to train on.

    Test rows and anomalous train rows are in neither. Which rows are held out depends only on
    (seed, category, the category's paths), not on row order or on other categories. Both frames
    keep df's index labels and row order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if min_images < 0:
        raise ValueError(f"data.holdout_min_images must be >= 0, got {min_images}")
    missing = [c for c in ("path", "category", "split", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"split_holdout needs manifest column(s) {missing}")
    normal = df[(df["split"] == "train") & (df["label"] == 0)]
    held: list[object] = []
    for category, rows in normal.groupby("category", sort=True):
        k = _holdout_count(len(rows), fraction, min_images)
        if k == 0:
            continue
        by_path = rows.sort_values("path", kind="stable")
        rng = np.random.default_rng([seed % 2**63, zlib.crc32(str(category).encode())])
        held.extend(by_path.index[rng.permutation(len(by_path))[:k]])
    is_held = normal.index.isin(held)
    return normal[~is_held], normal[is_held]


def categories_with_masks(df: pd.DataFrame) -> set[str]:
    """Categories where at least one image has a mask (validation makes those fully masked)."""
    return set(df.loc[df["mask_path"].notna(), "category"].astype(str))


class ManifestDataset(Dataset):
    """Manifest rows as model inputs: dict(image (3,S,S), label, [mask (1,S,S)], index).

    `index` is the row position in `df`, so scores can be joined back to the manifest. With masks,
    `require_masks=False` gives an all-zero mask to rows without one (image-level datasets); the
    caller then decides which rows' masks mean anything (see `categories_with_masks`).
    """

    def __init__(
        self, df: pd.DataFrame, root: Path, image_size: int, with_masks: bool = False, require_masks: bool = True
    ) -> None:
        missing = [c for c in ("path", "label", "mask_path") if c not in df.columns]
        if missing:
            raise ValueError(f"ManifestDataset needs manifest column(s) {missing}")
        self.root = Path(root)
        self.with_masks = with_masks
        self.transform = ImageTransform(image_size)
        self.image_size = image_size
        # plain lists: cheap to pickle into DataLoader workers and Ray tasks
        self.paths: list[str] = df["path"].astype(str).tolist()
        self.labels: list[int] = df["label"].astype(int).tolist()
        self.mask_paths: list[str | None] = [None if pd.isna(m) else str(m) for m in df["mask_path"]]
        if with_masks and require_masks:
            self._require_masks()

    def _require_masks(self) -> None:
        lacking = [p for p, y, m in zip(self.paths, self.labels, self.mask_paths) if y == 1 and m is None]
        if lacking:
            shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
            raise ValueError(
                f"{len(lacking)} anomalous image(s) under {self.root} have no mask_path ({shown}); "
                "add their ground_truth masks or use with_masks=False (image-level metrics only)"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        image = load_rgb(self.root / self.paths[i])
        item: dict[str, torch.Tensor | int] = {
            "image": self.transform(image),  # (3, S, S)
            "label": torch.tensor(self.labels[i], dtype=torch.int64),
            "index": i,
        }
        if self.with_masks:
            mask_rel = self.mask_paths[i]
            mask = None if mask_rel is None else load_mask(self.root / mask_rel)
            item["mask"] = mask_to_tensor(mask, self.image_size)  # (1, S, S)
        return item
