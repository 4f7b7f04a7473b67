"""Score a manifest's test split with the one scoring function and compute the metrics."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from plantad.config import Settings, apply_overrides, settings_from_dict, settings_to_dict
from plantad.data.dataset import ManifestDataset, categories_with_masks
from plantad.evaluation.metrics import compute_metrics, false_alarm_report
from plantad.evaluation.overrides import checked_overrides, scored_with
from plantad.scoring import score_batch


THRESHOLD_KEYS = ("at_threshold", "false_alarm")  # valid only for the scores the stored threshold was fitted on


@dataclass
class Predictions:
    rows: pd.DataFrame  # the scored manifest rows, in order
    labels: np.ndarray  # (N,) int
    probability: np.ndarray  # (N,) Noisy-OR probability (the image score)
    local_score: np.ndarray | None
    semantic_score: np.ndarray | None
    is_anomalous: np.ndarray  # (N,) bool at the model's threshold
    maps: np.ndarray | None  # (N, S, S) float32; None for a model without a local branch
    masks: np.ndarray  # (N, S, S) uint8; all zero on rows of categories without masks
    pixel_categories: set[str]  # categories whose masks are real (pixel metrics exist)


def evaluation_settings(model_meta: dict[str, Any], params: Settings | None = None, overrides: list[str] = ()) -> Settings:
    """A saved model's own settings (architecture, scoring), with this run's `evaluate` section,
    scoring batch size and device from `params` when given, then explicit `--set` overrides: only
    those that can take effect on a saved model (evaluation/overrides.py); the others are refused."""
    checked_overrides(list(overrides), model_meta["settings"])
    raw = copy.deepcopy(model_meta["settings"])
    if params is not None:
        current = settings_to_dict(params)
        raw["evaluate"] = current["evaluate"]
        raw["scoring"] = {**raw["scoring"], "batch_size": current["scoring"]["batch_size"]}
        raw["train"] = {**raw["train"], "device": current["train"]["device"]}
    return settings_from_dict(apply_overrides(raw, list(overrides)), source="saved model settings")


def test_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    rows = manifest[manifest["split"] == "test"].reset_index(drop=True)
    if rows.empty:
        raise ValueError("the manifest has no test images (split=test) to evaluate on")
    return rows


def predict(model: nn.Module, rows: pd.DataFrame, root: Path, settings: Settings, progress: bool = True) -> Predictions:
    """Score every row; masks are read where the category has them (image-level datasets have none)."""
    ds = ManifestDataset(rows, root, settings.data.image_size, with_masks=True, require_masks=False)
    loader = DataLoader(ds, batch_size=settings.scoring.batch_size, num_workers=settings.data.loader_workers)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("prob", "local", "sem", "dec", "map", "mask")}
    for batch in tqdm(loader, desc="score", disable=not (progress and sys.stderr.isatty())):
        out = score_batch(model, batch["image"], settings.scoring, amp=settings.train.amp,
                          branches=settings.model.branches)
        cols["prob"].append(out.probability.cpu())
        cols["dec"].append(out.is_anomalous.cpu())
        cols["mask"].append(batch["mask"][:, 0].to(torch.uint8))
        if out.local_score is not None:  # a semantic-only map is the image score copied: not a map
            cols["map"].append(out.anomaly_map.cpu().float())
            cols["local"].append(out.local_score.cpu())
        if out.semantic_score is not None:
            cols["sem"].append(out.semantic_score.cpu())
    cat = {k: torch.cat(v).numpy() if v else None for k, v in cols.items()}
    pixel_categories = categories_with_masks(rows) if cat["map"] is not None else set()
    return Predictions(
        rows, rows["label"].to_numpy(dtype=int), cat["prob"], cat["local"], cat["sem"], cat["dec"], cat["map"],
        cat["mask"], pixel_categories,
    )


def threshold_metrics(labels: np.ndarray, decisions: np.ndarray) -> dict[str, float]:
    """Operating point at the stored threshold: what a line operator actually experiences."""
    pos, neg = labels == 1, labels == 0
    tp, fp = int((decisions & pos).sum()), int((decisions & neg).sum())
    fn = int((~decisions & pos).sum())
    recall = tp / max(1, tp + fn)
    precision = tp / max(1, tp + fp)
    return {
        "recall": recall,
        "precision": precision,
        "false_positive_rate": fp / max(1, int(neg.sum())),
        "f1": 2 * precision * recall / max(1e-12, precision + recall),
    }


def branch_metrics(pred: Predictions) -> dict[str, dict[str, Any] | None]:
    """Image AUROC (per category and their mean) of S_D's raw score, S_E's raw score and the joined
    probability, each on its own: what the fusion gains or loses against its best branch."""
    cats = pred.rows["category"].to_numpy()

    def auroc(scores: np.ndarray | None) -> dict[str, Any] | None:
        if scores is None:
            return None
        m = compute_metrics(pred.labels, scores, cats)
        return {"image_auroc": m["image_auroc"],
                "per_category": {c: v["image_auroc"] for c, v in m["per_category"].items()}}

    return {"local": auroc(pred.local_score), "semantic": auroc(pred.semantic_score), "joined": auroc(pred.probability)}


def metrics_from_predictions(pred: Predictions, settings: Settings,
                             guarantee: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics of evaluation/metrics.py on the joined probability, each branch's image AUROC, and
    the operating point at the stored threshold with the false-alarm rate it promised (`guarantee`,
    NoisyOr.guarantee(); None: not known)."""
    pixel = pred.maps is not None
    metrics = compute_metrics(
        pred.labels,
        pred.probability,
        pred.rows["category"].to_numpy(),
        masks=pred.masks if pixel else None,
        maps=pred.maps,
        fpr_limit=settings.evaluate.aupro_fpr_limit,
        pixel_categories=pred.pixel_categories,
    )
    metrics["branches"] = branch_metrics(pred)
    metrics["at_threshold"] = threshold_metrics(pred.labels, pred.is_anomalous)
    metrics["false_alarm"] = false_alarm_report(pred.labels, pred.is_anomalous, guarantee)
    return metrics


def evaluate_model(
    model: nn.Module, manifest: pd.DataFrame, root: Path, settings: Settings, progress: bool = True
) -> tuple[dict[str, Any], Predictions]:
    pred = predict(model, test_rows(manifest), root, settings, progress)
    nor = getattr(model, "noisy_or", None)
    return metrics_from_predictions(pred, settings, None if nor is None else nor.guarantee()), pred


def with_scored_with(metrics: dict[str, Any], model_meta: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The metrics with `scored_with`, the record of the `--set` overrides that took effect; the
    threshold metrics are dropped when the scores are not the ones the stored threshold was fitted on."""
    record = scored_with(model_meta["settings"], checked_overrides(list(overrides), model_meta["settings"]))
    kept = {k: v for k, v in metrics.items() if not (k in THRESHOLD_KEYS and "at_threshold" in record)}
    return {**kept, "scored_with": record}
