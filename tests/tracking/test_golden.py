"""The golden record the register stage writes: the serving runtime's graph checked against the
torch outputs, and the promotion gate refusing a version whose graph disagrees."""

from __future__ import annotations

import copy

import pytest

from plantad.serving.golden import expected_outputs, golden_images
from plantad.serving.predictor import Predictor
from plantad.tracking.golden import graph_agreement


@pytest.fixture(scope="module")
def recorded(trained_tiny):
    _, result = trained_tiny
    model_dir = result.model_path.parent
    images = golden_images()
    return model_dir, images, expected_outputs(Predictor.load(str(model_dir), device="cpu", runtime="torch"), images)


def test_the_openvino_graph_agrees_with_the_recorded_torch_outputs_and_a_wrong_record_is_named(recorded):
    model_dir, images, expected = recorded
    assert graph_agreement(model_dir, "torch", images, expected, 0.01) == "agrees (torch serves)"
    assert graph_agreement(model_dir, "openvino", images, expected, 0.01) == "agrees"
    wrong = copy.deepcopy(expected)
    wrong["images"]["golden.png"]["probability"] = (wrong["images"]["golden.png"]["probability"] + 0.3) % 1.0
    verdict = graph_agreement(model_dir, "openvino", images, wrong, 0.01)
    assert verdict.startswith("disagrees: golden.png probability") and "> 0.01" in verdict
