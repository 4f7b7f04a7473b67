"""Noisy-OR fusion of the local and semantic branches, with its calibration as model buffers.

[read] The final score is the joint probability of the two branches' anomaly probabilities.
[reconstructed] Fusion rule (FUSION_OFFSET_SCALE, what `fit` sets): each raw score s_k becomes the
standardised exceedance z_k = (s_k - m_k) / r_k, with m_k the median of the branch's raw scores on
held-out normal images and r_k = q_k - m_k its spread up to q_k, their `calibration_quantile`; then
p_k = 1 - exp(-c softplus(z_k)), with c = -log(1 - `calibration_probability`) / softplus(1) so that
q_k maps to `calibration_probability` in both branches, and P = 1 - (1 - p_D)(1 - p_E), so
-log(1 - P) = c (softplus(z_D) + softplus(z_E)): each branch counts in units of its own normal tail
above its own normal baseline. The earlier rule (FUSION_SCALE, kept for models saved before it) was
p_k = 1 - exp(-lambda_k s_k) with lambda_k mapping the `calibration_quantile` of normal scores to
`calibration_probability`: no offset, so the ranking was lambda_D s_D + lambda_E s_E and a branch with
a large normal baseline was under-weighted against its spread. lambda_k is still fitted: it sets the
local heat map's colour scale (serving/render.py).
The training objective is -log(1 - P) = w_D L_D + w_E L_E, a weighted sum of the two distillation
losses. With `adaptive` weighting the weights are the inverse running means of each loss (a
scale-normalisation); with `fixed` they are the configured weights.
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


FUSION_SCALE = 0  # p_k = 1 - exp(-lambda_k s_k): models saved before the offset-and-spread rule
FUSION_OFFSET_SCALE = 1  # p_k = 1 - exp(-gain * softplus((s_k - median_k) / spread_k))


def offset_scale_probability(score: torch.Tensor, median: torch.Tensor, spread: torch.Tensor,
                             gain: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(-gain * nn.functional.softplus((score - median) / spread))


def fusion_gain(probability: float) -> float:
    """c with 1 - exp(-c softplus(1)) = probability: a branch's normal `quantile` maps to `probability`."""
    return -math.log(1.0 - probability) / math.log1p(math.e)


def fit_offset_scale(normal_scores: torch.Tensor, quantile: float, branch: str) -> tuple[float, float]:
    """(median, spread = `quantile` - median) of one branch's raw scores on held-out normal images."""
    s = normal_scores.double().flatten()
    median, q = float(torch.quantile(s, 0.5)), float(torch.quantile(s, quantile))
    spread = q - median
    if not (math.isfinite(median) and math.isfinite(spread)) or spread <= 0.0:
        raise ValueError(f"cannot calibrate the {branch} branch on {s.numel()} held-out normal scores: their median "
                         f"is {median} and their {quantile:g}-quantile {q} (it must be finite and above the median)")
    return median, spread


def fit_lambda(normal_scores: torch.Tensor, quantile: float, probability: float) -> float:
    """lambda with 1 - exp(-lambda * q) = probability, q the `quantile` of the normal scores."""
    q = float(torch.quantile(normal_scores.double().flatten(), quantile))
    if not math.isfinite(q) or q <= 0.0:
        raise ValueError(f"cannot calibrate on normal scores whose {quantile:.3f}-quantile is {q}")
    return -math.log(1.0 - probability) / q


NAN = float("nan")
LEGACY_DEFAULTS = {  # buffer -> value on a model fitted before these buffers existed
    "fusion": float(FUSION_SCALE), "fusion_gain": 1.0, "median_local": 0.0, "spread_local": 1.0, "median_semantic": 0.0,
    "spread_semantic": 1.0, "alarm_alpha": NAN, "alarm_images": NAN, "alarm_rank": NAN, "alarm_bound": NAN,
}


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
        self._register_fusion_buffers()

    def _register_fusion_buffers(self) -> None:
        """The fusion rule and its fitted offsets and spreads, and the false-alarm guarantee that the
        threshold carries (training/calibration.py): alpha asked, holdout size n, order statistic k,
        bound 1 - k/(n+1) on the false-alarm rate (NaN: not fitted by this version)."""
        for name, value in LEGACY_DEFAULTS.items():
            self.register_buffer(name, torch.tensor(value))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # noqa: ANN001 (torch's hook signature)
        """A model saved before the offset-and-spread rule has none of its buffers: it loads with the
        rule it was calibrated with (FUSION_SCALE) and no stated false-alarm guarantee."""
        if prefix + "lambda_local" in state_dict and not any(prefix + k in state_dict for k in LEGACY_DEFAULTS):
            for name, value in LEGACY_DEFAULTS.items():
                state_dict[prefix + name] = torch.tensor(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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

    @property
    def fusion_rule(self) -> int:
        return int(self.fusion)

    def fit(self, local: torch.Tensor | None, semantic: torch.Tensor | None) -> None:
        """Fit median_k, spread_k (the fusion) and lambda_k (the heat map's scale) on the raw scores of
        held-out normal images (None: branch absent); the model then fuses with FUSION_OFFSET_SCALE."""
        q, p = self.cfg.calibration_quantile, self.cfg.calibration_probability
        for branch, scores in (("local", local), ("semantic", semantic)):
            if scores is None:
                continue
            median, spread = fit_offset_scale(scores, q, branch)
            getattr(self, f"median_{branch}").fill_(median)
            getattr(self, f"spread_{branch}").fill_(spread)
            getattr(self, f"lambda_{branch}").fill_(fit_lambda(scores, q, p))
        self.fusion_gain.fill_(fusion_gain(p))
        self.fusion.fill_(FUSION_OFFSET_SCALE)

    def branch_probability(self, score: torch.Tensor, branch: str) -> torch.Tensor:
        if self.fusion_rule == FUSION_OFFSET_SCALE:
            return offset_scale_probability(score, getattr(self, f"median_{branch}"), getattr(self, f"spread_{branch}"),
                                            self.fusion_gain)
        return score_to_probability(score, getattr(self, f"lambda_{branch}"))

    def guarantee(self) -> dict[str, float | int | None]:
        """The false-alarm guarantee stored with the threshold; values None on a model saved before it."""
        def value(t: torch.Tensor) -> float | None:  # float32 buffers: 0.01 back as 0.01, not 0.0099999998
            return float(f"{float(t):.7g}") if torch.isfinite(t) else None

        n, k = value(self.alarm_images), value(self.alarm_rank)
        return {"alpha": value(self.alarm_alpha), "threshold_images": None if n is None else int(n),
                "order_statistic": None if k is None else int(k), "bound": value(self.alarm_bound)}

    def probabilities(
        self, local: torch.Tensor | None, semantic: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        p_local = None if local is None else self.branch_probability(local, "local")
        p_sem = None if semantic is None else self.branch_probability(semantic, "semantic")
        parts = [p for p in (p_local, p_sem) if p is not None]
        return p_local, p_sem, noisy_or(*parts)
