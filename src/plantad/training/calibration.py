"""Fit the Noisy-OR calibration and the decision threshold on held-out normal images.

Rule (documented, stored in the model's buffers): lambda_k maps the `calibration_quantile` of
normal raw scores to `calibration_probability`; the threshold on the final probability is the
`scoring.threshold_quantile` of the held-out normal images' probabilities (a target false-alarm
rate of 1 - quantile on normal parts). The same images, scored once more with the fitted
calibration, give the line-health drift reference (evaluation/drift.py), which `save_model` stores
in the model's metadata: serving needs no side file to watch for drift.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from plantad.config import ScoringConfig
from plantad.evaluation.drift import fit_reference
from plantad.models.interface import AnomalyModel
from plantad.scoring import score_batch


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
    """Fit lambdas, then the threshold, on normal images; returns what was fitted (for logs)."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs held-out normal images: set data.holdout_fraction > 0")
    raw = _collect(model, batches, cfg, amp)
    model.noisy_or.fit(raw.get("local"), raw.get("semantic"))
    scored = _collect(model, batches, cfg, amp)
    prob = scored["probability"]
    threshold = float(torch.quantile(prob.double(), cfg.threshold_quantile))
    model.noisy_or.threshold.fill_(threshold)
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
        "normal_probability_median": float(prob.median()),
    }
