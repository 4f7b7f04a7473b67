"""Ray Train on the session's local cluster (workers read the dataset's shards): clear errors before
any run. Recovery from a lost worker, with checkpoints in S3, is tested on a cluster of three nodes
(tests/cluster/test_cluster_nodes.py); workers killed mid-checkpoint in tests/pipeline/test_chaos.py."""

import os
import time
import uuid

import pytest

from plantad.config import S3Config
from plantad.data.shards import write_shards
from plantad.training.ray_train import check_ray_address, run_ray_training
from tiny import tiny_settings


def _settings(moto_s3, prefix: str, *extra: str):
    return tiny_settings(
        "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.steps_per_epoch=5", "ray.max_failures=2",
        f"ray.storage_path=s3://{moto_s3.bucket}/{prefix}", f"s3.endpoint_url={moto_s3.endpoint_url}",
        f"s3.bucket={moto_s3.bucket}", *extra,
    )


@pytest.mark.e2e
def test_a_shard_smaller_than_the_batch_is_a_clear_error(moto_s3, demo_root, demo_manifest, tmp_path):
    few = demo_manifest[(demo_manifest["split"] == "train")].groupby("category").head(4)
    shards = write_shards(few, demo_root, str(tmp_path / "shards"), S3Config(), 256_000_000)
    settings = _settings(moto_s3, f"ray-{uuid.uuid4().hex[:8]}", "train.steps=5", "train.batch_size=16",
                         "ray.max_failures=0", "data.holdout_fraction=0.25")
    with pytest.raises(ValueError, match=r"give each worker \d+, fewer than 8 images .*train.batch_size=16"):
        run_ray_training(settings, few, shards, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_an_unreachable_cluster_address_fails_in_seconds_and_names_its_source():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"Ray cluster at 127.0.0.1:{port} \(from RAY_ADDRESS\) is not reachable"):
        check_ray_address(f"127.0.0.1:{port}", "RAY_ADDRESS")
    with pytest.raises(ConnectionError, match="from ray.address"):
        check_ray_address(f"ray://127.0.0.1:{port}", "ray.address")
    assert time.monotonic() - started < 20  # ray.init waits for minutes
    with pytest.raises(ValueError, match="is not host:port"):
        check_ray_address("head:http", "ray.address")
    check_ray_address("auto", "RAY_ADDRESS")


@pytest.mark.e2e
def test_the_session_cluster_address_is_reachable(ray_local):
    import ray

    check_ray_address(ray.get_runtime_context().gcs_address, "RAY_ADDRESS")


def test_train_stage_refuses_an_unreachable_cluster_before_any_run(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    proc = subprocess.run(
        [sys.executable, str(repo / "pipelines" / "train.py"), "--params", str(repo / "params.yaml"),
         "--data", "data", "--manifest", "m.parquet", "--shards", "s.json", "--validation", "v.json",
         "--out", str(tmp_path / "model")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: Ray cluster at {address} (from RAY_ADDRESS) is not reachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "model").exists() and not db.exists()  # no MLflow run was started
