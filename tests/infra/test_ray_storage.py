"""Ray Train (v2, 2 CPU workers) checkpoints to s3://<bucket>/ray via resolve_storage.

The minimal train function stands in for the real one: this proves the storage wiring only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plantad.config import S3Config
from plantad.tracking.s3 import resolve_storage, s3_client

EPOCHS = 3


@pytest.mark.e2e
def test_torch_trainer_checkpoints_land_in_the_bucket(moto_s3: S3Config, ray_local: None) -> None:
    import torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config: dict) -> None:
        """Each epoch: rank 0 reports a checkpoint (one small torch file), rank 1 only metrics.

        Local on purpose: cloudpickle ships it by value. A module-level function in a test file
        is pickled by reference, and Ray workers cannot import test modules (not on their path).
        """
        import tempfile

        import ray.train
        import torch

        rank = ray.train.get_context().get_world_rank()
        for epoch in range(config["epochs"]):
            metrics = {"epoch": epoch, "loss": 1.0 / (epoch + 1)}
            if rank != 0:
                ray.train.report(metrics)
                continue
            with tempfile.TemporaryDirectory() as d:
                torch.save({"epoch": epoch, "weight": torch.full((4,), float(epoch))}, Path(d) / "state.pt")
                (Path(d) / "meta.json").write_text(json.dumps({"epoch": epoch}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    storage_path, filesystem = resolve_storage(f"s3://{moto_s3.bucket}/ray", moto_s3)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"epochs": EPOCHS},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(name="storage-wiring", storage_path=storage_path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()

    assert result.error is None
    assert result.metrics["epoch"] == EPOCHS - 1
    assert result.checkpoint is not None
    assert result.checkpoint.path.startswith(f"{moto_s3.bucket}/ray/storage-wiring/checkpoint_")
    listed = s3_client(moto_s3).list_objects_v2(Bucket=moto_s3.bucket, Prefix="ray/storage-wiring/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    states = sorted(k for k in keys if k.endswith("/state.pt"))
    assert len(states) == 2  # num_to_keep=2 deleted the first epoch's checkpoint from the bucket
    last_key = result.checkpoint.path.split("/", 1)[1] + "/state.pt"
    assert last_key in states
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", weights_only=True)
        assert json.loads((Path(d) / "meta.json").read_text()) == {"epoch": EPOCHS - 1}
    assert state["epoch"] == EPOCHS - 1
    assert torch.equal(state["weight"], torch.full((4,), float(EPOCHS - 1)))
