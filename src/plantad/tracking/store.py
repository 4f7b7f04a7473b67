"""Where MLflow runs and models live: a tracking server, or the embedded store in the project.

The embedded store is `<project>/mlflow/mlflow.db` (SQLite) with artifacts in
`<project>/mlflow/artifacts/<experiment>`; `mlflow/ui.sh` serves the UI over it. Nothing here touches the
global MLflow state (no `mlflow.set_tracking_uri`): callers pass the URI to `MlflowClient`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from plantad.config import MlflowConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

EMBEDDED_DIR = "mlflow"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "artifacts"


class TrackingStoreError(RuntimeError):
    """An experiment that cannot be used as configured."""


def embedded_store_uri(project_root: Path) -> str:
    """sqlite:////abs/project/mlflow/mlflow.db (four slashes: an absolute path)."""
    return f"sqlite:///{(Path(project_root) / EMBEDDED_DIR / EMBEDDED_DB).resolve()}"


def embedded_artifact_root(project_root: Path) -> str:
    """file:///abs/project/mlflow/artifacts."""
    return (Path(project_root) / EMBEDDED_DIR / EMBEDDED_ARTIFACTS).resolve().as_uri()


def resolve_tracking_uri(cfg: MlflowConfig, project_root: Path) -> str:
    """mlflow.tracking_uri, else env MLFLOW_TRACKING_URI, else the project's embedded store."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        return env_uri
    return embedded_store_uri(project_root)


def check_tracking_server(uri: str, wait_s: float = 10.0) -> None:
    """Fail in seconds on an unreachable server: MLflow's own retries take about 4 minutes.

    Any HTTP answer from `<uri>/health` counts as reachable (auth is MLflow's business); only
    stores served over http(s) are checked.
    """
    import time
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=min(5.0, wait_s)):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
        if time.monotonic() >= deadline:
            raise TrackingStoreError(
                f"MLflow tracking server {uri} is not reachable ({reason}): start it, or fix "
                "mlflow.tracking_uri / MLFLOW_TRACKING_URI (unset both for the embedded store in mlflow/)"
            )
        time.sleep(1.0)


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a SQLite store: `<db folder>/artifacts/<experiment>` (MLflow's own: ./mlruns in the cwd).

    Runs then land in `<that>/<run_id>/artifacts`. Servers and other stores choose their own (None).
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = Path(tracking_uri[len(prefix):].split("?", 1)[0])
    if not db.name or str(db) == ":memory:":
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]", "_", experiment).strip(".") or "experiment"
    return (db.resolve().parent / EMBEDDED_ARTIFACTS / folder).as_uri()


def ensure_experiment(client: MlflowClient, cfg: MlflowConfig) -> str:
    """Id of experiment `mlflow.experiment`, created when missing (at mlflow.artifact_location if set)."""
    from mlflow.exceptions import MlflowException

    existing = client.get_experiment_by_name(cfg.experiment)
    if existing is None:
        location = cfg.artifact_location or default_artifact_location(client.tracking_uri, cfg.experiment)
        try:
            experiment_id = client.create_experiment(cfg.experiment, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a race with another process
                raise
        else:
            log.info("created MLflow experiment '%s' (id %s) with artifacts at %s",
                     cfg.experiment, experiment_id, location or "the server's default")
            return experiment_id
        existing = client.get_experiment_by_name(cfg.experiment)
        if existing is None:
            raise TrackingStoreError(f"MLflow experiment '{cfg.experiment}' exists but cannot be read")
    if existing.lifecycle_stage == "deleted":
        raise TrackingStoreError(
            f"MLflow experiment '{cfg.experiment}' is deleted: restore it in the UI "
            "(or `mlflow experiments restore`), or set mlflow.experiment to a new name"
        )
    if cfg.artifact_location and existing.artifact_location.rstrip("/") != cfg.artifact_location.rstrip("/"):
        log.warning(
            "MLflow experiment '%s' already stores artifacts at %s, not at mlflow.artifact_location=%s "
            "(it applies to new experiments only; use a new mlflow.experiment name to move)",
            cfg.experiment, existing.artifact_location, cfg.artifact_location,
        )
    return existing.experiment_id
