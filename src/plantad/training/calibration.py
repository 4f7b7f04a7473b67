"""Fit the Noisy-OR calibration and the decision threshold on held-out normal images.

Rules (documented, stored in the model's buffers): the held-out images are split in two, alternately
(every second image, so each category is in both halves). Each branch's median and tail on the
fusion half set its probability (models/noisy_or.py); the threshold on the final probability is the
conformal order statistic of the other half's n probabilities for a false-alarm rate
alpha = 1 - `scoring.threshold_quantile`: the k-th smallest, k = ceil((n + 1)(1 - alpha)). For a new
normal image exchangeable with those n, P(probability >= threshold) <= 1 - k/(n + 1) <= alpha (ties
aside): the fusion was fitted without them, so the guarantee is exact. (Fitting the fusion on the
same images broke it: see test_fitting_the_fusion_on_the_threshold_images_breaks_the_promise.)
With n < 1/alpha - 1, k would exceed n: no threshold keeps the promise; the largest probability of the
half is used (bound 1/(n + 1)), training logs a warning naming the held-out images needed, and the
bound stored is the one it can keep. All held-out images, scored once more with the fitted
calibration, give the line-health drift reference (evaluation/drift.py), which `save_model` stores
in the model's metadata: serving needs no side file to watch for drift. Sixteen of the held-out
images, as uint8, ship in model.pt too: an int8 OpenVINO graph is calibrated and checked on them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from plantad.config import ScoringConfig
from plantad.evaluation.drift import fit_reference
from plantad.models.exported import normal_sample
from plantad.models.interface import AnomalyModel
from plantad.scoring import score_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConformalThreshold:
    threshold: float
    alpha: float  # false-alarm rate asked for
    n: int  # normal images the threshold is the order statistic of
    k: int  # the order statistic used (1-based)
    bound: float  # false-alarm rate promised: 1 - k / (n + 1)
    needed: int | None  # n needed for alpha; None when alpha is 0 (no finite n)
    held_out: int = 0  # all held-out images: n of them set the threshold, the others fit the fusion

    @property
    def guaranteed(self) -> bool:
        return self.bound <= self.alpha + 1e-12

    def shortfall(self) -> str | None:
        """Why alpha cannot be promised with this holdout, or None when it can."""
        if self.guaranteed:
            return None
        need = ("no finite number of held-out images can promise a rate of 0" if self.needed is None
                else f"a false-alarm rate of at most {self.alpha:g} needs at least {held_out_needed(self.needed)} "
                     f"held-out normal images ({self.needed} to set the threshold)")
        return (f"the threshold cannot promise scoring.threshold_quantile={1 - self.alpha:g}: calibration held out "
                f"{self.held_out} normal images ({self.n} of them set the threshold, the others fit the fusion) "
                f"and {need}; the threshold is the largest of the {self.n} probabilities, which promises at most "
                f"{self.bound:.3g}. Raise data.holdout_fraction or data.holdout_min_images")


def images_needed(alpha: float) -> int | None:
    """Smallest n with ceil((n + 1)(1 - alpha)) <= n, i.e. n >= 1/alpha - 1; None for alpha = 0."""
    return None if alpha <= 0.0 else max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def held_out_needed(threshold_images: int) -> int:
    """Held-out images that give `threshold_images` to the threshold half (every second one, from the first)."""
    return 2 * threshold_images - 1


def split_for_calibration(n: int) -> tuple[slice, slice]:
    """(fusion half, threshold half) of n held-out images: every second image each, the threshold from the first."""
    if n < 2:
        raise ValueError(f"calibration needs at least 2 held-out normal images (one half fits the fusion, the other "
                         f"sets the threshold), got {n}: raise data.holdout_fraction or data.holdout_min_images")
    return slice(1, None, 2), slice(0, None, 2)


def conformal_threshold(normal_probabilities: torch.Tensor, alpha: float, held_out: int | None = None
                        ) -> ConformalThreshold:
    """The k-th smallest of n held-out normal probabilities, k = ceil((n + 1)(1 - alpha)), capped at n."""
    p = torch.sort(normal_probabilities.double().flatten()).values
    n = int(p.numel())
    if n == 0:
        raise ValueError("calibration needs held-out normal images: set data.holdout_fraction > 0")
    k = min(n, max(1, math.ceil((n + 1) * (1.0 - alpha) - 1e-9)))
    return ConformalThreshold(float(p[k - 1]), alpha, n, k, 1.0 - k / (n + 1), images_needed(alpha),
                              n if held_out is None else held_out)


def _collect(model: AnomalyModel, batches: Iterable[torch.Tensor], cfg: ScoringConfig, amp: bool) -> dict[str, torch.Tensor]:
    cols: dict[str, list[torch.Tensor]] = {"local": [], "semantic": [], "probability": [], "embedding": []}
    for images in batches:
        out = score_batch(model, images, cfg, amp=amp)
        if out.local_score is not None:
            cols["local"].append(out.local_score.cpu())
        if out.semantic_score is not None:
            cols["semantic"].append(out.semantic_score.cpu())
        cols["probability"].append(out.probability.cpu())
        if out.embedding is not None:
            cols["embedding"].append(out.embedding.cpu())
    return {k: torch.cat(v) for k, v in cols.items() if v}


def calibrate(model: AnomalyModel, batches: Iterable[torch.Tensor], cfg: ScoringConfig, amp: bool = True) -> dict[str, Any]:
    """Fit the fusion on one half of the held-out normal images, then the conformal threshold on the
    other half; returns what was fitted (for logs)."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs held-out normal images: set data.holdout_fraction > 0")
    raw = _collect(model, batches, cfg, amp)
    fusion_half, threshold_half = split_for_calibration(int(raw["probability"].numel()))
    model.noisy_or.fit(*(None if raw.get(b) is None else raw[b][fusion_half] for b in ("local", "semantic")))
    scored = _collect(model, batches, cfg, amp)
    prob = scored["probability"]
    conformal = conformal_threshold(prob[threshold_half], 1.0 - cfg.threshold_quantile, held_out=int(prob.numel()))
    threshold = conformal.threshold
    nor = model.noisy_or
    nor.threshold.fill_(threshold)
    for name, value in (("alpha", conformal.alpha), ("images", conformal.n), ("rank", conformal.k),
                        ("bound", conformal.bound)):
        getattr(nor, f"alarm_{name}").fill_(value)
    if conformal.shortfall():
        log.warning("%s", conformal.shortfall())
    model.normal_sample = normal_sample(batches)  # saved with the model: an int8 graph's calibration
    drift_images = 0
    if "embedding" in scored and prob.numel() >= 8:  # read by checkpoint.model_metadata
        reference = fit_reference(scored["embedding"].numpy(), prob.numpy(), threshold, cfg.drift_dims,
                                  cfg.drift_reference_images, cfg.drift_neighbours)
        model.drift_reference = reference.to_dict()
        drift_images = reference.images
    return {
        "drift_reference_images": drift_images,
        "n_images": int(prob.numel()),
        "lambda_local": float(model.noisy_or.lambda_local),
        "lambda_semantic": float(model.noisy_or.lambda_semantic),
        "threshold": threshold,
        "threshold_quantile": cfg.threshold_quantile,
        "false_alarm": {**nor.guarantee(), "guaranteed": conformal.guaranteed,
                        "held_out_needed": None if conformal.needed is None else held_out_needed(conformal.needed),
                        "shortfall": conformal.shortfall()},
        "median_local": float(nor.median_local),
        "spread_local": float(nor.spread_local),
        "median_semantic": float(nor.median_semantic),
        "spread_semantic": float(nor.spread_semantic),
        "normal_probability_median": float(prob.median()),
    }
