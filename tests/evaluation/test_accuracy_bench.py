"""bench/accuracy.py's equal-training-time plan, its step timing and its paired seed comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_settings

from plantad.config import load_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from accuracy import equal_time_overrides, paired_difference, timed_train  # noqa: E402


def test_equal_time_gives_each_variant_the_dearest_ones_time_with_its_schedule_scaled():
    train = load_settings(None, ["train.steps=60", "train.warmup_steps=6", "train.hard_mining.ramp_steps=30"]).train
    plan = equal_time_overrides({"paper": 0.30, "shared": 0.20, "lighter": 0.07}, train)
    assert plan["paper"] == ["train.steps=60", "train.warmup_steps=6", "train.hard_mining.ramp_steps=30"]
    assert plan["shared"] == ["train.steps=90", "train.warmup_steps=9", "train.hard_mining.ramp_steps=45"]
    steps = {v: load_settings(None, o).train.steps for v, o in plan.items()}  # the overrides are valid settings
    cost = {"paper": 0.30, "shared": 0.20, "lighter": 0.07}
    for v in plan:  # equal time to within one step of each variant's own cost
        assert abs(steps[v] * cost[v] - 60 * 0.30) <= cost[v] / 2
    with pytest.raises(ValueError, match="positive time per step"):
        equal_time_overrides({"paper": 0.3, "broken": 0.0}, train)


def test_timed_train_measures_cpu_seconds_per_step(demo_root, demo_manifest, tmp_path):
    settings = tiny_settings("model.branches=semantic", "train.steps=3", "train.warmup_steps=1")
    result, per_step = timed_train(settings, demo_manifest, demo_root, tmp_path / "m")
    assert result.model_path.is_file() and result.steps == 3
    assert 0 < per_step < 60
    with pytest.raises(ValueError, match="train.steps=1"):
        timed_train(tiny_settings("model.branches=semantic", "train.steps=1", "train.warmup_steps=0"),
                    demo_manifest, demo_root, tmp_path / "one")


def _rows(scores: list[np.ndarray], labels: np.ndarray, cats: list[str]) -> list[dict]:
    return [{"labels": labels.tolist(), "categories": cats, "probability": s.tolist()} for s in scores]


def test_paired_difference_is_per_seed_auroc_gap_with_a_bootstrap_interval_around_its_mean():
    rng = np.random.default_rng(1)
    labels = np.tile(np.r_[np.zeros(10), np.ones(10)], 2)
    cats = ["a"] * 20 + ["b"] * 20
    perfect = labels + 0.01 * rng.random(40)
    noise = [rng.random(40), rng.random(40)]
    a, b = _rows([perfect, perfect], labels, cats), _rows(noise, labels, cats)
    per_seed, mean, low, high = paired_difference(a, b, "probability", draws=200)
    from plantad.evaluation.metrics import image_auroc
    expected = [1.0 - np.mean([image_auroc(labels[:20], n[:20]), image_auroc(labels[20:], n[20:])]) for n in noise]
    assert per_seed == pytest.approx(expected)
    assert mean == pytest.approx(np.mean(expected)) and low <= mean <= high
    assert paired_difference(a, a, "probability", draws=50)[1:] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same test images"):
        paired_difference(a, _rows([perfect[:20]], labels[:20], cats[:20]) * 2, "probability", draws=10)
