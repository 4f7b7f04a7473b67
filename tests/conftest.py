"""Shared fixtures: tiny models and settings so the suite runs on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

from plantad.cluster import LOOPBACK_ENV
from plantad.config import Settings
from tiny import tiny_settings

# real S3 (moto server on 127.0.0.1), MLflow server, git+DVC repo and one Ray cluster per session
from infra.fixtures import mlflow_server, moto_s3, ray_local, tmp_git_dvc_repo  # noqa: F401

# the session's Ray cluster and every stage that joins it run on 127.0.0.1 only (see plantad.cluster);
# set before any test module imports ray, which reads it once
os.environ.update(LOOPBACK_ENV)
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture
def tiny() -> Settings:
    return tiny_settings()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small procedural demo dataset (3 categories, 64 px), generated once per session."""
    from plantad.config import DemoConfig
    from plantad.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo(root, DemoConfig(seed=0, image_size=64, n_train=24, n_test_good=6, n_test_defect=3))
    return root


@pytest.fixture(scope="session")
def demo_manifest(demo_root):
    from plantad.data.manifest import scan_dataset

    return scan_dataset(demo_root)


@pytest.fixture(scope="session")
def demo_shards(demo_root, demo_manifest, tmp_path_factory):
    """The demo dataset as Parquet shards in a local folder (what Ray Train workers read)."""
    from plantad.config import S3Config
    from plantad.data.shards import write_shards

    return write_shards(demo_manifest, demo_root, str(tmp_path_factory.mktemp("shards")), S3Config(), 256_000_000)


@pytest.fixture(scope="session")
def trained_tiny(demo_root, demo_manifest, tmp_path_factory):
    """One tiny dual model trained on the demo data, shared by the tests that need a trained model."""
    from plantad.training.trainer import train_model

    settings = tiny_settings("train.steps=150", "train.hard_mining.ramp_steps=75")
    out = tmp_path_factory.mktemp("model")
    result = train_model(settings, demo_manifest, demo_root, out, progress=False)
    return settings, result
