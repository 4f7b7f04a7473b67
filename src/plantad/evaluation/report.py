"""Evaluation artefacts: curve data for DVC plots and PNG figures for people and MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plantad.evaluation.metrics import METRIC_KEYS
from plantad.evaluation.plots import plot_overlay_grid, plot_per_category, plot_pr, plot_roc, write_curve_csv

if TYPE_CHECKING:  # `plantad metrics` reads a JSON file: it need not import torch
    from plantad.evaluation.evaluate import Predictions


def overlay_selection(pred: Predictions, per_category: int = 2) -> np.ndarray:
    """A few of each category's highest-scoring anomalous and normal test images."""
    picks: list[int] = []
    for _, rows in pred.rows.groupby("category", sort=True):
        idx = rows.index.to_numpy()
        for label in (1, 0):
            chosen = idx[pred.labels[idx] == label]
            chosen = chosen[np.argsort(-pred.probability[chosen])][: per_category if label else 1]
            picks.extend(chosen.tolist())
    return np.asarray(picks, dtype=int)


def _thumbnails(pred: Predictions, idx: np.ndarray, root: Path) -> np.ndarray:
    from plantad.data.images import load_rgb

    size = pred.maps.shape[-1]
    return np.stack([np.asarray(load_rgb(root / pred.rows.at[i, "path"]).resize((size, size))) for i in idx])


def write_plots(pred: Predictions, metrics: dict[str, Any], out_dir: Path, root: Path | None = None) -> list[Path]:
    """ROC/PR curves (CSV for DVC plots + PNG), per-category bars, anomaly-map overlays."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cats = pred.rows["category"].to_numpy()
    paths = [
        write_curve_csv(pred.labels, pred.probability, out_dir / "roc.csv", kind="roc"),
        write_curve_csv(pred.labels, pred.probability, out_dir / "pr.csv", kind="pr"),
        plot_roc(pred.labels, pred.probability, out_dir / "roc.png", "Image ROC", categories=cats),
        plot_pr(pred.labels, pred.probability, out_dir / "pr.png", "Image precision-recall", categories=cats),
        plot_per_category(metrics, out_dir / "per_category.png"),
    ]
    if root is not None and pred.maps is not None:  # a semantic-only model has no map to overlay
        sel = overlay_selection(pred)
        titles = [f"{pred.rows.at[i, 'category']}/{pred.rows.at[i, 'defect_type']} P={pred.probability[i]:.2f}" for i in sel]
        paths.append(plot_overlay_grid(_thumbnails(pred, sel, root), pred.maps[sel], pred.masks[sel], titles, out_dir / "overlays.png"))
    return [Path(p) for p in paths]


def metrics_table(metrics: dict[str, Any]) -> str:
    """Per-category rows and the mean, one column per headline metric (null shows as n/a)."""
    if not isinstance(metrics, dict):
        raise ValueError(f"not a plantad metrics file: a JSON object was expected, not {type(metrics).__name__}")
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"not a plantad metrics file: missing {', '.join(missing)}")
    rows = [*sorted(metrics.get("per_category", {}).items()), ("mean", metrics)]

    def cell(v: Any) -> str:
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"

    width = max(len(name) for name, _ in rows)
    lines = [f"{'category':<{width}}  " + "  ".join(f"{k:>12}" for k in METRIC_KEYS)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{cell(v.get(k)):>12}" for k in METRIC_KEYS) for name, v in rows]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def metrics_report(metrics: dict[str, Any]) -> str:
    """What `plantad metrics` and `plantad evaluate` print: the metrics table, then each branch's image
    AUROC beside the joined score's, then the false-alarm rate (blocks of files that have them)."""
    blocks = [metrics_table(metrics)]
    if isinstance(metrics.get("branches"), dict):
        blocks.append(branch_table(metrics))
    if isinstance(metrics.get("false_alarm"), dict):
        blocks.append(false_alarm_line(metrics["false_alarm"]))
    return "\n\n".join(blocks)


def branch_table(metrics: dict[str, Any]) -> str:
    """Image AUROC of S_D's raw score alone, S_E's alone and the joined score, per category and the mean."""
    branches = metrics["branches"]
    categories = sorted(metrics.get("per_category", {}))
    width = max(len(c) for c in [*categories, "mean", "image AUROC of"])
    names = (("local", "S_D"), ("semantic", "S_E"), ("joined", "joined"))
    cell = _cell

    def value(branch: str, category: str | None) -> str:
        b = branches.get(branch)
        if not isinstance(b, dict):
            return "n/a"
        return cell(b.get("image_auroc") if category is None else b.get("per_category", {}).get(category))

    lines = [f"{'image AUROC of':<{width}}  " + "  ".join(f"{label:>12}" for _, label in names)]
    for name, category in [*((c, c) for c in categories), ("mean", None)]:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{value(b, category):>12}" for b, _ in names))
    return "\n".join(lines)


def false_alarm_line(fa: dict[str, Any]) -> str:
    """Achieved false-alarm rate on normal test images, its interval, and what the threshold promised."""
    num = _cell
    achieved = (f"false alarms on normal test images: {num(fa.get('achieved'))} ({fa.get('false_alarms')} of "
                f"{fa.get('normal_images')}; {fa.get('ci_method', 'interval')}: {num(fa.get('ci_low'))} to "
                f"{num(fa.get('ci_high'))})")
    if fa.get("promised") is None:
        return achieved + "; promised: none stored (a model calibrated before the guarantee was recorded)"
    promise = (f"; promised at most {num(fa['promised'])} on average over calibrations (at most "
               f"{num(fa.get('promised_90'))} for 90% of them) by the {fa.get('threshold_images')} held-out normal "
               "images that set the threshold")
    if fa.get("guaranteed") is False:
        promise += f" (asked {num(fa.get('requested'))}: too few held-out images to promise it)"
    return achieved + promise
