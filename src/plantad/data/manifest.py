"""The manifest: one Parquet row per image, the hand-off between pipeline stages.

`scan_dataset` measures every file of an MVTec-layout folder (hash, size, channels, intensity) so
later stages (Great Expectations validation, training, evaluation) never walk the folder again.
Missing values are nulls: NaN in the string and float columns, <NA> in the Int64 columns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from plantad.data.images import ImageDecodeError, decode_stored, read_image_bytes, stored_channels, to_rgb
from plantad.data.layout import (
    EXPECTED_LAYOUT,
    IMAGE_EXTENSIONS,
    NORMAL,
    DatasetLayoutError,
    ImageEntry,
    category_entries,
    resolve_categories,
)

log = logging.getLogger(__name__)

MANIFEST_DTYPES: dict[str, str] = {
    "path": "str",  # POSIX, relative to the dataset root
    "category": "str",
    "split": "str",  # 'train' | 'test'
    "label": "int64",  # 0 normal, 1 anomalous
    "defect_type": "str",  # 'good' for normal images
    "mask_path": "str",  # relative; null when there is no mask
    "sha256": "str",  # hex digest of the file bytes
    "width": "Int64",
    "height": "Int64",
    "channels": "Int64",  # of the stored file: 1 grey, 3 RGB, 4 RGBA (palettes count as 3 / 4)
    "mask_width": "Int64",
    "mask_height": "Int64",
    "mean_intensity": "float64",  # of the grey image in [0, 1]
    "std_intensity": "float64",
    "decode_error": "str",  # null when the image decodes
}
MANIFEST_COLUMNS: list[str] = list(MANIFEST_DTYPES)


class CorruptImageError(ValueError):
    """Files of a dataset that do not decode; `.paths` lists every one of them."""

    def __init__(self, problems: list[tuple[Path, str]]) -> None:
        self.problems = list(problems)
        self.paths = [path for path, _ in self.problems]
        lines = [f"  {path}: {reason}" for path, reason in self.problems]
        super().__init__(
            f"{len(self.paths)} file(s) do not decode:\n" + "\n".join(lines) + "\nRemove or replace "
            "them, or scan with on_error='record' to keep them in the manifest for the validation report."
        )

    def __reduce__(self) -> tuple[type, tuple[list[tuple[Path, str]]]]:
        return (type(self), (self.problems,))


class ManifestError(ValueError):
    """A manifest file that is missing, not Parquet, or lacks manifest columns."""


def _measure_image(path: Path) -> dict[str, Any]:
    """Hash, size, stored channels and grey intensity of one image; decode_error set on failure."""
    empty = {"sha256": None, "width": None, "height": None, "channels": None}
    empty |= {"mean_intensity": None, "std_intensity": None}
    try:
        data = read_image_bytes(path)
    except ImageDecodeError as exc:
        return empty | {"decode_error": exc.reason}
    sha = hashlib.sha256(data).hexdigest()
    try:
        img = decode_stored(data, path)
        grey = np.asarray(to_rgb(img, path).convert("L"), dtype=np.float64) / 255.0
    except ImageDecodeError as exc:
        return empty | {"sha256": sha, "decode_error": exc.reason}
    return {
        "sha256": sha, "width": img.width, "height": img.height, "channels": stored_channels(img),
        "mean_intensity": float(grey.mean()), "std_intensity": float(grey.std()), "decode_error": None,
    }  # fmt: skip


def _measure_mask(path: Path) -> tuple[int | None, int | None, str | None]:
    """(width, height, None) of a mask, or (None, None, reason) when it does not decode."""
    try:
        img = decode_stored(read_image_bytes(path), path)
    except ImageDecodeError as exc:
        return None, None, exc.reason
    return img.width, img.height, None


def _entry_row(root: Path, entry: ImageEntry) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """The manifest row of one image and the decode problems of it and its mask."""
    row: dict[str, Any] = {
        "path": entry.path.relative_to(root).as_posix(), "category": entry.category,
        "split": entry.split, "label": int(entry.defect_type != NORMAL),
        "defect_type": entry.defect_type, "mask_path": None, "mask_width": None, "mask_height": None,
    }  # fmt: skip
    row |= _measure_image(entry.path)
    problems = [] if row["decode_error"] is None else [(entry.path, row["decode_error"])]
    if entry.mask is not None:
        row["mask_path"] = entry.mask.relative_to(root).as_posix()
        row["mask_width"], row["mask_height"], mask_error = _measure_mask(entry.mask)
        if mask_error is not None:
            problems.append((entry.mask, mask_error))
    return row, problems


def coerce_manifest(df: pd.DataFrame, source: str = "manifest") -> pd.DataFrame:
    """The manifest columns first, in order, with their dtypes; extra columns kept after them."""
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{source} lacks manifest column(s) {missing}; re-create it with scan_dataset")
    extras = [c for c in df.columns if c not in MANIFEST_DTYPES]
    out = df[MANIFEST_COLUMNS + extras].copy()
    for col, dtype in MANIFEST_DTYPES.items():
        try:
            out[col] = out[col].astype(dtype)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: column '{col}' cannot be read as {dtype} ({exc})") from exc
    return out


def _progress_enabled(progress: bool) -> bool:
    return progress and sys.stderr.isatty()


def scan_dataset(
    root: Path,
    categories: list[str] | None = None,
    on_error: Literal["raise", "record"] = "raise",
    progress: bool = False,
) -> pd.DataFrame:
    """Measure every image of an MVTec-layout folder into a manifest (all categories when None).

    on_error='raise' collects every undecodable image or mask into one CorruptImageError;
    'record' keeps those rows (decode_error set, sizes null) for the validation stage to report.
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    root = Path(root)
    names = resolve_categories(root, categories)
    entries = [entry for name in names for entry in category_entries(root, name)]
    if not entries:
        raise DatasetLayoutError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root} for categories {names}; "
            f"expected {EXPECTED_LAYOUT}"
        )
    rows, problems = [], []
    bar = tqdm(entries, desc=f"scanning {root}", unit="img", disable=not _progress_enabled(progress))
    for entry in bar:
        row, row_problems = _entry_row(root, entry)
        rows.append(row)
        problems.extend(row_problems)
    if problems and on_error == "raise":
        raise CorruptImageError(problems)
    for path, reason in problems:
        log.warning("recorded undecodable file %s: %s", path, reason)
    df = coerce_manifest(pd.DataFrame(rows, columns=MANIFEST_COLUMNS), f"scan of {root}")
    rank = df["split"].map({"train": 0, "test": 1}).rename("_split_rank")
    ordered = pd.concat([df, rank], axis=1).sort_values(["category", "_split_rank", "path"], kind="stable")
    return ordered.drop(columns="_split_rank").reset_index(drop=True)


def manifest_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 over the sorted (path, split, label, file sha256) rows: changes with any image."""
    rows = manifest[["path", "split", "label", "sha256"]].astype(str).sort_values("path")
    return hashlib.sha256("\n".join("|".join(r) for r in rows.itertuples(index=False)).encode()).hexdigest()


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Write the manifest as Parquet atomically (temp file + rename): never a half-written file."""
    path = Path(path)
    out = coerce_manifest(df, f"manifest to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        out.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest written by `write_manifest`, with the manifest dtypes."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found; create it with the prepare stage (scan_dataset)")
    try:
        df = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"manifest {path} is not a readable Parquet file ({exc})") from exc
    return coerce_manifest(df, f"manifest {path}")
