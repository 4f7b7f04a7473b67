"""metrics.json, `plantad metrics` and the MLflow metrics report S_D alone, S_E alone and the joined
score, and the false-alarm rate on normal test images beside the one the threshold promised."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plantad.cli import main
from plantad.evaluation import evaluate as evaluation
from plantad.evaluation.metrics import clopper_pearson, image_auroc
from plantad.models.checkpoint import load_model
from plantad.tracking.experiment import metric_entries


def per_category_auroc(pred, scores) -> dict[str, float]:
    cats = pred.rows["category"].to_numpy()
    return {c: image_auroc(pred.labels[cats == c], scores[cats == c]) for c in np.unique(cats)}


def test_evaluate_reports_each_branch_and_the_false_alarm_rate(trained_tiny, demo_root, demo_manifest, tmp_path,
                                                               capsys):
    _, result = trained_tiny
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--model", str(result.model_path), "--data", str(demo_root), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    model, meta = load_model(result.model_path)
    pred = evaluation.predict(model, evaluation.test_rows(demo_manifest), demo_root,
                              evaluation.evaluation_settings(meta), progress=False)
    for name, scores in (("local", pred.local_score), ("semantic", pred.semantic_score), ("joined", pred.probability)):
        expected = per_category_auroc(pred, scores)
        assert m["branches"][name]["per_category"] == pytest.approx(expected, abs=1e-9)
        assert m["branches"][name]["image_auroc"] == pytest.approx(np.mean(list(expected.values())), abs=1e-9)
    assert m["branches"]["joined"]["image_auroc"] == pytest.approx(m["image_auroc"], abs=1e-12)

    fa, normal = m["false_alarm"], pred.labels == 0
    flagged = int((pred.is_anomalous & normal).sum())
    assert (fa["false_alarms"], fa["normal_images"]) == (flagged, int(normal.sum()))
    assert fa["achieved"] == pytest.approx(flagged / normal.sum())
    assert (fa["ci_low"], fa["ci_high"]) == pytest.approx(clopper_pearson(flagged, int(normal.sum())))
    assert fa["ci_low"] <= fa["achieved"] <= fa["ci_high"] and fa["ci_method"].startswith("Clopper-Pearson")
    stored = meta["calibration"]["false_alarm"]
    n = stored["threshold_images"]  # every second held-out image sets the threshold
    assert fa["threshold_images"] == n == (int(meta["training"]["n_holdout"]) + 1) // 2
    assert fa["requested"] == pytest.approx(0.01)
    assert fa["promised"] == pytest.approx(1 / (n + 1)) and fa["guaranteed"] is False  # n < 99 held out

    shown = capsys.readouterr().out
    assert main(["metrics", str(out)]) == 0
    assert capsys.readouterr().out.strip() == shown.split("metrics written to")[0].strip()
    blocks = shown.split("\n\n")
    rows = {line.split()[0]: line.split()[1:] for line in blocks[1].splitlines()[1:]}
    assert blocks[1].split()[:6] == ["image", "AUROC", "of", "S_D", "S_E", "joined"]
    assert [float(v) for v in rows["mean"]] == [round(m["branches"][b]["image_auroc"], 3)
                                                for b in ("local", "semantic", "joined")]
    assert f"({flagged} of {int(normal.sum())}; Clopper-Pearson" in blocks[2]
    assert fa["promised_90"] == pytest.approx(1 - 0.1 ** (1 / n))  # k = n: the rate is Beta(1, n)
    assert (f"promised at most {1 / (n + 1):.3f} on average over calibrations (at most {1 - 0.1 ** (1 / n):.3f} "
            f"for 90% of them) by the {n} held-out normal images that set the threshold") in blocks[2]
    assert "too few held-out images" in blocks[2]

    logged = {e.key: e.value for e in metric_entries(m, 0)}
    for b in ("local", "semantic", "joined"):
        assert logged[f"branch_{b}/image_auroc"] == pytest.approx(m["branches"][b]["image_auroc"])
        assert logged[f"nut/branch_{b}/image_auroc"] == pytest.approx(m["branches"][b]["per_category"]["nut"])
    assert logged["false_alarm/achieved"] == pytest.approx(fa["achieved"])
    assert logged["false_alarm/promised"] == pytest.approx(fa["promised"])


def test_clopper_pearson_interval():
    assert clopper_pearson(0, 30) == pytest.approx((0.0, 0.11570), abs=1e-4)  # 1 - 0.025 ** (1 / 30)
    low, high = clopper_pearson(3, 30)
    assert low == pytest.approx(0.02112, abs=1e-4) and high == pytest.approx(0.26528, abs=1e-4)
    assert clopper_pearson(30, 30)[1] == 1.0
