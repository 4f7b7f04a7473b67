"""Fixtures for the data tests: a tiny demo dataset generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import SMALL

from plantad.config import DemoConfig
from plantad.data.demo import generate_demo


@pytest.fixture(scope="session")
def small_cfg() -> DemoConfig:
    return SMALL


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset shared read-only by the tests (3 categories, 48 px)."""
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", SMALL)
