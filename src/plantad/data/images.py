"""Decoding and the one image transform shared by training, evaluation and serving.

Every image enters the product through `load_rgb` / `decode_image_bytes` (RGB, fully decoded, or an
`ImageDecodeError` naming the file) and becomes a model input through `ImageTransform`, so a model
is always scored on pixels prepared exactly like the ones it was trained on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN_255 = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).mul(255.0).view(3, 1, 1)
_STD_255 = torch.tensor(IMAGENET_STD, dtype=torch.float32).mul(255.0).view(3, 1, 1)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ValueError):
    """A file or byte string that is not a readable image; names its source and the reason."""

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"cannot decode image {self.source}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across Ray / worker processes
        return (type(self), (self.source, self.reason))


def decode_stored(data: bytes, source: str | Path) -> Image.Image:
    """The stored image as Pillow decodes it (mode untouched), fully read so truncation shows."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(source, f"too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports non-images, truncated and corrupt streams through these types
        raise ImageDecodeError(source, f"{type(exc).__name__}: {exc}") from exc
    return img


def read_image_bytes(path: Path) -> bytes:
    """File bytes, or ImageDecodeError naming the path when it is missing or unreadable."""
    if not path.is_file():
        raise ImageDecodeError(path, "file not found (check the path and the dataset root)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({exc})") from exc


def stored_channels(img: Image.Image) -> int:
    """Channels of the stored image: 1 grey (8 or 16 bit), 3 RGB, 4 RGBA; palettes count as colour."""
    if img.mode == "P":
        return 4 if "transparency" in img.info else 3
    if img.mode == "PA":
        return 4
    return len(img.getbands())


def to_rgb(img: Image.Image, source: str | Path = "image") -> Image.Image:
    """8-bit RGB: 16-bit grey is scaled (not clipped) to 0..255, alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        raise ImageDecodeError(source, "32-bit float images are not supported")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image_bytes(data: bytes, source: str = "uploaded bytes") -> Image.Image:
    """Decode an encoded image (PNG, JPEG, ...) to RGB; errors name `source`."""
    if not data:
        raise ImageDecodeError(source, "empty input (0 bytes)")
    return to_rgb(decode_stored(data, source), source)


class ImageTooLarge(ImageDecodeError):
    """An image over a configured byte or pixel limit (refused before it is decoded)."""


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # 8-bit RGB, fully decoded
    width: int
    height: int
    stored_mode: str  # Pillow mode as stored: "RGB", "L", "I;16", "RGBA", "P", ...
    format: str | None  # "PNG", "JPEG", ...

    @property
    def converted(self) -> str | None:
        """How the stored pixels were changed to reach RGB, for clients to see; None when RGB."""
        if self.stored_mode == "RGB":
            return None
        return f"converted from {self.stored_mode} to RGB"


def decode_untrusted(data: bytes, source: str, max_bytes: int | None = None, max_pixels: int | None = None) -> DecodedImage:
    """Decode bytes from outside (uploads, unknown folders) under byte and pixel limits.

    The pixel limit is checked on the header, before any pixel is decoded, so a decompression bomb
    costs nothing; errors are ImageDecodeError (ImageTooLarge for limits) naming `source`.
    """
    if not data:
        raise ImageDecodeError(source, "empty input (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLarge(source, f"{len(data)} bytes is over the limit of {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLarge(source, f"{width}x{height} = {width * height} pixels is over the limit of "
                                            f"{max_pixels} pixels")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(source, f"too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageDecodeError):
            raise
        if isinstance(exc, UnidentifiedImageError):  # its message holds a memory address: not reproducible
            raise ImageDecodeError(source, "UnidentifiedImageError: not an image format Pillow can read") from exc
        raise ImageDecodeError(source, f"{type(exc).__name__}: {exc}") from exc
    return DecodedImage(to_rgb(img, source), width, height, img.mode, img.format)


def load_rgb(path: Path) -> Image.Image:
    """Read and fully decode an image file to RGB; missing, truncated or non-image files raise."""
    path = Path(path)
    return to_rgb(decode_stored(read_image_bytes(path), path), path)


def load_mask(path: Path) -> Image.Image:
    """Read a ground-truth mask as 8-bit grey ('L'); errors name the mask path."""
    path = Path(path)
    img = decode_stored(read_image_bytes(path), path)
    if img.mode in _SIXTEEN_BIT_MODES:
        return to_rgb(img).convert("L")
    return img.convert("L")


class ImageTransform:
    """RGB PIL image -> float32 (3, S, S): bilinear antialiased resize to S x S, ImageNet-normalised.

    Aspect ratio is not kept (MVTec images are square; the anomaly map is resized back the same way).
    """

    def __init__(self, image_size: int) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = image_size
        # normalisation on 0..255 values: (x / 255 - mean) / std == (x - 255 mean) * (1 / (255 std))
        self._mean = _MEAN_255
        self._inv_std = _STD_255.reciprocal()

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size})"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = np.asarray(to_rgb(img), dtype=np.uint8)  # (H, W, 3)
        # planar float32 in one copy: the resize and the in-place normalisation then run on
        # contiguous planes (half the CPU of converting the interleaved view; this runs in the
        # serving batch, where the model waits for it)
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        size = self.image_size
        if x.shape[1:] != (size, size):
            x = F.interpolate(
                x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True
            ).squeeze(0)
        return x.sub_(self._mean).mul_(self._inv_std)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) images -> the model's input, normalised as ImageTransform normalises."""
    return (pixels.float() - _MEAN_255) / _STD_255


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """The model's normalised input -> uint8 (..., 3, H, W) pixels (the inverse of `normalised`, rounded)."""
    return (images.detach().float().cpu() * _STD_255 + _MEAN_255).round().clamp(0, 255).to(torch.uint8)


def mask_to_tensor(mask: Image.Image | None, image_size: int) -> torch.Tensor:
    """Ground-truth mask -> float32 (1, S, S) of {0, 1} by nearest resize; any non-zero pixel is defect.

    None (a normal image) gives all zeros.
    """
    if mask is None:
        return torch.zeros(1, image_size, image_size, dtype=torch.float32)
    grey = mask if mask.mode == "L" else mask.convert("L")
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.NEAREST)
    binary = np.asarray(grey) > 0
    return torch.from_numpy(binary.astype(np.float32)).unsqueeze(0)
