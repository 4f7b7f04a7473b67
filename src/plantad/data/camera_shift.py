"""What a moved or ageing camera does to a line's images: brightness, blur and a small rotation.

Used to simulate a drifting line (the line-health tests, the drift bench and the documentation's
plot of the drift statistic over a simulated shift); never applied to real data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter


@dataclass(frozen=True)
class CameraShift:
    brightness: float = 1.35  # PIL brightness factor (1: unchanged): an over-exposing lamp
    blur_radius: float = 1.0  # Gaussian blur radius in pixels: a focus drift
    rotation_deg: float = 4.0  # a camera knocked slightly off its mount

    def __post_init__(self) -> None:
        if self.brightness <= 0 or self.blur_radius < 0:
            raise ValueError(f"a camera shift needs brightness > 0 and blur_radius >= 0, got {self}")


def shifted_image(image: Image.Image, shift: CameraShift) -> Image.Image:
    """`image` as the shifted camera would see it (same size, RGB); the corners a rotation uncovers
    take the image's mean colour."""
    rgb = image.convert("RGB")
    fill = tuple(int(c) for c in rgb.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))
    out = rgb.rotate(shift.rotation_deg, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if shift.blur_radius > 0:
        out = out.filter(ImageFilter.GaussianBlur(shift.blur_radius))
    return ImageEnhance.Brightness(out).enhance(shift.brightness)


def write_line(images: list[Image.Image], folder: Path, shift_from: int | None, shift: CameraShift = CameraShift(),
               start_time: float = 1_700_000_000.0) -> list[Path]:
    """Write a simulated line's images as PNGs into `folder`, one second apart (file modification
    times, the order `plantad drift report` reads them in); from image `shift_from` on (None: never)
    the camera is shifted."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:05d}.png"
        (image if shift_from is None or i < shift_from else shifted_image(image, shift)).save(path)
        os.utime(path, (start_time + i, start_time + i))
        paths.append(path)
    return paths
