"""Dataset layouts, the Parquet manifest, the shared image transform and the demo-data generator."""

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

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDecodeError",
    "ImageTransform",
    "decode_image_bytes",
    "load_mask",
    "load_rgb",
    "mask_to_tensor",
]
