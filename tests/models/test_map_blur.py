"""The anomaly map's blur: `scoring.gaussian_sigma: dinomaly` gives the width of Dinomaly's own kernel
(5 taps, sigma 4, on a 256 px map) at the model's input size, measured on the map plantad computes."""

from __future__ import annotations

import pytest
import torch

from plantad.config import ConfigError, settings_from_dict
from plantad.scoring import map_sigma, smooth_map, truncated_kernel_std


def spread_px(row: torch.Tensor) -> float:
    """Standard deviation, in pixels, of a non-negative 1-D profile."""
    x = torch.arange(row.numel(), dtype=torch.float64)
    w = row.double() / row.double().sum()
    mean = (w * x).sum()
    return float(torch.sqrt((w * (x - mean) ** 2).sum()))


def test_dinomaly_blur_is_the_width_of_its_5_tap_sigma_4_kernel_scaled_to_the_input_size():
    # a 5-tap kernel of sigma 4 is nearly flat: its real standard deviation is 1.38 px, not 4
    assert truncated_kernel_std(5, 4.0) == pytest.approx(1.3832, abs=1e-4)
    assert map_sigma("dinomaly", 256) == pytest.approx(1.3832, abs=1e-4)
    assert map_sigma("dinomaly", 392) == pytest.approx(1.3832 * 392 / 256, abs=1e-4)
    assert map_sigma(4.0, 392) == 4.0  # a number is taken as given
    # on the map: one hot patch of a 28x28 grid at 392 px spreads like Dinomaly's blur of the same upsampled patch
    grid = torch.zeros(1, 28, 28)
    grid[0, 14, 14] = 1.0
    sharp = spread_px(smooth_map(grid, 392, 0.0)[0, 14 * 14 + 7])
    ours = spread_px(smooth_map(grid, 392, map_sigma("dinomaly", 392))[0, 14 * 14 + 7])
    assert ours ** 2 - sharp ** 2 == pytest.approx(map_sigma("dinomaly", 392) ** 2, rel=0.05)
    wide = spread_px(smooth_map(grid, 392, 4.0)[0, 14 * 14 + 7])
    assert wide ** 2 - sharp ** 2 > 3 * (ours ** 2 - sharp ** 2)  # the old 4 px blur: more than 3x the variance


def test_a_blur_setting_that_is_not_a_width_or_dinomaly_is_refused_naming_the_key():
    assert settings_from_dict({"scoring": {"gaussian_sigma": "dinomaly"}}).scoring.gaussian_sigma == "dinomaly"
    for bad in ("gauss", -1.0):
        with pytest.raises(ConfigError, match="scoring.gaussian_sigma"):
            settings_from_dict({"scoring": {"gaussian_sigma": bad}})
