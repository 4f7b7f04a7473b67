"""The one path from image tensors to anomaly maps, scores, probabilities and decisions.

Evaluation, batch scoring, the HTTP server and calibration all call `score_batch`, so a score
means the same thing everywhere. Map: per-patch distance, bilinear up to the input size, Gaussian
smoothing (one linear operator, `smooth_map`); image (local) score: the model's `image_score`
(Dinomaly's top-k% mean; SNL's maximum) [read].
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from plantad.config import ScoringConfig
from plantad.models.device import autocast, model_device
from plantad.models.interface import AnomalyModel


class ScoreOutput(NamedTuple):
    anomaly_map: torch.Tensor  # (B, S, S) local distance map at model input size
    local_score: torch.Tensor | None  # (B,) raw S_D image score
    semantic_score: torch.Tensor | None  # (B,) raw S_E score
    p_local: torch.Tensor | None  # (B,)
    p_semantic: torch.Tensor | None  # (B,)
    probability: torch.Tensor  # (B,) Noisy-OR probability
    is_anomalous: torch.Tensor  # (B,) bool, probability >= threshold
    embedding: torch.Tensor | None = None  # (B, C) the teacher's view of each image (models/interface.py)


DINOMALY_BLUR = (5, 4.0, 256)  # Dinomaly's map blur: a 5-tap Gaussian kernel of sigma 4 on its 256 px map


def truncated_kernel_std(taps: int, sigma: float) -> float:
    """Standard deviation, in pixels, of a Gaussian kernel of `sigma` cut to `taps` taps: a 5-tap
    kernel of sigma 4 is nearly flat, so its real width is far below its nominal sigma."""
    x = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return float(torch.sqrt((w * x**2).sum() / w.sum()))


def map_sigma(setting: float | str, size: int) -> float:
    """The anomaly map's blur sigma in pixels at input size `size`: a number as given; `dinomaly`:
    the Gaussian with the variance of Dinomaly's kernel, scaled from its 256 px map to `size`."""
    if setting == "dinomaly":
        taps, sigma, at = DINOMALY_BLUR
        return truncated_kernel_std(taps, sigma) * size / at
    return float(setting)


def gaussian_kernel1d(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))  # scipy's default truncate=4
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps, reflect padding."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    mode = "reflect" if min(maps.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample(patch_map: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(patch_map.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)


@lru_cache(maxsize=16)
def _axis_operator(n: int, size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(size, n) matrix of bilinear upsampling n -> size, then the Gaussian blur, along one axis: the
    columns are `upsample` and `gaussian_blur` applied to the n unit signals (same padding rule)."""
    unit = torch.eye(n, device=device).view(n, 1, n, 1)
    rows = F.interpolate(unit, size=(size, 1), mode="bilinear", align_corners=False).view(n, 1, size)
    if sigma > 0:
        k = gaussian_kernel1d(sigma, device)
        r = k.numel() // 2
        mode = "reflect" if size > r else "replicate"
        rows = F.conv1d(F.pad(rows, (r, r), mode=mode), k.view(1, 1, -1))
    return rows.view(n, size).T.contiguous()


def smooth_map(patch_map: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """`gaussian_blur(upsample(patch_map, size), sigma)` as two small matrix products: both steps are
    linear and separable, so (B, h, w) -> A_h @ map @ A_w^T, equal to the two-step form up to float
    rounding and about 50 times cheaper than blurring the full-size map (the 392 px production map)."""
    h, w = patch_map.shape[-2:]
    a_h = _axis_operator(h, size, float(sigma), patch_map.device)
    a_w = a_h if w == h else _axis_operator(w, size, float(sigma), patch_map.device)
    return a_h @ patch_map @ a_w.T  # (B, S, S)


def top_k_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = maps.flatten(1)
    k = max(1, int(round(flat.shape[1] * fraction)))
    return flat.topk(k, dim=1).values.mean(dim=1)


def branch_scores(
    patch_distance: torch.Tensor | None, semantic: torch.Tensor | None, branches: str | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The raw (local, semantic) scores of the selected `branches`; a branch the model lacks is an error."""
    if branches is None:
        return patch_distance, semantic
    wanted = {"dual": ("local", "semantic"), "local": ("local",), "semantic": ("semantic",)}[branches]
    have = {"local": patch_distance, "semantic": semantic}
    missing = [b for b in wanted if have[b] is None]
    if missing:
        raise ValueError(f"model.branches={branches}: the model has no {missing[0]} branch to score")
    return (patch_distance if "local" in wanted else None, semantic if "semantic" in wanted else None)


@torch.no_grad()
def score_batch(
    model: AnomalyModel, images: torch.Tensor, cfg: ScoringConfig, threshold: float | None = None, amp: bool = True,
    branches: str | None = None,
) -> ScoreOutput:
    """Score normalised images (B, 3, S, S). `threshold` overrides the model's stored threshold; the model
    runs under bf16 autocast on CUDA when `amp` (train.amp) and on CPU when `cfg.cpu_amp`. `branches`
    (model.branches: dual, local, semantic) scores with those of the model's branches alone; None: all."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, S, S), got {tuple(images.shape)}")
    size = model.image_size
    if images.shape[-2:] != (size, size):
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the model expects {size}x{size}")
    model.eval()
    device = model_device(model)
    with autocast(device, amp, cfg.cpu_amp):
        raw = model(images.to(device, non_blocking=True))
    patch, semantic = branch_scores(raw.patch_distance, raw.semantic, branches)
    if patch is not None:
        amap = smooth_map(patch.float(), size, map_sigma(cfg.gaussian_sigma, size))
        local = model.image_score(amap, cfg)  # the method's own rule (models/interface.py)
    else:  # semantic only: the image-level score is all it has
        amap = semantic.float().view(-1, 1, 1).expand(-1, size, size).contiguous()
        local = None
    semantic = None if semantic is None else semantic.float()
    p_local, p_sem, prob = model.noisy_or.probabilities(local, semantic)
    thr = float(model.noisy_or.threshold) if threshold is None else float(threshold)
    decision = prob >= thr if math.isfinite(thr) else torch.zeros_like(prob, dtype=torch.bool)
    embedding = None if raw.embedding is None else raw.embedding.float()
    return ScoreOutput(amap, local, semantic, p_local, p_sem, prob, decision, embedding)
