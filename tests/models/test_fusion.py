"""The Noisy-OR fusion: each branch standardised by its own normal baseline and tail, so a branch
with a large normal baseline is not drowned by a small-scaled one; models saved before the rule keep
the rule they were calibrated with."""

from __future__ import annotations

import json

import pytest
import torch

from plantad.config import NoisyOrConfig
from plantad.evaluation.metrics import image_auroc
from plantad.models.checkpoint import META_FILE, MODEL_FILE, load_model, save_model
from plantad.models.factory import build_model
from plantad.models.noisy_or import FUSION_OFFSET_SCALE, FUSION_SCALE, NoisyOr, fit_lambda, noisy_or, \
    score_to_probability
from plantad.models.safe_load import file_sha256

from tiny import tiny_settings


def branches(n_normal: int, n_anomalous: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """S_D: baseline 10, spread 0.1, anomalies +0.5 (informative); S_E: baseline 0.01, tail-heavy, uninformative."""
    n = n_normal + n_anomalous
    local = 10.0 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    local[n_normal:] += 0.5
    semantic = 0.01 * torch.rand(n, generator=gen, dtype=torch.float64) ** 2
    return local, semantic


def test_a_branch_with_a_large_normal_baseline_keeps_its_weight():
    gen = torch.Generator().manual_seed(0)
    held_local, held_sem = branches(200, 0, gen)
    test_local, test_sem = branches(200, 200, gen)
    labels = torch.cat([torch.zeros(200), torch.ones(200)]).numpy()
    m = NoisyOr(NoisyOrConfig())
    m.fit(held_local, held_sem)
    assert m.fusion_rule == FUSION_OFFSET_SCALE
    joined = m.probabilities(test_local, test_sem)[2]
    best = image_auroc(labels, test_local.numpy())
    # the earlier scale-only rule on the same held-out scores: lambda_k maps each normal 0.99-quantile to 0.5
    cfg = NoisyOrConfig()
    old = noisy_or(*(score_to_probability(t, torch.tensor(fit_lambda(h, cfg.calibration_quantile,
                                                                     cfg.calibration_probability)))
                     for t, h in ((test_local, held_local), (test_sem, held_sem))))
    assert best > 0.99
    assert image_auroc(labels, joined.numpy()) > best - 0.02
    assert image_auroc(labels, old.numpy()) < best - 0.1  # measured 0.85: S_D's baseline, not its spread, set its weight
    q = torch.quantile(held_local, cfg.calibration_quantile)  # each branch's normal quantile maps to the probability
    assert float(m.branch_probability(q.view(1), "local")) == pytest.approx(cfg.calibration_probability, abs=1e-6)


def test_constant_normal_scores_cannot_be_calibrated():
    m = NoisyOr(NoisyOrConfig())
    with pytest.raises(ValueError, match=r"cannot calibrate the semantic branch on 5 held-out normal scores"):
        m.fit(torch.rand(5), torch.full((5,), 0.3))


def test_a_model_saved_before_the_fusion_rule_loads_with_its_own(tmp_path):
    settings = tiny_settings()
    torch.manual_seed(0)
    model = build_model(settings)
    model.noisy_or.threshold.fill_(0.5)
    model.noisy_or.lambda_local.fill_(2.0)
    model.noisy_or.lambda_semantic.fill_(30.0)
    out = tmp_path / "model"
    save_model(model, settings, out)
    blob = torch.load(out / MODEL_FILE, weights_only=True)  # strip the buffers this version added
    added = [k for k in blob["state_dict"] if k.startswith("noisy_or.") and k.split(".", 1)[1] not in
             ("lambda_local", "lambda_semantic", "threshold", "ema_local", "ema_semantic")]
    assert "noisy_or.median_local" in added and "noisy_or.alarm_bound" in added
    blob["state_dict"] = {k: v for k, v in blob["state_dict"].items() if k not in added}
    torch.save(blob, out / MODEL_FILE)
    meta = json.loads((out / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps({**meta, "model_sha256": file_sha256(out / MODEL_FILE)}))
    loaded, _ = load_model(out)
    nor = loaded.noisy_or
    assert nor.fusion_rule == FUSION_SCALE and float(nor.threshold) == 0.5
    assert nor.guarantee() == {"alpha": None, "threshold_images": None, "order_statistic": None, "bound": None}
    s_d, s_e = torch.tensor([0.1, 0.4]), torch.tensor([0.01, 0.002])
    assert torch.allclose(-torch.log1p(-nor.probabilities(s_d, s_e)[2]), 2.0 * s_d + 30.0 * s_e, atol=1e-5)
