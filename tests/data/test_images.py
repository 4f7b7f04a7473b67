"""Decoding real files of every mode, decode errors, the shared transform and mask tensors."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import random_pixels, write_image
from PIL import Image

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


def test_load_rgb_converts_grey_rgba_and_16_bit(tmp_path: Path) -> None:
    grey = np.full((6, 5), 77, np.uint8)
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    wide = np.full((6, 5), 65535 // 2, np.uint16)  # mid grey in 16 bit
    for name, pixels, expected in [("l.png", grey, 77), ("rgba.png", rgba, 200), ("i16.png", wide, 127)]:
        img = load_rgb(write_image(tmp_path / name, pixels))
        assert img.mode == "RGB" and img.size == (5, 6)
        assert np.asarray(img)[0, 0, 0] == expected, name


def test_load_rgb_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="nothere.png.*not found"):
        load_rgb(tmp_path / "nothere.png")


def test_load_rgb_rejects_truncated_and_non_image_files(tmp_path: Path) -> None:
    good = write_image(tmp_path / "good.png", random_pixels(0, (64, 64, 3)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    for bad in (truncated, text):
        with pytest.raises(ImageDecodeError) as info:
            load_rgb(bad)
        assert str(bad) in str(info.value)


def test_decode_image_bytes_matches_file_and_names_source() -> None:
    pixels = random_pixels(1, (9, 7, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    assert np.array_equal(np.asarray(decode_image_bytes(buf.getvalue())), pixels)
    with pytest.raises(ImageDecodeError, match="uploaded bytes"):
        decode_image_bytes(b"GIF89a-but-not-really")
    with pytest.raises(ImageDecodeError, match="request 7.*empty"):
        decode_image_bytes(b"", source="request 7")


def test_decode_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(ImageDecodeError("a/b.png", "truncated")))
    assert (err.source, err.reason) == ("a/b.png", "truncated") and "a/b.png" in str(err)


def test_transform_normalises_with_imagenet_statistics() -> None:
    colour = np.array([0.2, 0.5, 0.9])
    img = Image.fromarray(np.broadcast_to(np.rint(colour * 255).astype(np.uint8), (20, 30, 3)).copy())
    x = ImageTransform(16)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (np.rint(colour * 255) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(x.std(dim=(1, 2)), torch.zeros(3), atol=1e-5)


def test_transform_at_model_size_normalises_every_pixel_into_contiguous_planes() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    x = ImageTransform(12)(Image.fromarray(pixels))
    expected = (pixels.transpose(2, 0, 1) / 255.0 - np.array(IMAGENET_MEAN).reshape(3, 1, 1)) / np.array(
        IMAGENET_STD).reshape(3, 1, 1)
    assert x.is_contiguous() and x.shape == (3, 12, 12)
    assert torch.allclose(x, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_transform_resizes_bilinear_with_antialias() -> None:
    # a 1-px checkerboard averages to grey when downscaled with antialiasing (not so when subsampled)
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    x = ImageTransform(8)(Image.fromarray(board).convert("RGB"))
    pixels = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(pixels, torch.full_like(pixels, 0.5), atol=0.02)


def test_transform_keeps_spatial_layout_and_accepts_grey() -> None:
    pixels = np.zeros((32, 32), np.uint8)
    pixels[:, 16:] = 255  # right half white
    x = ImageTransform(8)(Image.fromarray(pixels))  # mode L is converted
    assert x.shape == (3, 8, 8)
    assert (x[:, :, :4] < 0).all() and (x[:, :, 4:] > 0).all()


def test_mask_to_tensor_binary_nearest_and_zeros_for_none(tmp_path: Path) -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[:20, :10] = 255
    t = mask_to_tensor(load_mask(write_image(tmp_path / "m.png", mask)), 20)
    assert t.shape == (1, 20, 20) and t.dtype == torch.float32
    assert set(t.unique().tolist()) == {0.0, 1.0}
    assert t[0, :10, :5].eq(1).all() and t[0, 10:, :].sum() == 0 and t[0, :, 5:].sum() == 0
    faint = np.zeros((8, 8), np.uint8)
    faint[3, 4] = 1  # any non-zero pixel is defect (0/1 masks as well as 0/255)
    assert mask_to_tensor(Image.fromarray(faint), 8)[0].nonzero().tolist() == [[3, 4]]
    none = mask_to_tensor(None, 12)
    assert none.shape == (1, 12, 12) and none.sum() == 0
