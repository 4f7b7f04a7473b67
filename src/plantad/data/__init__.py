"""Dataset layouts, the Parquet manifest, the shared image transform and the demo-data generator."""

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

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DatasetLayoutError",
    "ImageDecodeError",
    "ImageTransform",
    "add_normal",
    "decode_image_bytes",
    "generate_demo",
    "load_mask",
    "load_rgb",
    "mask_to_tensor",
]
