"""No shared filesystem: Ray Train's workers get the images and the teacher only from the S3 bucket
(moto), never from the driver's disk, and the trained model is registered in MLflow."""

from __future__ import annotations

import shutil
import uuid

import pytest
from mlflow import MlflowClient

from plantad.config import DemoConfig
from plantad.data.demo import generate_demo
from plantad.data.manifest import scan_dataset
from plantad.data.shards import ShardError, open_shards, read_shard_images, write_shards
from plantad.models.checkpoint import load_model
from plantad.tracking.registry import register_version
from plantad.tracking.s3 import s3_client
from plantad.tracking.teacher_publish import checked_checkpoint, publish_to_s3
from plantad.training.ray_train import run_ray_training
from teacher_files import tiny_teacher_file
from tiny import tiny_settings


@pytest.mark.e2e
def test_workers_train_from_the_bucket_alone_and_the_model_is_registered(
    ray_local, moto_s3, mlflow_server, tmp_path, monkeypatch
):
    run = uuid.uuid4().hex[:8]
    small = DemoConfig(seed=3, image_size=64, n_train=12, n_test_good=2, n_test_defect=1)
    data = generate_demo(tmp_path / "data", small)
    manifest = scan_dataset(data)
    location = f"s3://{moto_s3.bucket}/shards-{run}"
    write_shards(manifest, data, location, moto_s3, 40_000)
    teacher, _ = tiny_teacher_file(tmp_path / "teacher.safetensors")
    digest = checked_checkpoint(teacher)
    weights = publish_to_s3(teacher, f"s3://{moto_s3.bucket}/teachers-{run}", moto_s3, digest)
    shutil.rmtree(data)  # no copy of the data and none of the teacher is left on this machine
    teacher.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings = tiny_settings(
        f"model.teacher.weights={weights}", f"model.teacher.sha256={digest}",
        f"model.teacher.cache_dir={tmp_path / 'node-cache'}", f"s3.endpoint_url={moto_s3.endpoint_url}",
        f"ray.storage_path=s3://{moto_s3.bucket}/ray-{run}", "ray.num_workers=2", "ray.cpus_per_worker=0.5",
        "ray.steps_per_epoch=2", "ray.max_failures=0", "train.steps=6",
    )
    shards = open_shards(location, manifest, moto_s3)
    assert len(shards.parts) > 1
    result = run_ray_training(settings, manifest, shards, tmp_path / "model")
    assert result.steps == 6
    model, meta = load_model(result.model_path)
    assert meta["teacher"]["weights"] == weights and meta["teacher"]["sha256"] == digest
    assert meta["training"]["shards"] == shards.folder and meta["training"]["num_workers"] == 2
    assert [p.name for p in (tmp_path / "node-cache" / digest).iterdir()] == ["teacher.safetensors"]
    assert not list(elsewhere.iterdir())  # nothing was written into the working directory
    # Ray Train's checkpoints are in the bucket: 3 written (every 2 steps), the newest 2 kept
    # (ray.keep_checkpoints), and the saved model names the one it came from
    listing = s3_client(moto_s3).list_objects_v2(Bucket=moto_s3.bucket, Prefix=f"ray-{run}/")
    states = sorted(o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith("/train_state.pt"))
    assert len(states) == 2, states
    newest = meta["training"]["ray_checkpoint"]
    assert newest.startswith(f"{moto_s3.bucket}/ray-{run}/") and f"{newest.split('/', 1)[1]}/train_state.pt" in states

    import mlflow

    from plantad.tracking.pyfunc import log_pyfunc_model

    test_path = manifest.loc[manifest["split"] == "test", "path"].iloc[0]
    example = read_shard_images(shards, moto_s3, [test_path])[test_path]
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"no-shared-fs-{run}")
    mlflow.set_tracking_uri(mlflow_server)
    try:
        with mlflow.start_run(experiment_id=experiment) as active:
            info = log_pyfunc_model(result.model_path.parent, example)
    finally:
        mlflow.set_tracking_uri(None)
    version = register_version(client, f"no-shared-fs-{run}", active.info.run_id, "model",
                               tags={"teacher_sha256": digest}, model_id=info.model_id)
    assert version.status == "READY" and "challenger" in version.aliases


def test_training_refuses_shards_of_another_data_version_before_starting(demo_manifest, demo_shards, tmp_path):
    other = demo_manifest.iloc[1:]
    with pytest.raises(ShardError, match=rf"holds manifest fingerprint {demo_shards.fingerprint}, but the manifest's"):
        run_ray_training(tiny_settings("train.steps=2"), other, demo_shards, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_the_ray_cluster_manifest_mounts_no_volume():
    """Data and weights come from S3 (data.shards.location, model.teacher.weights), never from a mount."""
    from pathlib import Path

    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "raycluster.yaml").read_text())

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    found = set(keys(spec))
    assert "containers" in found and not found & {"volumes", "volumeMounts", "hostPath", "persistentVolumeClaim"}
