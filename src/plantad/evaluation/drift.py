"""Drift of what a camera sees: a version's reference of its normal images, and the test that
compares a window of a line's new images with it.

Reference (fitted at calibration, stored in the model's metadata): the teacher embeddings of the
held-out normal images through a fixed random projection to `dims` dimensions (Johnson-Lindenstrauss:
distances survive, whichever direction a shift takes), standardised per dimension, split in two:
a *fit* half that new images are compared with, and a *calibration* half whose outlier scores
against the fit half are stored, with every image's final probability.

Outlier score of an image: its distance to its k-th nearest fit embedding divided by the mean k-NN
radius of those neighbours (a simplified local outlier factor [reconstructed]): about 1 for an image
like some normal image, whichever product it shows, and large for one unlike all of them.

Drift statistic: the AUC of the window's outlier scores against the calibration scores (0.5: the
window looks like normal images; 1: every window image is more unusual than every normal one) with
the one-sided Mann-Whitney p-value. Given the fit half, calibration and window scores of normal
images are i.i.d. from one distribution, so the rank test holds its level exactly: P(p <= alpha) <=
alpha per test (up to the normal approximation). Why this test and not an MMD or a trained domain
classifier: a line that sees one of several products the model was trained on has a different
*mix* of normal images than the reference, which MMD and a classifier flag as drift, while a
local outlier score does not; a moved camera makes images unlike all normal ones, which it does.
It also costs one (window x fit) distance matrix per test, no permutations and no training.
Score shift: the two-sample Kolmogorov-Smirnov distance between the window's probabilities and the
reference's.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

PROJECTION_SEED = 20260  # fixed: the projection is stored with the reference anyway


class DriftReferenceError(ValueError):
    """A stored reference that is missing, damaged or does not fit the model's embeddings."""


def _encode(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(d: Any, key: str, ndim: int) -> np.ndarray:
    if not isinstance(d, dict) or d.get("dtype") != "float32" or "data" not in d or "shape" not in d:
        raise DriftReferenceError(f"drift_reference.{key} is not a stored float32 array")
    a = np.frombuffer(base64.b64decode(d["data"]), dtype=np.float32)
    shape = tuple(int(s) for s in d["shape"])
    if a.size != int(np.prod(shape)) or len(shape) != ndim:
        raise DriftReferenceError(f"drift_reference.{key} holds {a.size} values, its shape says {shape}")
    return a.reshape(shape)


@dataclass(frozen=True)
class DriftReference:
    projection: np.ndarray  # (C, D) fixed random projection of the teacher embedding
    center: np.ndarray  # (D,) mean of the projected reference
    scale: np.ndarray  # (D,) standard deviation of the projected reference (floored)
    fit: np.ndarray  # (F, D) standardised projections new images are compared with
    fit_radius: np.ndarray  # (F,) each fit embedding's k-NN distance among the other fit embeddings
    calibration_scores: np.ndarray  # (M,) outlier scores of the other held-out normal images
    probabilities: np.ndarray  # (F + M,) final probabilities of all reference images
    k: int  # neighbours of the outlier score
    reject_rate: float  # share of the reference at or above the version's threshold

    @property
    def images(self) -> int:
        return len(self.probabilities)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, C) teacher embeddings -> (N, D) standardised projections, comparable with the reference."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.projection.shape[0]:
            raise DriftReferenceError(f"embeddings of shape {embeddings.shape} do not fit the reference's "
                                      f"projection from {self.projection.shape[0]} dimensions")
        return ((embeddings.astype(np.float32) @ self.projection) - self.center) / self.scale

    def outlier_scores(self, projected: np.ndarray) -> np.ndarray:
        """(N, D) projections -> (N,) outlier scores against the fit half (about 1: like normal images)."""
        return outlier_scores(projected, self.fit, self.fit_radius, self.k)

    def to_dict(self) -> dict[str, Any]:
        arrays = {name: _encode(getattr(self, name)) for name in ARRAYS}
        return {"method": METHOD, **arrays, "k": self.k, "reject_rate": self.reject_rate}

    @classmethod
    def from_dict(cls, d: Any) -> DriftReference:
        if not isinstance(d, dict):
            raise DriftReferenceError(f"drift_reference is a {type(d).__name__}, not the stored mapping")
        if d.get("method") != METHOD:
            raise DriftReferenceError(f"drift_reference.method is {d.get('method')!r}; this plantad reads {METHOD!r}")
        arrays = {name: _decode(d.get(name), name, ndim) for name, ndim in ARRAYS.items()}
        ref = cls(**arrays, k=int(d.get("k", 0)), reject_rate=float(d.get("reject_rate", "nan")))
        dims = ref.projection.shape[1]
        if ref.center.shape != (dims,) or ref.scale.shape != (dims,) or ref.fit.shape[1] != dims:
            raise DriftReferenceError(f"drift_reference arrays disagree on the projected dimension {dims}")
        if ref.fit_radius.shape != (len(ref.fit),) or not 1 <= ref.k < len(ref.fit):
            raise DriftReferenceError(f"drift_reference.fit_radius or k ({ref.k}) does not fit {len(ref.fit)} "
                                      "fit embeddings")
        return ref


METHOD = "knn-outlier-rank-test"
ARRAYS = {"projection": 2, "center": 1, "scale": 1, "fit": 2, "fit_radius": 1, "calibration_scores": 1,
          "probabilities": 1}


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def outlier_scores(x: np.ndarray, fit: np.ndarray, fit_radius: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of `x` to its k-th nearest `fit` row over the mean k-NN radius of those
    k neighbours: (N, D) -> (N,)."""
    d = np.sqrt(squared_distances(x.astype(np.float32), fit))  # (N, F)
    nearest = np.argpartition(d, k - 1, axis=1)[:, :k]  # (N, k) the k nearest, unordered
    kth = np.take_along_axis(d, nearest, axis=1).max(axis=1)
    return kth / np.maximum(fit_radius[nearest].mean(axis=1), 1e-12)


def fit_reference(embeddings: np.ndarray, probabilities: np.ndarray, threshold: float, dims: int,
                  max_images: int, k: int = 5) -> DriftReference:
    """The reference of held-out normal images: (N, C) teacher embeddings and their (N,) probabilities;
    at most `max_images` of them (evenly spaced over the holdout), alternately in the fit and the
    calibration half."""
    n = embeddings.shape[0]
    if n < 8:
        raise ValueError(f"a drift reference needs at least 8 held-out normal images, got {n}: "
                         "raise data.holdout_fraction")
    keep = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    emb, prob = embeddings[keep].astype(np.float32), probabilities[keep].astype(np.float32)
    rng = np.random.default_rng(PROJECTION_SEED)
    projection = (rng.standard_normal((emb.shape[1], dims)) / np.sqrt(dims)).astype(np.float32)
    z = emb @ projection
    center = z.mean(axis=0)
    scale = np.maximum(z.std(axis=0), 1e-6 * max(float(np.abs(z).max()), 1e-12)).astype(np.float32)
    z = ((z - center) / scale).astype(np.float32)
    fit, calibration = z[0::2], z[1::2]
    k = max(1, min(k, len(fit) - 1))
    d = np.sqrt(squared_distances(fit, fit))
    np.fill_diagonal(d, np.inf)  # a fit embedding's radius is to its k-th *other* neighbour
    radius = np.sort(d, axis=1)[:, k - 1].astype(np.float32)
    cal_scores = outlier_scores(calibration, fit, radius, k).astype(np.float32)
    return DriftReference(projection, center.astype(np.float32), scale, fit, radius, cal_scores, prob, k,
                          float(np.mean(prob >= threshold)))


@dataclass(frozen=True)
class RankTest:
    auc: float  # P(window score > calibration score), ties half: 0.5 like normal, 1 all more unusual
    p_value: float  # one-sided Mann-Whitney p-value of "the window's scores are larger"


def outlier_rank_test(calibration: np.ndarray, window: np.ndarray) -> RankTest:
    """AUC of (W,) window outlier scores against (M,) calibration scores and its one-sided p-value
    (Mann-Whitney U, normal approximation with tie and continuity correction)."""
    if len(window) < 2 or len(calibration) < 2:
        raise ValueError(f"a rank test needs 2 or more scores on each side, got {len(window)} and {len(calibration)}")
    from scipy.stats import mannwhitneyu

    result = mannwhitneyu(window, calibration, alternative="greater", method="asymptotic")
    return RankTest(float(result.statistic) / (len(window) * len(calibration)), float(result.pvalue))


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance sup |F_a - F_b| (0: same distribution, 1: disjoint)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        raise ValueError("a KS distance needs two non-empty samples")
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


@dataclass(frozen=True)
class WindowDrift:
    """What one test of a line's window found (the gauges and /model show these)."""

    images: int  # images in the window
    auc: float | None  # None: the version has no reference, or the model gives no embeddings
    p_value: float | None
    drifted: bool  # p_value <= alpha
    score_shift: float | None  # KS distance of the window's probabilities from the reference's
    reject_rate: float  # share of the window at or above the threshold it was scored with
    reference_reject_rate: float | None
    at: float  # unix time of the test


def window_drift(reference: DriftReference | None, projected: np.ndarray | None, probabilities: np.ndarray,
                 anomalous: np.ndarray, alpha: float, at: float) -> WindowDrift:
    """Test one window: (W, D) projected embeddings (None when the model gives none), (W,) probabilities
    and decisions."""
    test = None
    if reference is not None and projected is not None:
        test = outlier_rank_test(reference.calibration_scores, reference.outlier_scores(projected))
    return WindowDrift(
        images=len(probabilities),
        auc=None if test is None else test.auc,
        p_value=None if test is None else test.p_value,
        drifted=test is not None and test.p_value <= alpha,
        score_shift=None if reference is None else ks_distance(probabilities, reference.probabilities),
        reject_rate=float(np.mean(anomalous)) if len(anomalous) else 0.0,
        reference_reject_rate=None if reference is None else reference.reject_rate,
        at=at,
    )
