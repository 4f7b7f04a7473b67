"""Image- and pixel-level anomaly-detection metrics (AUROC, AP, F1-max, AUPRO), numpy only.

Conventions: a sample is predicted anomalous when its score is >= the threshold; tied scores move
together (AUROC gives ties 0.5 credit, like scikit-learn). Degenerate inputs (one class only, no
anomalous pixels) give NaN and a logged warning; malformed inputs raise ValueError. A metric that
does not exist for the data (pixel metrics of a category without masks, or of a model without a
local map) is None, never a number: JSON null, "n/a" in tables, not logged to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_aupro")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated (bool labels, float64 scores), both (N,)."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels shape {y.shape} and scores shape {s.shape} must be equal and 1-D (N,)")
    if y.dtype != bool and np.any((y != 0) & (y != 1)):
        raise ValueError(f"labels must be 0/1 (1 = anomalous); got values {np.unique(y)[:10].tolist()}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y.astype(bool), s


def _one_class(y: np.ndarray, metric: str) -> bool:
    """True (and a warning) when only normal or only anomalous samples are present."""
    n_pos = int(np.count_nonzero(y))
    if 0 < n_pos < y.size:
        return False
    log.warning("%s is undefined with %d normal and %d anomalous samples; returning NaN", metric, y.size - n_pos, n_pos)
    return True


def _counts_at_thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positives, true positives, threshold) at each distinct score, thresholds descending."""
    order = np.argsort(s, kind="stable")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each tie group
    tps = np.cumsum(y, dtype=np.int64)[last]
    return last + 1 - tps, tps, s[last]


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def roc_curve_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, starting at (0, 0) with threshold +inf.

    Same points as sklearn's `roc_curve(drop_intermediate=False)`. Raises ValueError on one class.
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        raise ValueError("roc_curve_points needs both normal (0) and anomalous (1) labels")
    fps, tps, thr = _counts_at_thresholds(y, s)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thr]


def pr_curve_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), thresholds ascending, ending at (1, 0) without a threshold.

    Same points as sklearn's `precision_recall_curve`. Raises ValueError on one class.
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        raise ValueError("pr_curve_points needs both normal (0) and anomalous (1) labels")
    fps, tps, thr = _counts_at_thresholds(y, s)
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (trapezoid over distinct thresholds: ties count 0.5)."""
    y, s = _image_inputs(labels, scores)
    if _one_class(y, "image_auroc"):
        return math.nan
    fps, tps, _ = _counts_at_thresholds(y, s)
    return _trapezoid(np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]])


def image_ap(labels: Any, scores: Any) -> float:
    """Average precision, sum_n (R_n - R_{n-1}) P_n (sklearn's step definition, no interpolation)."""
    y, s = _image_inputs(labels, scores)
    if _one_class(y, "image_ap"):
        return math.nan
    fps, tps, _ = _counts_at_thresholds(y, s)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tps / (tps + fps)))


def image_f1_max(labels: Any, scores: Any) -> float:
    """Best F1 = 2TP / (2TP + FP + FN) over all thresholds (an optimistic, oracle-threshold number)."""
    y, s = _image_inputs(labels, scores)
    if _one_class(y, "image_f1_max"):
        return math.nan
    fps, tps, _ = _counts_at_thresholds(y, s)
    return float(np.max(2.0 * tps / (tps + fps + tps[-1])))


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated (bool masks, float32 maps), both (N, H, W); no copy when already bool / float32."""
    m, a = np.asarray(masks), np.asarray(maps)
    if a.ndim != 3 or m.shape != a.shape:
        raise ValueError(f"masks shape {m.shape} and maps shape {a.shape} must be equal and (N, H, W)")
    if m.dtype != bool:
        bad = m.size > 0 and (m.min() < 0 or m.max() > 1) if m.dtype.kind in "iu" else np.any((m != 0) & (m != 1))
        if bad:
            raise ValueError("masks must be 0/1 (1 = anomalous pixel); resize masks with nearest-neighbour")
    return m.astype(bool, copy=False), a.astype(np.float32, copy=False)


def _sorted_scores(m: np.ndarray, a: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Ascending float32 scores of anomalous and of normal pixels (the only pixel-sized copies)."""
    pos, neg = a[m], a[~m]
    pos.sort()
    neg.sort()
    if (pos.size and np.isnan(pos[-1])) or (neg.size and np.isnan(neg[-1])):
        raise ValueError(f"{metric}: maps contain NaN")
    return pos, neg


def _no_pixel_classes(pos: np.ndarray, neg: np.ndarray, metric: str) -> bool:
    if pos.size and neg.size:
        return False
    log.warning("%s is undefined with %d normal and %d anomalous pixels; returning NaN", metric, neg.size, pos.size)
    return True


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel AUROC over all pixels of all images, as Mann-Whitney U on float32 scores (ties 0.5).

    Memory: one float32 copy of the map values plus two int64 arrays per anomalous pixel.
    """
    pos, neg = _sorted_scores(*_pixel_inputs(masks, maps), "pixel_auroc")
    if _no_pixel_classes(pos, neg, "pixel_auroc"):
        return math.nan
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((int(below) + int(below_or_tied)) / (2.0 * pos.size * neg.size))


def _region_weights(m: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score and weight 1 / (n_regions * region size) of each anomalous pixel (8-connected regions)."""
    scores, weights, n_regions = [], [], 0
    for i in np.flatnonzero(m.reshape(len(m), -1).any(axis=1)):
        regions, n = ndimage.label(m[i], structure=_EIGHT_CONNECTED)
        sizes = np.bincount(regions.ravel())
        scores.append(a[i][m[i]])
        weights.append(1.0 / sizes[regions[m[i]]])
        n_regions += n
    return np.concatenate(scores), np.concatenate(weights) / n_regions


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y), x non-decreasing from 0, cut at x = limit by linear interpolation."""
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit
    if k < x.size:
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        x, y = np.r_[x[:k], limit], np.r_[y[:k], y_at]
    return _trapezoid(x, y)


def pixel_aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by fpr_limit.

    PRO(t) = mean over all ground-truth regions (8-connected components, per image) of the fraction
    of the region scoring >= t; FPR(t) over all normal pixels. Exact sweep over every distinct score
    (Bergmann et al., MVTec AD, IJCV 2021): PRO is a weighted count, so for each distinct anomalous
    score u the curve passes through (FPR(>u), PRO(>u)) and (FPR(>=u), PRO(>=u)); between them lie
    only horizontal (normal-only) or diagonal (tied) segments, so these points give the exact area.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _pixel_inputs(masks, maps)
    anomalous, neg = _sorted_scores(m, a, "pixel_aupro")
    if _no_pixel_classes(anomalous, neg, "pixel_aupro"):
        return math.nan
    pos, w = _region_weights(m, a)
    order = np.argsort(pos, kind="stable")[::-1]
    pos, w = pos[order], w[order]
    last = np.r_[np.flatnonzero(pos[1:] != pos[:-1]), pos.size - 1]
    distinct = pos[last]  # descending
    pro_ge = np.cumsum(w)[last]
    pro_ge /= pro_ge[-1]  # mathematically 1 already; removes the rounding of summing 1 / size
    pro_gt = np.r_[0.0, pro_ge[:-1]]
    fpr_gt = (neg.size - np.searchsorted(neg, distinct, side="right")) / neg.size
    fpr_ge = (neg.size - np.searchsorted(neg, distinct, side="left")) / neg.size
    x = np.r_[0.0, np.column_stack([fpr_gt, fpr_ge]).ravel(), 1.0]
    y = np.r_[0.0, np.column_stack([pro_gt, pro_ge]).ravel(), pro_ge[-1]]
    return _area_up_to(x, y, fpr_limit) / fpr_limit


def _nanmean(values: Sequence[float | None]) -> float | None:
    """Mean of the finite values; NaN when only NaN were given, None when every value is None."""
    present = [v for v in values if v is not None]
    finite = [v for v in present if not math.isnan(v)]
    if not present:
        return None
    return float(sum(finite) / len(finite)) if finite else math.nan


def _category_metrics(
    category: str, y: np.ndarray, s: np.ndarray, m: np.ndarray | None, a: np.ndarray | None, fpr_limit: float
) -> dict[str, float | None]:
    out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS, math.nan)
    if m is None:
        out.update(pixel_auroc=None, pixel_aupro=None)
    n_pos = int(np.count_nonzero(y))
    if 0 < n_pos < y.size:
        out.update(image_auroc=image_auroc(y, s), image_ap=image_ap(y, s), image_f1_max=image_f1_max(y, s))
    else:
        log.warning("category %r: %d normal and %d anomalous images; image_auroc, image_ap, image_f1_max are NaN",
                    category, y.size - n_pos, n_pos)
    if m is not None and a is not None:
        n_px = int(np.count_nonzero(m))
        if 0 < n_px < m.size:
            out.update(pixel_auroc=pixel_auroc(m, a), pixel_aupro=pixel_aupro(m, a, fpr_limit))
        else:
            log.warning("category %r: %d anomalous of %d pixels; pixel_auroc, pixel_aupro are NaN", category, n_px, m.size)
    return {k: None if v is None else float(v) for k, v in out.items()}


def compute_metrics(
    labels: Any,
    scores: Any,
    categories: Any,
    masks: Any = None,
    maps: Any = None,
    fpr_limit: float = 0.3,
    pixel_categories: Collection[str] | None = None,
) -> dict[str, Any]:
    """The five metrics per category and their mean over categories (NaN ignored), as plain floats.

    Pixel metrics are None when masks and maps are both None (giving only one is an error), and for
    categories not in `pixel_categories` (None: every category), whose masks are placeholders. The
    mean of a pixel metric is over the categories that have it, None when none has.
    """
    y, s = _image_inputs(labels, scores)
    cats = np.asarray(categories).astype(str)  # keys of the JSON report; also orders mixed types
    if cats.shape != y.shape:
        raise ValueError(f"categories shape {cats.shape} and labels shape {y.shape} must be equal")
    if (masks is None) != (maps is None):
        raise ValueError("give both masks and maps for pixel metrics, or neither")
    m = a = None
    if masks is not None:
        m, a = _pixel_inputs(masks, maps)
        if len(m) != len(y):
            raise ValueError(f"masks shape {m.shape} and labels shape {y.shape} disagree on the number of images")
    per_category: dict[str, dict[str, float]] = {}
    for cat in np.unique(cats):
        idx = np.flatnonzero(cats == cat)
        has_pixels = m is not None and a is not None and (pixel_categories is None or str(cat) in pixel_categories)
        sub_m, sub_a = (m[idx], a[idx]) if has_pixels else (None, None)
        per_category[str(cat)] = _category_metrics(str(cat), y[idx], s[idx], sub_m, sub_a, fpr_limit)
    means = {k: _nanmean([v[k] for v in per_category.values()]) for k in METRIC_KEYS}
    return {**means, "per_category": per_category, "n_images": int(y.size), "n_anomalous": int(np.count_nonzero(y))}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def metrics_to_json(d: dict[str, Any]) -> str:
    """Strict JSON (NaN and infinities written as null), numpy scalars turned into Python numbers."""
    return json.dumps(_jsonable(d), indent=2, allow_nan=False)


CI_LEVEL = 0.95
CI_METHOD = "Clopper-Pearson (exact binomial), 95%"


def clopper_pearson(k: int, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes in n trials (NaN, NaN for n = 0)."""
    from scipy.stats import beta

    if n <= 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - tail, k + 1, n - k))
    return low, high


def calibration_rate_quantile(n: int, k: int, q: float) -> float:
    """The q-quantile over calibrations of the false-alarm rate of the k-th smallest of n exchangeable
    normal scores (continuous): that rate is Beta(n + 1 - k, k) distributed."""
    from scipy.stats import beta

    return float(beta.ppf(q, n + 1 - k, k))


def false_alarm_report(labels: Any, decisions: Any, guarantee: dict[str, Any] | None) -> dict[str, Any]:
    """The false-alarm rate on the normal test images at the stored threshold, with its interval,
    beside the rate the threshold promised at calibration (`guarantee`: NoisyOr.guarantee())."""
    y, d = np.asarray(labels).astype(bool), np.asarray(decisions).astype(bool)
    n, k = int((~y).sum()), int((d & ~y).sum())
    low, high = clopper_pearson(k, n)
    g = guarantee or {}
    bound, alpha = g.get("bound"), g.get("alpha")
    n_cal, k_cal = g.get("threshold_images"), g.get("order_statistic")
    return {
        "promised": bound,  # expected rate over calibrations at most this (None: a model saved before it)
        # one calibration's rate is Beta(n + 1 - k, k): at most this for 90% of calibrations
        "promised_90": None if n_cal is None or k_cal is None else calibration_rate_quantile(n_cal, k_cal, 0.9),
        "requested": alpha,
        "guaranteed": None if bound is None or alpha is None else bool(bound <= alpha + 1e-12),
        "threshold_images": g.get("threshold_images"),  # held-out normal images that set the threshold
        "achieved": k / n if n else math.nan,
        "false_alarms": k,
        "normal_images": n,
        "ci_low": low,
        "ci_high": high,
        "ci_method": CI_METHOD,
    }
