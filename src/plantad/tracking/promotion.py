"""Fair promotion: the current champion is re-scored on the candidate's test set, with the one
evaluation path, so that `promote: auto` compares two models on the same images."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from plantad.config import Settings
from plantad.tracking.registry import ChampionScorer, finite

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The metric names the register stage logs to MLflow (`image_auroc`, `<category>/...`)."""
    import time

    from plantad.tracking.experiment import metric_entries

    return {m.key: m.value for m in metric_entries(metrics, int(time.time() * 1000))}


def rescore_version(client: MlflowClient, tracking_uri: str, version: ModelVersion, manifest: pd.DataFrame,
                    data_root: Path, params: Settings, metric: str) -> tuple[float | None, str]:
    """(`metric` of `version` evaluated on the manifest's test split, how): the version is loaded
    by number through the Predictor and scored by `evaluate_model` with this run's `evaluate`
    settings, exactly as the evaluate stage scored the candidate."""
    from plantad.evaluation.evaluate import evaluate_model, evaluation_settings
    from plantad.models.checkpoint import ModelLoadError
    from plantad.serving.predictor import Predictor
    from plantad.tracking.model_source import ModelSourceError

    uri = f"models:/{version.name}/{version.version}"
    try:
        with tempfile.TemporaryDirectory(prefix="plantad-champion-") as tmp:  # loaded into memory, then gone
            predictor = Predictor.load(uri, tracking_uri, device=params.train.device, cache_dir=Path(tmp),
                                       client=client)
    except (ModelSourceError, ModelLoadError) as exc:
        return None, f"could not be re-scored: {exc}"
    settings = evaluation_settings(predictor.meta, params=params)
    metrics, _ = evaluate_model(predictor.model, manifest, data_root, settings, progress=False)
    value = finite(flat_metrics(metrics).get(metric))
    return value, f"re-scored on the candidate's {int((manifest['split'] == 'test').sum())} test images"


def champion_rescorer(client: MlflowClient, tracking_uri: str, manifest: pd.DataFrame, data_root: Path,
                      params: Settings, metric: str) -> ChampionScorer:
    """The `score_champion` callable that promotion_decision calls with the champion it read."""
    return lambda version: rescore_version(client, tracking_uri, version, manifest, data_root, params, metric)
