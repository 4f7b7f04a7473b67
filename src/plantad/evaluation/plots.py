"""Evaluation figures (PNG) and curve data (CSV for DVC plots).

Figures are drawn on matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`), imported inside
the functions: importing this module loads no matplotlib, and pyplot's global backend and figure list
are never touched. Sizes are fixed (DPI 100) so outputs are reproducible.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plantad.evaluation.metrics import METRIC_KEYS, image_ap, image_auroc, pr_curve_points, roc_curve_points

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
CURVE_SIZE_IN = (6.0, 5.0)
PANEL_W_IN, ROW_H_IN, GRID_COLS = 2.0, 2.5, 4  # overlay grid: 2 panels per image, GRID_COLS images a row
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2 / timm preprocessing
IMAGENET_STD = (0.229, 0.224, 0.225)


def _figure(width_in: float, height_in: float, layout: str | None = None) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _curve_figure(kind: str, labels: Any, scores: Any, path: str | Path, title: str, categories: Any) -> Path:
    """One curve for all images plus one per category that has both classes (others are skipped)."""
    y, s = np.asarray(labels), np.asarray(scores)
    groups: list[tuple[str, Any]] = [("all", slice(None))]  # whole arrays: shape errors come from the curve
    if categories is not None:
        cats = np.asarray(categories).astype(str)
        if cats.shape != y.shape:
            raise ValueError(f"categories shape {cats.shape} and labels shape {y.shape} must be equal")
        groups += [(str(c), cats == c) for c in np.unique(cats)]
    fig = _figure(*CURVE_SIZE_IN)
    ax = fig.add_subplot()
    for i, (name, sel) in enumerate(groups):
        if i > 0 and len(np.unique(y[sel])) < 2:  # one class: no curve (the overall one raises)
            ax.plot([], [], label=f"{name} (one class, no curve)", linewidth=0)
            continue
        style = {"color": "black", "linewidth": 2.0} if i == 0 else {"linewidth": 1.0, "alpha": 0.8}
        if kind == "roc":
            fpr, tpr, _ = roc_curve_points(y[sel], s[sel])
            ax.plot(fpr, tpr, label=f"{name} (AUROC {image_auroc(y[sel], s[sel]):.3f})", **style)
        else:
            precision, recall, _ = pr_curve_points(y[sel], s[sel])
            ax.step(recall, precision, where="post", label=f"{name} (AP {image_ap(y[sel], s[sel]):.3f})", **style)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), title=title,
           xlabel="false positive rate" if kind == "roc" else "recall",
           ylabel="true positive rate" if kind == "roc" else "precision")
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(labels: Any, scores: Any, path: str | Path, title: str, categories: Any = None) -> Path:
    """Image-level ROC, 600x500 px; raises ValueError when the whole set has only one class."""
    return _curve_figure("roc", labels, scores, path, title, categories)


def plot_pr(labels: Any, scores: Any, path: str | Path, title: str, categories: Any = None) -> Path:
    """Image-level precision-recall curve, 600x500 px; raises ValueError on one class."""
    return _curve_figure("pr", labels, scores, path, title, categories)


def write_curve_csv(labels: Any, scores: Any, path: str | Path, kind: str = "roc") -> Path:
    """`fpr,tpr,threshold` (kind="roc") or `precision,recall,threshold` (kind="pr") rows for DVC plots.

    The point without a finite threshold ((0, 0) on ROC, (1, 0) on PR) is written with threshold inf.
    """
    if kind == "roc":
        cols, (a, b, thr) = ("fpr", "tpr", "threshold"), roc_curve_points(labels, scores)
    elif kind == "pr":
        cols, (a, b, thr) = ("precision", "recall", "threshold"), pr_curve_points(labels, scores)
        thr = np.r_[thr, np.inf]
    else:
        raise ValueError(f"kind must be 'roc' or 'pr', got {kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        writer.writerows(zip(a.tolist(), b.tolist(), thr.tolist()))
    return path


def plot_per_category(metrics: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars of the five metrics per category plus the mean; NaN or null metrics are marked n/a.

    Size: (2 + 1.25 * (n_categories + 1)) x 4.5 inches at DPI 100.
    """
    per = metrics["per_category"]
    names = [*per, "mean"]
    rows = [*per.values(), {k: metrics[k] for k in METRIC_KEYS}]
    fig = _figure(2.0 + 1.25 * len(names), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(METRIC_KEYS)
    for j, key in enumerate(METRIC_KEYS):
        xs = np.arange(len(names)) + (j - (len(METRIC_KEYS) - 1) / 2) * width
        values = np.array([math.nan if r[key] is None else float(r[key]) for r in rows])
        shown = ~np.isnan(values)
        ax.bar(xs[shown], values[shown], width, label=key)
        for x in xs[~shown]:
            ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="score", title="Metrics per category")
    ax.legend(fontsize=7, ncols=len(METRIC_KEYS), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    return _save(fig, path)


def _display_images(images: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1] from uint8 (N, H, W, 3) or normalised float (N, 3, H, W)."""
    if hasattr(images, "detach"):  # torch tensor, without importing torch here
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.ndim == 4 and x.dtype == np.uint8 and x.shape[-1] == 3:
        return x.astype(np.float32) / 255.0
    if x.ndim == 4 and x.dtype.kind == "f" and x.shape[1] == 3:
        x = x * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
        return np.clip(x.transpose(0, 2, 3, 1), 0.0, 1.0)
    raise ValueError(f"images must be uint8 (N, H, W, 3) or normalised float (N, 3, H, W); got {x.dtype} {x.shape}")


def plot_overlay_grid(
    images: Any,
    maps: Any,
    masks: Any,
    titles: list[str],
    path: str | Path,
    max_images: int = 16,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """Per image: the image, then the anomaly map as a heat overlay with the ground-truth contour.

    One colour scale for all shown maps, so normal and anomalous images compare. The first
    `max_images` are shown, GRID_COLS a row: (4 * min(n, 4)) x (2.5 * rows) inches at DPI 100.
    """
    rgb = _display_images(images, mean, std)
    amap = np.asarray(maps, dtype=np.float32)
    gt = None if masks is None else np.asarray(masks)
    n = len(rgb)
    if amap.ndim != 3 or len(amap) != n or len(titles) != n or (gt is not None and gt.shape != amap.shape):
        shapes = f"images {rgb.shape}, maps {amap.shape}, masks {None if gt is None else gt.shape}, {len(titles)} titles"
        raise ValueError(f"plot_overlay_grid needs N images, (N, H, W) maps and masks, N titles; got {shapes}")
    if n == 0:
        raise ValueError("plot_overlay_grid needs at least one image")
    n = min(n, max_images)
    cols = min(n, GRID_COLS)
    rows = math.ceil(n / cols)
    fig = _figure(2 * PANEL_W_IN * cols, ROW_H_IN * rows, layout="constrained")
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    vmin, vmax = float(amap[:n].min()), float(amap[:n].max())
    heat = None
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        k = i // 2
        if k >= n:
            continue
        h, w = rgb[k].shape[:2]
        ax.imshow(rgb[k], extent=(0, w, h, 0))
        if i % 2 == 0:
            ax.set_title(titles[k], fontsize=7)
            continue
        heat = ax.imshow(amap[k], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax, extent=(0, w, h, 0))
        if gt is not None and gt[k].any():
            mh, mw = gt[k].shape
            xs, ys = (np.arange(mw) + 0.5) * w / mw, (np.arange(mh) + 0.5) * h / mh
            ax.contour(xs, ys, gt[k].astype(np.float32), levels=[0.5], colors="lime", linewidths=1.0)
    fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.9, aspect=30, label="anomaly score")
    return _save(fig, path)
