"""The registered MLflow model scores encoded images exactly like the one scoring function."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from plantad.data.images import ImageTransform, decode_image_bytes
from plantad.models.checkpoint import load_model
from plantad.scoring import score_batch
from plantad.tracking.pyfunc import log_pyfunc_model
from plantad.tracking.registry import register_version


@pytest.fixture
def registered(tmp_path, trained_tiny, demo_root, demo_manifest, monkeypatch):
    settings, result = trained_tiny
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("pyfunc-test", artifact_location=str(tmp_path / "artifacts"))
    test_rows = demo_manifest[demo_manifest["split"] == "test"].head(6)
    pngs = [(demo_root / p).read_bytes() for p in test_rows["path"]]
    with mlflow.start_run(experiment_id=exp) as run:
        info = log_pyfunc_model(result.model_path.parent, pngs[0])
    version = register_version(client, "plantad-test", run.info.run_id, "model", model_id=info.model_id)
    yield settings, result, pngs, version
    mlflow.set_tracking_uri(None)


def test_registered_model_scores_like_score_batch(registered):
    settings, result, pngs, version = registered
    assert version.aliases == ["challenger"]
    served = mlflow.pyfunc.load_model("models:/plantad-test@challenger")
    out = served.predict(pd.DataFrame({"image": pngs}))
    model, _ = load_model(result.model_path)
    transform = ImageTransform(settings.data.image_size)
    images = torch.stack([transform(decode_image_bytes(b)) for b in pngs])
    direct = score_batch(model, images, settings.scoring)
    np.testing.assert_allclose(out["probability"].to_numpy(), direct.probability.numpy(), rtol=1e-5, atol=1e-6)
    assert (out["is_anomalous"].to_numpy() == direct.is_anomalous.numpy()).all()
    assert np.allclose(out["threshold"], float(model.noisy_or.threshold))


def test_threshold_param_and_bad_input(registered):
    _, _, pngs, _ = registered
    served = mlflow.pyfunc.load_model("models:/plantad-test@challenger")
    frame = pd.DataFrame({"image": pngs})
    assert served.predict(frame, params={"threshold": 0.0})["is_anomalous"].all()
    assert not served.predict(frame, params={"threshold": 1.5})["is_anomalous"].any()
    with pytest.raises(Exception, match="cannot decode image row 0"):
        served.predict(pd.DataFrame({"image": [b"not an image"]}))
