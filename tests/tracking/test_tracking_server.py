"""An MLflow run through the tracking server: params, metric, artifact bytes in the moto bucket."""

from __future__ import annotations

from pathlib import Path

import pytest
from infra.fixtures import MLFLOW_PREFIX
from mlflow import MlflowClient

from plantad.config import MlflowConfig, S3Config
from plantad.tracking.s3 import s3_client
from plantad.tracking.store import ensure_experiment


@pytest.mark.e2e
def test_run_logs_params_metrics_and_an_artifact_into_the_bucket(
    mlflow_server: str, moto_s3: S3Config, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server)
    experiment_id = ensure_experiment(client, MlflowConfig(tracking_uri=mlflow_server, experiment="server-run"))
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "train.lr", "0.002")
    for step, value in enumerate([0.9, 0.5, 0.25]):
        client.log_metric(run_id, "train/loss", value, step=step)
    report = tmp_path / "report.json"
    report.write_bytes(b'{"image_auroc": 0.97}\n')
    client.log_artifact(run_id, str(report), "evaluation")
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.002"}
    assert run.data.metrics == {"train/loss": 0.25}
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.9, 0.5, 0.25]
    assert run.info.status == "FINISHED"

    key = f"{MLFLOW_PREFIX}/{experiment_id}/{run_id}/artifacts/evaluation/report.json"
    s3 = s3_client(moto_s3)
    # this run's folder only: the session's bucket holds thousands of artifacts, a listing page 1000
    listing = s3.list_objects_v2(Bucket=moto_s3.bucket, Prefix=f"{MLFLOW_PREFIX}/{experiment_id}/{run_id}/")
    keys = [o["Key"] for o in listing["Contents"]]
    assert key in keys
    assert s3.get_object(Bucket=moto_s3.bucket, Key=key)["Body"].read() == report.read_bytes()
    downloaded = client.download_artifacts(run_id, "evaluation/report.json", str(tmp_path / "back"))
    assert Path(downloaded).read_bytes() == report.read_bytes()
