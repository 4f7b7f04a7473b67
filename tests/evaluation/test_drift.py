"""The line-health drift statistic: its false-alarm rate on normal images, its detection of a moved
camera, and the reference that calibration stores with the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from plantad.config import DriftConfig
from plantad.data.camera_shift import CameraShift, shifted_image
from plantad.data.images import ImageTransform
from plantad.evaluation.drift import (DriftReference, DriftReferenceError, fit_reference, ks_distance,
                                      outlier_rank_test)
from plantad.serving.drift import LineDrift
from plantad.serving.predictor import ImageScore
from tiny import tiny_settings

ALPHA = 0.01


def binomial_ceiling(p: float, n: int) -> float:
    """A share that n tests at false-alarm rate p exceed with probability below about 0.001."""
    return p + 3.1 * math.sqrt(p * (1 - p) / n)


@dataclass
class Embedded:
    normal: np.ndarray  # (N, C) teacher embeddings of normal demo images
    moved: np.ndarray  # the same parts through a moved camera (CameraShift())
    probability: np.ndarray  # (N,) of the normal ones
    category: np.ndarray  # (N,) the product each shows


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Embedded:
    """318 normal demo images (3 products) through a tiny model's teacher, as served and shifted."""
    from plantad.config import DemoConfig
    from plantad.data.demo import generate_demo
    from plantad.data.manifest import scan_dataset
    from plantad.models.factory import build_model
    from plantad.scoring import score_batch

    root = tmp_path_factory.mktemp("drift-demo") / "data"
    generate_demo(root, DemoConfig(seed=0, image_size=64, n_train=100, n_test_good=6, n_test_defect=1))
    rows = scan_dataset(root).query("label == 0").reset_index(drop=True)
    settings = tiny_settings()
    torch.manual_seed(0)
    model = build_model(settings).eval()
    transform = ImageTransform(settings.data.image_size)
    images = [Image.open(root / p).convert("RGB") for p in rows["path"]]

    def run(batch: list[Image.Image]):
        return score_batch(model, torch.stack([transform(i) for i in batch]), settings.scoring, amp=False)
    normal = run(images)
    moved = run([shifted_image(i, CameraShift()) for i in images])
    return Embedded(normal.embedding.numpy(), moved.embedding.numpy(), normal.probability.numpy(),
                    rows["category"].to_numpy())


def test_false_alarm_rate_on_normal_windows_is_within_alpha():
    """600 windows of normal embeddings, each against a fresh reference (each version has its own):
    the share with p <= alpha stays within alpha's binomial margin."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((3, 48)) * 2.0  # three product categories, like the demo's

    def normal(n: int) -> np.ndarray:
        return mix[rng.integers(0, 3, n)] + rng.standard_normal((n, 48))
    trials, alarms = 600, 0
    for _ in range(trials):
        ref = fit_reference(normal(256), rng.random(256), 0.99, 16, 512)
        alarms += outlier_rank_test(ref.calibration_scores, ref.outlier_scores(ref.project(normal(64)))).p_value <= ALPHA
    assert alarms / trials <= binomial_ceiling(ALPHA, trials), f"{alarms} false alarms in {trials} tests"


def test_false_alarm_rate_and_detection_on_the_models_own_embeddings(embedded):
    """The demo's normal images through the model: random reference/window splits alarm no more often
    than alpha allows, and windows of the same parts seen by a moved camera alarm every time."""
    rng = np.random.default_rng(1)
    trials, alarms, detected = 300, 0, 0
    for _ in range(trials):
        order = rng.permutation(len(embedded.normal))
        ref_idx, win_idx = order[:200], rng.choice(order[200:], 64, replace=False)
        ref = fit_reference(embedded.normal[ref_idx], embedded.probability[ref_idx], 0.99, 16, 512)
        for emb, counter in ((embedded.normal, "alarm"), (embedded.moved, "detect")):
            test = outlier_rank_test(ref.calibration_scores, ref.outlier_scores(ref.project(emb[win_idx])))
            if test.p_value <= ALPHA:
                alarms, detected = (alarms + 1, detected) if counter == "alarm" else (alarms, detected + 1)
    assert alarms / trials <= binomial_ceiling(ALPHA, trials), f"{alarms} false alarms in {trials} tests"
    assert detected == trials


def scores_of(emb: np.ndarray, prob: np.ndarray, threshold: float) -> list[ImageScore]:
    return [ImageScore(float(p), bool(p >= threshold), None, None, None, None, threshold, embedding=e)
            for e, p in zip(emb, prob)]


def test_a_moved_camera_is_detected_at_the_first_test_and_a_normal_line_is_not(embedded):
    """One replica's tracker with the default settings (a test every 64 images), two lines fed in
    requests of 4: `normal` gets unshifted parts, `moved` other parts through a brighter, blurred,
    4-degree-rotated camera. The moved line's first test, at its 64th image, reports drift; the
    normal line's tests do not."""
    order = np.random.default_rng(2).permutation(len(embedded.normal))  # a line sees the products mixed
    ref_idx, rest = order[:190], order[190:]
    reference = fit_reference(embedded.normal[ref_idx], embedded.probability[ref_idx], 0.99, 16, 512)
    tracker = LineDrift(DriftConfig())
    tests: dict[str, list[tuple[int, bool]]] = {"normal": [], "moved": []}
    for start in range(0, 128, 4):
        for line, emb in (("normal", embedded.normal), ("moved", embedded.moved)):
            idx = rest[start:start + 4] if line == "normal" else rest[::-1][start:start + 4]
            if tracker.record(line, "1", reference, scores_of(emb[idx], embedded.probability[idx], 0.5), now=1e3):
                result = tracker.test(line, "1", reference, now=1e3)
                tests[line].append((start + 4, result.drifted))
    assert tests["moved"] == [(64, True), (128, True)], tests
    assert tests["normal"] == [(64, False), (128, False)], tests
    status = tracker.status(reference)
    assert status["lines"]["moved"]["last_test"]["auc"] > 0.7
    assert status["reference"]["images"] == 190 and status["reference"]["fit_images"] == 95


def test_window_is_bounded_and_forgets_images_older_than_the_horizon():
    rng = np.random.default_rng(2)
    ref = fit_reference(rng.standard_normal((64, 8)), rng.random(64), 0.99, 4, 64)
    tracker = LineDrift(DriftConfig(window_images=16, min_images=8, every_images=8, horizon_s=60.0))
    for t in range(40):
        tracker.record("a", "1", ref, scores_of(rng.standard_normal((1, 8)), rng.random(1), 0.5), now=float(t))
    assert tracker.status(ref)["lines"]["a"]["window_images"] == 16
    assert tracker.test("a", "1", ref, now=100.0) is None  # 60 s later only images from t >= 40 would count
    assert tracker.status(ref)["lines"]["a"]["window_images"] == 0
    assert tracker.test("a", "2", ref, now=100.0) is None  # another version's window: nothing to test


def test_a_new_version_starts_a_new_window():
    rng = np.random.default_rng(3)
    ref = fit_reference(rng.standard_normal((64, 8)), rng.random(64), 0.99, 4, 64)
    tracker = LineDrift(DriftConfig(window_images=16, min_images=8, every_images=8))
    tracker.record("a", "1", ref, scores_of(rng.standard_normal((12, 8)), rng.random(12), 0.5))
    assert not tracker.record("a", "2", ref, scores_of(rng.standard_normal((4, 8)), rng.random(4), 0.5))
    assert tracker.status(ref)["lines"]["a"] == {"version": "2", "window_images": 4, "last_test": None}


def test_score_shift_is_the_ks_distance():
    assert ks_distance(np.array([0.1, 0.2]), np.array([0.1, 0.2])) == 0.0
    assert ks_distance(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 1.0


def test_calibration_stores_the_reference_with_the_model(trained_tiny):
    """The trained model's metadata carries the reference; the Predictor reads it back, projects
    the model's embeddings and reports what it holds."""
    from plantad.serving.predictor import Predictor

    settings, result = trained_tiny
    predictor = Predictor.load(str(result.model_path.parent))
    ref = predictor.drift_reference
    assert ref is not None and ref.fit.shape[1] == settings.scoring.drift_dims
    assert 8 <= ref.images == result.calibration["drift_reference_images"]
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    score = predictor.score([grey])[0]
    assert ref.project(score.embedding[None]).shape == (1, settings.scoring.drift_dims)
    round_trip = DriftReference.from_dict(ref.to_dict())
    assert np.array_equal(round_trip.fit, ref.fit) and round_trip.k == ref.k


def test_a_damaged_reference_is_refused_naming_the_field():
    rng = np.random.default_rng(4)
    stored = fit_reference(rng.standard_normal((16, 8)), rng.random(16), 0.99, 4, 16).to_dict()
    stored["fit"]["shape"] = [3, 4]
    with pytest.raises(DriftReferenceError, match="drift_reference.fit"):
        DriftReference.from_dict(stored)
    with pytest.raises(DriftReferenceError, match="do not fit"):
        fit_reference(rng.standard_normal((16, 8)), rng.random(16), 0.99, 4, 16).project(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 8 held-out"):
        fit_reference(rng.standard_normal((5, 8)), rng.random(5), 0.99, 4, 16)
