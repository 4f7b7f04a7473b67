"""`plantad evaluate --set` on a saved model: an override that cannot take effect is refused by name; the
ones that can (scoring, device, metrics, one branch of the model) take effect and metrics.json records them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plantad.cli import main
from plantad.config import ConfigError
from plantad.evaluation import evaluate as evaluation
from plantad.evaluation.metrics import image_auroc
from plantad.evaluation.overrides import checked_overrides
from plantad.models.checkpoint import load_model


def category_mean_auroc(pred, scores) -> float:
    """image_auroc as metrics.json reports it: the mean over categories."""
    cats = pred.rows["category"].to_numpy()
    return float(np.mean([image_auroc(pred.labels[cats == c], scores[cats == c]) for c in np.unique(cats)]))


def evaluate(model_path, demo_root, out, *sets: str) -> int:
    return main(["evaluate", "--model", str(model_path), "--data", str(demo_root), "--out", str(out),
                 *(a for s in sets for a in ("--set", s))])


@pytest.mark.parametrize("override, reason", [
    ("model.decoder.mlp_ratio=2", "architecture or training"),
    ("model.teacher.layers=[0,1]", "architecture or training"),
    ("model.noisy_or.calibration_quantile=0.9", "calibration"),
    ("train.steps=5", "training setting"),
    ("data.image_size=64", "input size is fixed"),
    ("scoring.threshold_quantile=0.9", "calibration"),
    ("scoring.runtime=openvino", "scores with torch"),
    ("mlflow.experiment=other", "does not use it"),
    ("model={decoder: {mlp_ratio: 2}}", "architecture or training"),  # a whole section: its leaves are checked
])
def test_an_override_a_saved_model_cannot_take_is_refused_naming_it(trained_tiny, demo_root, tmp_path, capsys,
                                                                    override, reason):
    _, result = trained_tiny
    out = tmp_path / "metrics.json"
    assert evaluate(result.model_path, demo_root, out, "scoring.batch_size=4", override) == 2
    err = capsys.readouterr().err
    key = override.split("=")[0] if not override.startswith("model={") else "model.decoder.mlp_ratio"
    assert f"--set {key}: a saved model cannot take it" in err and reason in err
    assert "plantad evaluate --set accepts model.branches, scoring.gaussian_sigma" in err
    assert not out.exists()


def test_a_branch_the_saved_model_lacks_is_refused():
    saved = {"model": {"method": "dual", "branches": "local"}}
    with pytest.raises(ConfigError, match="trained with model.branches=local and has no semantic branch"):
        checked_overrides(["model.branches=semantic"], saved)
    with pytest.raises(ConfigError, match="model.branches=dual: the saved model .* no semantic branch"):
        checked_overrides(["model.branches=dual"], saved)
    assert checked_overrides(["model.branches=local", "scoring.gaussian_sigma=2"], saved) == {
        "model.branches": "local", "scoring.gaussian_sigma": 2}
    dual = {"model": {"method": "dual", "branches": "dual"}}
    assert checked_overrides(["model.branches=null"], dual) == {"model.branches": "dual"}  # the method's own


def test_one_branch_of_a_dual_model_scores_alone_and_is_recorded(trained_tiny, demo_root, demo_manifest, tmp_path):
    _, result = trained_tiny
    joined, local, semantic = (tmp_path / f"{n}.json" for n in ("joined", "local", "semantic"))
    assert evaluate(result.model_path, demo_root, joined) == 0
    assert evaluate(result.model_path, demo_root, local, "model.branches=local") == 0
    assert evaluate(result.model_path, demo_root, semantic, "model.branches=semantic") == 0
    m_joined, m_local, m_sem = (json.loads(p.read_text()) for p in (joined, local, semantic))
    # the saved model's own scores, each branch's raw score beside the joined probability
    model, meta = load_model(result.model_path)
    pred = evaluation.predict(model, evaluation.test_rows(demo_manifest), demo_root,
                              evaluation.evaluation_settings(meta), progress=False)
    assert m_joined["image_auroc"] == pytest.approx(category_mean_auroc(pred, pred.probability), abs=1e-9)
    assert m_local["image_auroc"] == pytest.approx(category_mean_auroc(pred, pred.local_score), abs=1e-9)
    assert m_sem["image_auroc"] == pytest.approx(category_mean_auroc(pred, pred.semantic_score), abs=1e-9)
    assert m_sem["pixel_auroc"] is None and m_local["pixel_auroc"] == pytest.approx(m_joined["pixel_auroc"])
    assert m_joined["scored_with"] == {"overrides": {}, "branches": "dual", "model_branches": "dual"}
    assert "at_threshold" in m_joined
    for m, branch in ((m_local, "local"), (m_sem, "semantic")):
        record = m["scored_with"]
        assert (record["overrides"], record["branches"], record["model_branches"]) == (
            {"model.branches": branch}, branch, "dual")
        assert "at_threshold" not in m and record["at_threshold"].startswith("omitted: the stored threshold")


def test_scoring_overrides_take_effect_and_are_recorded(trained_tiny, demo_root, tmp_path):
    _, result = trained_tiny
    own, blurred, batched = (tmp_path / f"{n}.json" for n in ("own", "blurred", "batched"))
    assert evaluate(result.model_path, demo_root, own) == 0
    assert evaluate(result.model_path, demo_root, blurred, "scoring.gaussian_sigma=6", "evaluate.aupro_fpr_limit=0.1") == 0
    assert evaluate(result.model_path, demo_root, batched, "scoring.batch_size=5") == 0
    m_own, m_blur, m_batch = (json.loads(p.read_text()) for p in (own, blurred, batched))
    assert m_blur["pixel_auroc"] != pytest.approx(m_own["pixel_auroc"], abs=1e-6)  # the wider blur was applied
    assert m_blur["pixel_aupro"] != pytest.approx(m_own["pixel_aupro"], abs=1e-6)
    assert m_blur["scored_with"]["overrides"] == {"scoring.gaussian_sigma": 6, "evaluate.aupro_fpr_limit": 0.1}
    assert "at_threshold" not in m_blur and "scoring.gaussian_sigma=6" in m_blur["scored_with"]["at_threshold"]
    # a batch size changes no score: the threshold still applies and the metrics are the model's own
    assert m_batch["scored_with"] == {"overrides": {"scoring.batch_size": 5}, "branches": "dual",
                                      "model_branches": "dual"}
    assert m_batch["at_threshold"] == pytest.approx(m_own["at_threshold"])
    assert m_batch["image_auroc"] == pytest.approx(m_own["image_auroc"], abs=1e-6)
