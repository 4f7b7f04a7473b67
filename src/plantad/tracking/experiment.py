"""One MLflow run per training: params and lineage at the start, per-step losses from the
training worker, evaluation metrics, plots, the GX result and the pyfunc model at the end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from plantad.config import MlflowConfig, Settings, settings_to_dict
from plantad.tracking.store import ensure_experiment


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def start_training_run(client: MlflowClient, cfg: MlflowConfig, settings: Settings, tags: dict[str, str]) -> str:
    """Create the run with every setting as a param and the lineage tags; returns the run id."""
    experiment_id = ensure_experiment(client, cfg)
    run = client.create_run(experiment_id, tags={"plantad.stage": "train", **tags})
    params = [Param(k, str(v)[:6000]) for k, v in flatten(settings_to_dict(settings)).items()]
    for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


def metric_entries(metrics: dict[str, Any], timestamp_ms: int) -> list[Metric]:
    """Mean metrics under their names, per-category ones as `<category>/<metric>`; NaN skipped."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for cat, values in metrics.get("per_category", {}).items():
        flat.update({f"{cat}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    flat.update({f"at_threshold/{k}": v for k, v in metrics.get("at_threshold", {}).items()})
    for branch, values in (metrics.get("branches") or {}).items():  # S_D, S_E and joined image AUROC
        if values:
            flat[f"branch_{branch}/image_auroc"] = values["image_auroc"]
            flat.update({f"{cat}/branch_{branch}/image_auroc": v for cat, v in values["per_category"].items()})
    flat.update({f"false_alarm/{k}": v for k, v in (metrics.get("false_alarm") or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return [Metric(k, float(v), timestamp_ms, 0) for k, v in flat.items() if v is not None and math.isfinite(float(v))]


def log_evaluation(client: MlflowClient, run_id: str, metrics: dict[str, Any], plots_dir: Path, validation_dir: Path) -> None:
    import time

    client.log_batch(run_id, metrics=metric_entries(metrics, int(time.time() * 1000)))
    client.log_artifacts(run_id, str(plots_dir), "plots")
    client.log_artifacts(run_id, str(validation_dir), "validation")


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
