"""Noisy-OR fusion of the local and semantic branches, with its calibration as model buffers.

[read] The final score is the joint probability of the two branches' anomaly probabilities.
[reconstructed] Each raw score s_k becomes p_k = 1 - exp(-lambda_k * s_k); lambda_k is fitted on
held-out normal images so that their `quantile` score maps to `probability`. Then
P = 1 - (1 - p_D)(1 - p_E) and, on normal data, -log(1 - P) = lambda_D s_D + lambda_E s_E: the
training objective is that weighted sum of the two distillation losses. With `adaptive`
weighting the lambdas during training are the inverse running means of each loss (the same
scale-normalisation the calibration applies); with `fixed` they are the configured weights.
The students share no parameters, so this sum does not couple them: each weight only rescales
its own student's gradient. They train independently; only their scores are joined here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plantad.config import NoisyOrConfig


def noisy_or(*probabilities: torch.Tensor) -> torch.Tensor:
    """P = 1 - prod_k (1 - p_k): anomalous if any independent branch says so."""
    keep = torch.ones_like(probabilities[0])
    for p in probabilities:
        keep = keep * (1.0 - p)
    return 1.0 - keep


def score_to_probability(score: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.exp(-lam * score.clamp_min(0.0))


def fit_lambda(normal_scores: torch.Tensor, quantile: float, probability: float) -> float:
    """lambda with 1 - exp(-lambda * q) = probability, q the `quantile` of the normal scores."""
    q = float(torch.quantile(normal_scores.double().flatten(), quantile))
    if not math.isfinite(q) or q <= 0.0:
        raise ValueError(f"cannot calibrate on normal scores whose {quantile:.3f}-quantile is {q}")
    return -math.log(1.0 - probability) / q


class NoisyOr(nn.Module):
    """Holds lambdas, running loss means and the decision threshold so one state_dict carries all."""

    def __init__(self, cfg: NoisyOrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("lambda_local", torch.tensor(1.0))
        self.register_buffer("lambda_semantic", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("ema_local", torch.tensor(float("nan")))
        self.register_buffer("ema_semantic", torch.tensor(float("nan")))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def training_weights(self, loss_local: torch.Tensor | None, loss_semantic: torch.Tensor | None) -> tuple[float, float]:
        """Weights (w_D, w_E) of the objective -log(1 - P) = w_D L_D + w_E L_E for this step."""
        if self.cfg.weighting == "fixed":
            return self.cfg.weight_local, self.cfg.weight_semantic
        w_local = self._update_ema("ema_local", loss_local) * self.cfg.weight_local
        w_sem = self._update_ema("ema_semantic", loss_semantic) * self.cfg.weight_semantic
        return w_local, w_sem

    def _update_ema(self, name: str, loss: torch.Tensor | None) -> float:
        if loss is None:
            return 0.0
        value = float(loss.detach())
        ema: torch.Tensor = getattr(self, name)
        m = self.cfg.ema_momentum
        ema.fill_(value if not torch.isfinite(ema) else m * float(ema) + (1.0 - m) * value)
        return 1.0 / max(float(ema), 1e-8)

    def fit(self, local: torch.Tensor | None, semantic: torch.Tensor | None) -> None:
        """Fit lambda_k on the raw scores of held-out normal images (None: branch absent)."""
        q, p = self.cfg.calibration_quantile, self.cfg.calibration_probability
        if local is not None:
            self.lambda_local.fill_(fit_lambda(local, q, p))
        if semantic is not None:
            self.lambda_semantic.fill_(fit_lambda(semantic, q, p))

    def probabilities(
        self, local: torch.Tensor | None, semantic: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        p_local = None if local is None else score_to_probability(local, self.lambda_local)
        p_sem = None if semantic is None else score_to_probability(semantic, self.lambda_semantic)
        parts = [p for p in (p_local, p_sem) if p is not None]
        return p_local, p_sem, noisy_or(*parts)
