"""Tracking store resolution, experiments, and mlflow/ui.sh over the embedded store."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from infra.fixtures import free_port, start_mlflow_server, stop_process_group
from mlflow import MlflowClient

from plantad.config import MlflowConfig, S3Config
from plantad.tracking.s3 import s3_client, storage_env
from plantad.tracking.store import (
    TrackingStoreError,
    check_tracking_server,
    default_artifact_location,
    embedded_store_uri,
    ensure_experiment,
    resolve_tracking_uri,
)

REPO = Path(__file__).resolve().parents[2]


def test_explicit_uri_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri(MlflowConfig(tracking_uri="http://explicit:5000"), tmp_path) == "http://explicit:5000"


def test_env_uri_when_not_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri(MlflowConfig(), tmp_path) == "http://from-env:5000"


def test_embedded_store_is_an_absolute_sqlite_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(MlflowConfig(), Path("."))
    assert uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db" and uri.startswith("sqlite:////")
    assert not (tmp_path / "mlflow").exists()  # resolving creates nothing
    assert default_artifact_location(uri, "plantad") == (tmp_path / "mlflow" / "artifacts" / "plantad").as_uri()
    assert default_artifact_location(uri, "a b/c") == (tmp_path / "mlflow" / "artifacts" / "a_b_c").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000", "plantad") is None


@pytest.mark.e2e
def test_experiment_with_s3_artifact_location(
    mlflow_server: str, moto_s3: S3Config, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog
) -> None:
    """A new experiment at s3://bucket/custom: clients then write to S3 themselves (storage_env)."""
    client = MlflowClient(mlflow_server)
    cfg = MlflowConfig(experiment="s3-located", artifact_location=f"s3://{moto_s3.bucket}/custom")
    experiment_id = ensure_experiment(client, cfg)
    assert ensure_experiment(client, cfg) == experiment_id
    assert client.get_experiment(experiment_id).artifact_location == cfg.artifact_location

    for key, value in storage_env(moto_s3).items():
        monkeypatch.setenv(key, value)
    run_id = client.create_run(experiment_id).info.run_id
    (tmp_path / "note.txt").write_text("direct to S3")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    body = s3_client(moto_s3).get_object(Bucket=moto_s3.bucket, Key=f"custom/{run_id}/artifacts/note.txt")["Body"]
    assert body.read() == b"direct to S3"

    moved = cfg.model_copy(update={"artifact_location": f"s3://{moto_s3.bucket}/elsewhere"})
    with caplog.at_level(logging.WARNING, logger="plantad.tracking.store"):
        assert ensure_experiment(client, moved) == experiment_id
    assert "applies to new experiments only" in caplog.text


@pytest.mark.e2e
def test_deleted_experiment_is_an_error(mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    cfg = MlflowConfig(experiment="deleted-one")
    client.delete_experiment(ensure_experiment(client, cfg))
    with pytest.raises(TrackingStoreError, match="'deleted-one' is deleted"):
        ensure_experiment(client, cfg)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.e2e
def test_embedded_store_and_ui_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Log to <project>/mlflow/mlflow.db, then mlflow/ui.sh serves that run and its artifact."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    (project / "mlflow").mkdir(parents=True)
    shutil.copy(REPO / "mlflow" / "ui.sh", project / "mlflow" / "ui.sh")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")  # ui.sh reads mlflow.ui_host there
    uri = resolve_tracking_uri(MlflowConfig(), project)
    assert uri == embedded_store_uri(project)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, MlflowConfig(experiment="embedded"))
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "image_auroc", 0.75)
    (tmp_path / "plot.txt").write_text("roc")
    client.log_artifact(run_id, str(tmp_path / "plot.txt"), "plots")
    stored = project / "mlflow" / "artifacts" / "embedded" / run_id / "artifacts" / "plots" / "plot.txt"
    assert stored.read_text() == "roc"

    port = free_port()
    env = {**os.environ, "PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # ui.sh's own default applies
    proc = start_mlflow_server(["bash", str(project / "mlflow" / "ui.sh")], env, tmp_path / "ui.log", port)
    try:
        base = f"http://127.0.0.1:{port}"
        run = _get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        assert run["data"]["metrics"][0]["value"] == 0.75
        query = urllib.parse.urlencode({"run_uuid": run_id, "path": "plots/plot.txt"})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=10) as r:
            assert r.read() == b"roc"
    finally:
        stop_process_group(proc)


def test_unreachable_server_fails_in_seconds_and_names_it() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingStoreError, match=rf"MLflow tracking server {uri} is not reachable"):
        check_tracking_server(uri, wait_s=2.0)
    assert time.monotonic() - started < 30  # MLflow's own client retries for about 4 minutes
    check_tracking_server("sqlite:////nowhere/mlflow.db")  # local stores are not servers


def test_train_stage_refuses_an_unreachable_server_before_training(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), "--params", str(REPO / "params.yaml"),
         "--data", str(tmp_path / "data"), "--manifest", str(tmp_path / "manifest.parquet"),
         "--shards", str(tmp_path / "shards"), "--validation", str(tmp_path / "validation.json"), "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: MLflow tracking server {uri} is not reachable" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_live_server_is_reachable(mlflow_server: str) -> None:
    check_tracking_server(mlflow_server, wait_s=5.0)
