"""Fixtures for the end-to-end pipeline tests: the stages' environment and one good baseline run.

`dvc repro` runs as a subprocess, as a user runs it; its train stage joins the session's Ray
cluster (RAY_ADDRESS + the session's auth token) and every stage tracks to the session's MLflow
server (SQLite + artifacts proxied to moto's S3).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pipeline_project import DATA, STAGES, TINY_PARAMS, Project, copy_project, create_project, joined_stage_env, merged


@pytest.fixture(scope="session")
def pipeline_env(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Stage environment joined to the session's Ray cluster (no cluster of its own per stage)."""
    return joined_stage_env(tmp_path_factory.mktemp("pipeline-home"))


@pytest.fixture(scope="session")
def registry_names() -> dict[str, str]:
    """Experiment and registered model of this session's pipeline runs (the server is shared)."""
    suffix = uuid.uuid4().hex[:8]
    return {"experiment": f"e2e-pipeline-{suffix}", "registered_model": f"e2e-plantad-{suffix}"}


@pytest.fixture(scope="session")
def baseline(
    pipeline_env: dict[str, str], mlflow_server: str, registry_names: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Project:
    """A project where `dvc repro` ran once, green, on a user dataset: read it, never change it.

    The user's data is `plantad demo-data data/plant --seed 1`, tracked with `dvc add`; params
    select it (data.source: path). Tests work on `copy_project(baseline, ...)`.
    """
    params = merged(TINY_PARAMS, {
        "data": {"source": "path", "root": DATA},
        "mlflow": {"tracking_uri": mlflow_server, "promote": "manual", **registry_names},
    })
    project = create_project(tmp_path_factory.mktemp("baseline") / "project", pipeline_env, params)
    project.run("plantad", "demo-data", DATA, "--seed", "1")
    project.run("dvc", "add", DATA)
    project.commit("track the plant dataset")
    repro = project.repro()
    if repro.ran != STAGES:
        pytest.fail(f"the first `dvc repro` ran {repro.ran}, not every stage\n{repro.tail()}")
    if project.status():
        pytest.fail(f"the baseline is not up to date after `dvc repro`: {project.status()}\n{repro.tail()}")
    project.commit("baseline run")
    project.stage_seconds = repro.durations()  # where tests/pipeline/test_chaos.py aims its kills
    return project


@pytest.fixture
def project(baseline: Project, tmp_path: Path) -> Project:
    """This test's own copy of the baseline project (same MLflow server and registry)."""
    return copy_project(baseline, tmp_path / "project")
