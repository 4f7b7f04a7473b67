"""Fixtures: a tiny real dataset on disk and its manifest.

Two categories x (3 normal train, 1 normal test, 1 anomalous test with a mask).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from manifest_files import CATEGORIES, N_TRAIN, SIZE, add_image, to_manifest

from plantad.config import ValidationConfig
from plantad.validation import ValidationReport, validate_manifest


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dataset")


@pytest.fixture(scope="session")
def good_parquet(dataset_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows: list[dict] = []
    for cat in CATEGORIES:
        for i in range(N_TRAIN):
            rows.append(add_image(dataset_root, f"{cat}/train/good/{i:03d}.png", cat, "train"))
        rows.append(add_image(dataset_root, f"{cat}/test/good/000.png", cat, "test"))
        rows.append(
            add_image(dataset_root, f"{cat}/test/scratch/000.png", cat, "test", "scratch", mask_size=SIZE)
        )
    path = tmp_path_factory.mktemp("manifest") / "manifest.parquet"
    to_manifest(rows).to_parquet(path, index=False)
    return path


@pytest.fixture
def good_manifest(good_parquet: Path) -> pd.DataFrame:
    return pd.read_parquet(good_parquet)


@pytest.fixture
def cfg() -> ValidationConfig:
    return ValidationConfig(min_train_normal_per_category=N_TRAIN, example_rows=5)


@pytest.fixture
def validate(cfg: ValidationConfig, tmp_path: Path) -> Callable[..., ValidationReport]:
    """validate_manifest(df) into this test's tmp_path, with the test config plus overrides."""

    def run(df: pd.DataFrame, **overrides: object) -> ValidationReport:
        return validate_manifest(df, cfg.model_copy(update=overrides), tmp_path)

    return run
