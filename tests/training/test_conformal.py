"""The decision threshold's false-alarm promise: the conformal order statistic of held-out normal
probabilities, the guarantee stored with it, and the message when the holdout is too small."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from plantad.config import NoisyOrConfig
from plantad.data.dataset import split_holdout
from plantad.evaluation.metrics import calibration_rate_quantile
from plantad.models.checkpoint import load_model
from plantad.models.noisy_or import NoisyOr
from plantad.training.calibration import calibrate, conformal_threshold, images_needed, split_for_calibration
from plantad.training.trainer import holdout_batches, image_loader, normal_train_rows


def false_alarm_rate(n: int, alpha: float, trials: int, rule) -> float:
    """How often a fresh normal score (exchangeable with n held-out ones) reaches the threshold."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(trials, n + 1, generator=gen, dtype=torch.float64)
    thresholds = torch.tensor([rule(row[:n], alpha) for row in scores], dtype=torch.float64)
    return float((scores[:, n] >= thresholds).double().mean())


@pytest.mark.parametrize("n, alpha, k", [(9, 0.1, 9), (39, 0.05, 38)])  # k = ceil((n + 1)(1 - alpha))
def test_the_order_statistic_keeps_its_promise_where_the_quantile_does_not(n, alpha, k):
    trials = 20_000
    t = conformal_threshold(torch.rand(n, dtype=torch.float64), alpha)
    assert t.guaranteed and t.k == k and t.bound == pytest.approx(1 - k / (n + 1))
    conformal = false_alarm_rate(n, alpha, trials, lambda s, a: conformal_threshold(s, a).threshold)
    quantile = false_alarm_rate(n, alpha, trials, lambda s, a: float(torch.quantile(s, 1 - a)))
    se = (alpha * (1 - alpha) / trials) ** 0.5
    assert conformal <= t.bound + 4 * se  # exchangeable continuous scores: the rate is exactly 1 - k/(n+1)
    assert conformal >= t.bound - 4 * se
    assert quantile > alpha + 4 * se  # the rule this replaced: the (1 - alpha) quantile of the same n scores


def test_images_needed_and_the_rank_used():
    assert images_needed(0.01) == 99 and images_needed(0.05) == 19 and images_needed(0.1) == 9
    assert images_needed(0.0) is None
    p = torch.linspace(0, 1, 200)
    t = conformal_threshold(p, 0.01)
    assert (t.n, t.k, t.threshold) == (200, 199, pytest.approx(float(p[198])))
    assert t.guaranteed and t.bound == pytest.approx(1 - 199 / 201) and t.shortfall() is None
    short = conformal_threshold(p[:98], 0.01)
    assert not short.guaranteed and short.k == 98 and short.threshold == pytest.approx(float(p[97]))
    assert "needs at least 197 held-out normal images (99 to set the threshold)" in short.shortfall()


def trial_rate(n: int, alpha: float, same_images: bool, gen: torch.Generator) -> tuple[float, float]:
    """(false-alarm rate on 400 fresh normal images, bound) for one calibration on n + n fusion images drawn
    like the fresh ones: S_D with a large normal baseline, S_E small and tail-heavy."""
    m = 2 * n + 400
    local = 5.0 + torch.exp(0.3 * torch.randn(m, generator=gen, dtype=torch.float64))
    semantic = 0.01 * torch.exp(torch.randn(m, generator=gen, dtype=torch.float64))
    fusion = slice(0, n) if same_images else slice(n, 2 * n)
    nor = NoisyOr(NoisyOrConfig())
    nor.fit(local[fusion], semantic[fusion])
    p = nor.probabilities(local, semantic)[2]
    t = conformal_threshold(p[:n], alpha)
    return float((p[2 * n:] >= t.threshold).double().mean()), t.bound


def test_fitting_the_fusion_on_the_threshold_images_breaks_the_promise():
    """Why calibrate() fits the fusion on one half of the held-out images and the threshold on the other."""
    gen = torch.Generator().manual_seed(0)
    trials = 600
    same = [trial_rate(21, 0.05, True, gen) for _ in range(trials)]
    split = [trial_rate(21, 0.05, False, gen) for _ in range(trials)]
    bound = same[0][1]
    assert bound == pytest.approx(1 / 22)
    rate_same = sum(r for r, _ in same) / trials
    rate_split = sum(r for r, _ in split) / trials
    se = 0.05 / trials ** 0.5  # the per-trial rate's spread is about the bound (Beta(1, 21))
    assert rate_split == pytest.approx(bound, abs=4 * se)
    assert rate_same > bound + 4 * se  # measured 0.072 for the 0.045 promised
    # one calibration's rate is Beta(1, 21) (k = n): the 90% quantile that `plantad evaluate` reports
    assert float(np.quantile([r for r, _ in split], 0.9)) == pytest.approx(calibration_rate_quantile(21, 21, 0.9),
                                                                         abs=0.015)


def test_a_too_small_holdout_is_named_with_the_images_it_needs(trained_tiny, demo_root, demo_manifest, caplog):
    settings, _ = trained_tiny
    model, _ = load_model(trained_tiny[1].model_path)
    _, held = split_holdout(normal_train_rows(demo_manifest), 0.15, settings.train.seed)
    batches = holdout_batches(image_loader(held, demo_root, settings, shuffle=False))
    with caplog.at_level(logging.WARNING, logger="plantad.training.calibration"):
        fitted = calibrate(model, batches, settings.scoring)
    held_out, n = len(held), (len(held) + 1) // 2  # every second held-out image sets the threshold
    assert n < 99
    assert (f"calibration held out {held_out} normal images ({n} of them set the threshold, the others fit the "
            "fusion) and a false-alarm rate of at most 0.01 needs at least 197 held-out normal images (99 to set "
            "the threshold)") in caplog.text
    assert "data.holdout_min_images" in caplog.text
    g = model.noisy_or.guarantee()
    assert g == {"alpha": pytest.approx(0.01), "threshold_images": n, "order_statistic": n,
                 "bound": pytest.approx(1 / (n + 1))}
    assert fitted["false_alarm"]["guaranteed"] is False and fitted["false_alarm"]["held_out_needed"] == 197
    caplog.clear()  # a rate that n images can promise: no warning, the bound is within it
    with caplog.at_level(logging.WARNING, logger="plantad.training.calibration"):
        fitted = calibrate(model, batches, settings.scoring.model_copy(update={"threshold_quantile": 0.8}))
    assert "cannot promise" not in caplog.text and fitted["false_alarm"]["guaranteed"] is True
    assert model.noisy_or.guarantee()["bound"] <= 0.2


def test_the_holdout_floor_in_images():
    rows = [{"path": f"{c}/{i}.png", "category": c, "split": "train", "label": 0} for c in "ab" for i in range(20)]
    df = pd.DataFrame(rows)
    _, held = split_holdout(df, 0.1, seed=0)
    assert held["category"].value_counts().to_dict() == {"a": 2, "b": 2}
    _, held = split_holdout(df, 0.1, seed=0, min_images=7)
    assert held["category"].value_counts().to_dict() == {"a": 7, "b": 7}
    _, held = split_holdout(df, 0.0, seed=0, min_images=30)  # never all of a category
    assert held["category"].value_counts().to_dict() == {"a": 19, "b": 19}
    with pytest.raises(ValueError, match="data.holdout_min_images must be >= 0"):
        split_holdout(df, 0.1, seed=0, min_images=-1)


def test_one_held_out_image_cannot_be_split():
    with pytest.raises(ValueError, match="calibration needs at least 2 held-out normal images .* got 1: raise "
                                         "data.holdout_fraction or data.holdout_min_images"):
        split_for_calibration(1)
    fusion, threshold = split_for_calibration(5)
    assert list(range(5))[fusion] == [1, 3] and list(range(5))[threshold] == [0, 2, 4]
