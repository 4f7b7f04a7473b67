"""The MVTec-AD folder layout: which files are images of which category, split and defect.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png                  (defect 'good' = normal test image)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Only file names are read here; decoding and measuring happen in `manifest.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "test")
NORMAL = "good"
EXPECTED_LAYOUT = "<root>/<category>/train/good/*.png and <root>/<category>/test/<defect>/*.png"


class DatasetLayoutError(ValueError):
    """A dataset folder that does not follow the MVTec-AD layout, or a category it does not hold."""


@dataclass(frozen=True)
class ImageEntry:
    """One image file found in the layout, with its mask file when ground truth has one."""

    path: Path
    category: str
    split: str
    defect_type: str
    mask: Path | None


def is_image_file(path: Path) -> bool:
    """A visible regular file with an image extension (case-insensitive)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; [] when the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def find_categories(root: Path) -> list[str]:
    """Sorted names of the direct subfolders of `root` that have a `train/` folder."""
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} does not exist or is not a folder")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "train").is_dir())


def resolve_categories(root: Path, requested: list[str] | None) -> list[str]:
    """The categories to use, sorted: all found (None) or the requested ones, which must exist."""
    found = find_categories(root)
    if not found:
        raise DatasetLayoutError(
            f"no category folders under {root}: expected the MVTec-AD layout {EXPECTED_LAYOUT}"
        )
    if requested is None:
        return found
    if not requested:
        raise DatasetLayoutError(f"empty category list for {root}; use None for all of {found}")
    unknown = sorted(set(requested) - set(found))
    if unknown:
        raise DatasetLayoutError(
            f"category {unknown} not found under {root}; categories found there: {found}"
        )
    return sorted(set(requested))


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    """Mask files of one defect folder keyed by stem (e.g. '000_mask'); first by name wins."""
    masks: dict[str, Path] = {}
    for path in list_images(folder):
        masks.setdefault(path.stem, path)
    return masks


def _reject_loose_images(split_dir: Path) -> None:
    loose = list_images(split_dir)
    if loose:
        raise DatasetLayoutError(
            f"{len(loose)} image(s) directly in {split_dir} (e.g. {loose[0].name}); move them into a "
            f"defect-type subfolder such as {split_dir / NORMAL}"
        )


def category_entries(root: Path, category: str) -> list[ImageEntry]:
    """Every image of one category: train before test, defect types and file names sorted."""
    entries: list[ImageEntry] = []
    for split in SPLITS:
        split_dir = root / category / split
        if not split_dir.is_dir():
            continue
        _reject_loose_images(split_dir)
        for defect_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            defect = defect_dir.name
            masks = {} if defect == NORMAL else _masks_by_stem(root / category / "ground_truth" / defect)
            for path in list_images(defect_dir):
                mask = masks.get(f"{path.stem}_mask")
                entries.append(ImageEntry(path, category, split, defect, mask))
    return entries
