"""Fixtures for the end-to-end pipeline tests: the stages' environment and one good baseline run.

`dvc repro` runs as a subprocess, as a user runs it; its train stage joins the session's Ray
cluster (RAY_ADDRESS + the session's auth token) and every stage tracks to the session's MLflow
server (SQLite + artifacts proxied to moto's S3).
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from pipeline_project import DATA, STAGES, TINY_PARAMS, Project, copy_project, create_project, merged


def stage_env(home: Path) -> dict[str, str]:
    """os.environ for the stage subprocesses: venv first on PATH, git/DVC config and caches in tmp."""
    (home / "gitconfig").write_text("[user]\n\tname = plantad e2e\n\temail = e2e@plantad.invalid\n")
    # bytecode on, as for a user: __pycache__ in src/ must not make DVC see changed code
    dropped = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        GX_ANALYTICS_ENABLED="false",
        MLFLOW_ENABLE_ASYNC_LOGGING="false",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


@pytest.fixture(scope="session")
def pipeline_env(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Stage environment joined to the session's Ray cluster (no cluster of its own per stage)."""
    import ray

    env = stage_env(tmp_path_factory.mktemp("pipeline-home"))
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # ray_local put a per-session RAY_AUTH_TOKEN in os.environ and ray.init() set RAY_AUTH_MODE=token;
    # a driver joining the cluster needs both (without them it is refused)
    if env.get("RAY_AUTH_MODE") == "token" and not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        pytest.fail("the session's Ray cluster uses token auth but no RAY_AUTH_TOKEN is set for its drivers")
    return env


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
    return project


@pytest.fixture
def project(baseline: Project, tmp_path: Path) -> Project:
    """This test's own copy of the baseline project (same MLflow server and registry)."""
    return copy_project(baseline, tmp_path / "project")
