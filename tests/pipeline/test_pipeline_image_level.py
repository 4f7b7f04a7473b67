"""`dvc repro` on an image-level dataset (plain layout, no masks): every stage runs, metrics.json
holds null pixel metrics, and the MLflow run logs image metrics only."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_project import DATA, STAGES, TINY_PARAMS, create_project, merged


@pytest.mark.e2e
def test_dvc_repro_on_a_maskless_semantic_dataset(pipeline_env: dict[str, str], mlflow_server: str,
                                                  tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    params = merged(TINY_PARAMS, {
        "data": {"source": "path", "root": DATA},
        "semantic_demo": {"image_size": 64, "categories": ["gear", "star"], "n_train": 12, "n_test_good": 3,
                          "n_test_anomalous": 1},
        "mlflow": {"tracking_uri": mlflow_server, "promote": "manual", "experiment": f"e2e-image-level-{suffix}",
                   "registered_model": f"e2e-image-level-{suffix}"},
    })
    project = create_project(tmp_path / "project", pipeline_env, params)
    project.run("plantad", "demo-data", DATA, "--semantic", "--seed", "1")
    assert not list((project.root / DATA).rglob("ground_truth"))
    project.run("dvc", "add", DATA)
    project.commit("track the image-level dataset")
    repro = project.repro(timeout=900)  # one Ray Train job; generous for a loaded shared CI machine
    assert repro.ran == STAGES, repro.tail()

    metrics = json.loads((project.root / "outputs" / "metrics.json").read_text())
    assert metrics["pixel_auroc"] is None and metrics["pixel_aupro"] is None
    assert {c: v["pixel_auroc"] for c, v in metrics["per_category"].items()} == {"gear": None, "star": None}
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["n_anomalous"] == 2 * 3 * 1
    roc = (project.root / "outputs" / "plots" / "roc.csv").read_text().splitlines()
    assert roc[0] == "fpr,tpr,threshold" and len(roc) > 3

    reg = project.registration()
    assert reg["version"] == "1" and reg["aliases"] == ["challenger", "champion"]  # the first version
    logged = MlflowClient(mlflow_server).get_run(reg["run_id"]).data.metrics
    assert logged["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert not [k for k in logged if "pixel" in k], sorted(logged)
    assert logged["gear/image_auroc"] == pytest.approx(metrics["per_category"]["gear"]["image_auroc"])
