"""Dataset layouts, the Parquet manifest, the shared image transform and the demo-data generator."""

from plantad.data.dataset import ManifestDataset, split_holdout
from plantad.data.demo import add_normal, generate_demo
from plantad.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    ImageTransform,
    decode_image_bytes,
    load_mask,
    load_rgb,
    mask_to_tensor,
)
from plantad.data.layout import IMAGE_EXTENSIONS, DatasetLayoutError
from plantad.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_DTYPES,
    CorruptImageError,
    ManifestError,
    read_manifest,
    scan_dataset,
    write_manifest,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MANIFEST_COLUMNS",
    "MANIFEST_DTYPES",
    "CorruptImageError",
    "DatasetLayoutError",
    "ImageDecodeError",
    "ImageTransform",
    "ManifestDataset",
    "ManifestError",
    "add_normal",
    "decode_image_bytes",
    "generate_demo",
    "load_mask",
    "load_rgb",
    "mask_to_tensor",
    "read_manifest",
    "scan_dataset",
    "split_holdout",
    "write_manifest",
]
