"""A CNN-teacher method (SNL) trains under Ray Train DDP (2 workers), saves, loads, evaluates and
scores through the MLflow pyfunc model with the scores of the one scoring function. The ViT
methods' Ray DDP runs are the pipeline's train stage and tests/training/test_no_shared_fs.py.
DDP's failure mode per method (a parameter that runs without a gradient) is checked for all four
methods in process: tests/models/test_snl.py::test_every_parameter_that_runs_gets_a_gradient..."""

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from plantad.data.images import ImageTransform, decode_image_bytes
from plantad.evaluation.evaluate import evaluate_model
from plantad.models.checkpoint import load_model
from plantad.scoring import score_batch
from plantad.tracking.pyfunc import log_pyfunc_model
from plantad.training.ray_train import run_ray_training
from tiny import tiny_method_settings


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["snl_rd"])
def test_method_trains_under_ray_ddp_and_scores_alike_everywhere(method, ray_local, demo_root, demo_manifest,
                                                                 demo_shards, tmp_path):
    settings = tiny_method_settings(
        method, "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.steps_per_epoch=3", "ray.max_failures=0",
        "train.steps=6", f"ray.storage_path={tmp_path / 'ray'}",
    )
    # DDP without find_unused_parameters: a parameter that runs without a gradient fails step 2
    result = run_ray_training(settings, demo_manifest, demo_shards, tmp_path / "model")
    assert result.steps == 6
    assert all(math.isfinite(r["loss"]) for r in result.history if "loss" in r)

    model, meta = load_model(result.model_path)
    assert meta["method"] == method and meta["model"] == model.describe()
    assert meta["training"]["num_workers"] == 2 and model.noisy_or.calibrated
    metrics, _ = evaluate_model(model, demo_manifest, demo_root, settings, progress=False)
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0

    test_rows = demo_manifest[demo_manifest["split"] == "test"].head(4)
    pngs = [(demo_root / p).read_bytes() for p in test_rows["path"]]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment(f"methods-{method}", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            info = log_pyfunc_model(result.model_path.parent, pngs[0])
        served = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": pngs}))
    finally:
        mlflow.set_tracking_uri(None)
    transform = ImageTransform(settings.data.image_size)
    direct = score_batch(model, torch.stack([transform(decode_image_bytes(b)) for b in pngs]), settings.scoring)
    np.testing.assert_allclose(served["probability"].to_numpy(), direct.probability.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["local_score"].to_numpy(), direct.local_score.numpy(), rtol=1e-5, atol=1e-6)
    assert (served["is_anomalous"].to_numpy() == direct.is_anomalous.numpy()).all()
