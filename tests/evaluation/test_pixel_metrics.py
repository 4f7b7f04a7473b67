"""Pixel AUROC against scikit-learn; AUPRO against a brute-force sweep written here, and known values."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from plantad.evaluation.metrics import pixel_aupro, pixel_auroc


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Every distinct threshold, regions labelled per image, PRO and FPR counted naively."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        predicted = maps >= t
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        points.append((predicted[normal].sum() / normal.sum(), pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the segment at the limit
            x1, y1 = limit, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def tiny_masks() -> np.ndarray:
    """3 images of 8x8: two regions of different size, one L-shaped region, one normal image."""
    masks = np.zeros((3, 8, 8), dtype=np.uint8)
    masks[0, 1:4, 1:4] = 1  # 9 px
    masks[0, 6, 5:7] = 1  # 2 px
    masks[1, 2:6, 3] = 1
    masks[1, 5, 3:6] = 1  # L, 6 px
    return masks


def random_maps(seed: int, masks: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    levels = int(rng.integers(2, 12))  # few levels: ties between normal and anomalous pixels
    maps = rng.integers(0, levels, masks.shape) + rng.integers(0, levels // 2 + 1, masks.shape) * masks
    if seed % 3 == 0:
        maps = maps + rng.random(masks.shape) * 0.5  # and some without ties
    return (maps / levels).astype(np.float32)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, limit: float) -> None:
    masks = tiny_masks()
    maps = random_maps(seed, masks)
    assert pixel_aupro(masks, maps, fpr_limit=limit) == pytest.approx(brute_force_aupro(masks, maps, limit), abs=1e-12)


def two_equal_regions() -> np.ndarray:
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1
    masks[1, 5:7, 4:6] = 1
    return masks


def test_aupro_known_values() -> None:
    masks = two_equal_regions()
    assert pixel_aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)  # perfect
    # constant map: one threshold, the curve is the diagonal (0,0)-(1,1): area 0.3^2/2, / 0.3
    assert pixel_aupro(masks, np.full(masks.shape, 0.7, np.float32)) == pytest.approx(0.15, abs=1e-12)
    assert pixel_aupro(masks, np.zeros(masks.shape, np.float32), fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)
    # second region scores below every normal pixel: PRO 0.5 until FPR 1 -> 0.5
    misses = np.where(masks == 1, 1.0, 0.5).astype(np.float32)
    misses[1][masks[1] == 1] = 0.0
    assert pixel_aupro(masks, misses) == pytest.approx(0.5, abs=1e-12)
    # second region tied with the normal pixels: PRO goes 0.5 -> 1 along FPR 0 -> 1; (0.5 + 0.65) / 2
    misses[1][masks[1] == 1] = 0.5
    assert pixel_aupro(masks, misses) == pytest.approx(0.575, abs=1e-12)


def test_aupro_weights_regions_not_pixels() -> None:
    """Hitting a 1-px region and missing a 9-px one is PRO 0.5, not 1/10 of the pixels."""
    masks = np.zeros((1, 8, 8), dtype=np.uint8)
    masks[0, 0:3, 0:3] = 1
    masks[0, 6, 6] = 1
    maps = np.zeros(masks.shape, np.float32)
    maps[0, 6, 6] = 1.0
    assert pixel_aupro(masks, maps) == pytest.approx(0.575, abs=1e-12)


def test_aupro_regions_are_8_connected() -> None:
    """Diagonal neighbours form one region of 4 px: hitting 1 px gives PRO 0.25 (two regions: 0.5)."""
    masks = np.zeros((1, 8, 8), dtype=np.uint8)
    masks[0, 0, 0] = 1
    masks[0, 1, 1:3] = masks[0, 2, 1] = 1
    maps = np.zeros(masks.shape, np.float32)
    maps[0, 0, 0] = 1.0
    assert pixel_aupro(masks, maps) == pytest.approx((0.25 + 0.25 + 0.75 * 0.3) / 2, abs=1e-12)


def test_aupro_regions_do_not_span_images() -> None:
    """Overlapping positions in two images are two regions (labelled per image, not as a volume)."""
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, 1:3, 1:3] = 1  # 4 px, fully hit
    masks[1, 1:3, 0:4] = 1  # 8 px, a quarter hit
    maps = masks * np.float32(0)
    maps[0][masks[0] == 1] = 1.0
    maps[1, 1, 0:2] = 1.0
    pro0 = (1.0 + 0.25) / 2  # one 12-px volume would give 6 / 12
    assert pixel_aupro(masks, maps) == pytest.approx((pro0 + pro0 + (1 - pro0) * 0.3) / 2, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_pixel_auroc_matches_sklearn_on_flattened_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = (rng.random((3, 16, 16)) < 0.1).astype(np.uint8)
    masks[0, 0, 0] = 1
    levels = int(rng.integers(2, 20))
    maps = (rng.integers(0, levels, masks.shape) + masks * rng.integers(0, 3, masks.shape)).astype(np.float32)
    if seed % 4 == 0:
        maps = maps + rng.random(masks.shape).astype(np.float32)  # and some without ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks.astype(bool), maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", [pixel_auroc, pixel_aupro])
@pytest.mark.parametrize("fill", [0, 1])
def test_pixel_metrics_nan_without_both_pixel_classes(metric, fill: int, caplog) -> None:
    masks = np.full((2, 4, 4), fill, dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="plantad.evaluation.metrics"):
        value = metric(masks, np.random.default_rng(0).random(masks.shape))
    assert math.isnan(value)
    assert metric.__name__ in caplog.text


@pytest.mark.parametrize("metric", [pixel_auroc, pixel_aupro])
def test_pixel_metrics_invalid_inputs(metric) -> None:
    masks = two_equal_regions()
    with pytest.raises(ValueError, match=r"masks shape \(2, 8, 8\) and maps shape \(2, 8, 9\)"):
        metric(masks, np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metric(masks[0], np.zeros((8, 8)))
    with pytest.raises(ValueError, match="0/1"):
        metric(masks * 255, np.zeros(masks.shape))
    with pytest.raises(ValueError, match="0/1"):
        metric(masks * 0.5, np.zeros(masks.shape))
    nan_map = np.zeros(masks.shape)
    nan_map[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metric(masks, nan_map)


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5])
def test_aupro_rejects_fpr_limit_outside_unit_interval(limit: float) -> None:
    with pytest.raises(ValueError, match="fpr_limit"):
        pixel_aupro(two_equal_regions(), np.zeros((2, 8, 8)), fpr_limit=limit)
