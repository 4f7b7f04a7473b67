"""Image-level metrics and curves against scikit-learn (the independent reference) and brute force."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from plantad.evaluation.metrics import (
    image_ap,
    image_auroc,
    image_f1_max,
    pr_curve_points,
    roc_curve_points,
)

SEEDS = range(60)


def tied_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both classes, few distinct score levels (many ties), sizes 2..80."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    rng.shuffle(labels)
    levels = int(rng.integers(1, 8))
    scores = rng.integers(0, levels, n) / levels + 0.15 * labels * rng.integers(0, 2, n)
    return labels, scores


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = int(np.sum(pred & (labels == 1)))
        fp = int(np.sum(pred & (labels == 0)))
        fn = int(np.sum(~pred & (labels == 1)))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_ap_f1_match_references_with_ties(seed: int) -> None:
    labels, scores = tied_case(seed)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert image_f1_max(labels, scores) == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(0, 60, 6))
def test_continuous_scores_and_bool_labels(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    labels = rng.random(200) < 0.3
    scores = rng.normal(size=200) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_known_values() -> None:
    assert image_auroc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: half credit
    assert image_auroc([0, 1], [0.2, 0.9]) == 1.0
    assert image_auroc([0, 1], [0.9, 0.2]) == 0.0
    assert image_ap([0, 1, 1], [0.1, 0.2, 0.3]) == 1.0
    assert image_f1_max([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.8)  # TP2 FP1 at 0.7


@pytest.mark.parametrize("seed", range(0, 60, 4))
def test_curve_points_match_sklearn(seed: int) -> None:
    labels, scores = tied_case(seed)
    fpr, tpr, thr = roc_curve_points(labels, scores)
    ref = roc_curve(labels, scores, drop_intermediate=False)
    for ours, theirs in zip((fpr, tpr, thr), ref):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    precision, recall, thr = pr_curve_points(labels, scores)
    ref = precision_recall_curve(labels, scores)
    for ours, theirs in zip((precision, recall, thr), ref):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("metric", [image_auroc, image_ap, image_f1_max])
@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1], []])
def test_one_class_gives_nan_and_names_the_metric(metric, labels, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="plantad.evaluation.metrics"):
        value = metric(labels, np.linspace(0, 1, len(labels)))
    assert math.isnan(value)
    assert metric.__name__ in caplog.text


@pytest.mark.parametrize("curve", [roc_curve_points, pr_curve_points])
def test_curves_refuse_one_class(curve) -> None:
    with pytest.raises(ValueError, match="both normal"):
        curve([1, 1, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("metric", [image_auroc, image_ap, image_f1_max, roc_curve_points, pr_curve_points])
def test_invalid_inputs_raise(metric) -> None:
    with pytest.raises(ValueError, match=r"labels shape \(5,\) and scores shape \(4,\)"):
        metric([0, 1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"labels shape \(2, 2\)"):
        metric([[0, 1], [0, 1]], [[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match="0/1"):
        metric([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metric([0, 1, 1], [0.1, np.nan, 0.3])
