"""`dvc repro` on an image-level dataset (plain layout, no masks): every stage runs, the Ray workers
read the shards that `prepare` wrote to S3, metrics.json holds null pixel metrics, and the MLflow run
logs image metrics only."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_project import DATA, STAGES, TINY_PARAMS, create_project, merged

from plantad.config import S3Config
from plantad.data.manifest import manifest_fingerprint, read_manifest


@pytest.mark.e2e
def test_dvc_repro_on_a_maskless_semantic_dataset(pipeline_env: dict[str, str], mlflow_server: str,
                                                  moto_s3: S3Config, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    location = f"s3://{moto_s3.bucket}/e2e-shards-{suffix}"
    params = merged(TINY_PARAMS, {
        "data": {"source": "path", "root": DATA, "shards": {"location": location, "max_bytes": 50_000}},
        "s3": {"endpoint_url": moto_s3.endpoint_url, "bucket": moto_s3.bucket},
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
    record = json.loads((project.root / "outputs" / "shards.json").read_text())
    manifest = read_manifest(project.root / "outputs" / "manifest.parquet")
    assert record["location"] == location and record["fingerprint"] == manifest_fingerprint(manifest)
    assert len(record["parts"]) > 1 and not (project.root / "outputs" / "shards").exists()
    model_meta = json.loads((project.root / "outputs" / "model" / "model.json").read_text())
    assert model_meta["training"]["shards"] == f"{location}/{record['fingerprint']}"

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
