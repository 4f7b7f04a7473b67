"""Line health in a replica: a bounded window per line of what that line's camera sent, tested
against the served version's reference (evaluation/drift.py) every `serve.drift.every_images` new
images of the line, and exported as Prometheus gauges and a per-line test counter.

Several replicas: Serve spreads a line's requests over the replicas, so each replica's window is a
random share of the line's images and its test is valid on its own (at level alpha). The replicas'
tests are combined in Prometheus, not here: `plantad_drift_tests{line, result}` counts every test
and its outcome, and the alert rule (deploy/prometheus/rules.yml) fires when most of a line's tests
across all replicas found drift, so k replicas do not multiply the false alarms by k.

Cost per image: appending to a deque and one (C, D) projection per request; the test itself (one
window x fit distance matrix and a rank test) runs on a worker thread, at most once per line at a
time, and only every `every_images` images.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from plantad.config import DriftConfig
from plantad.evaluation.drift import DriftReference, WindowDrift, window_drift
from plantad.serving.predictor import ImageScore

log = logging.getLogger(__name__)


@dataclass
class _Window:
    version: str | None  # the version whose reference the window's projections belong to
    times: deque = field(default_factory=deque)  # unix time per image
    projected: deque = field(default_factory=deque)  # (D,) per image, or None
    probabilities: deque = field(default_factory=deque)
    anomalous: deque = field(default_factory=deque)
    since_test: int = 0
    testing: bool = False
    last: WindowDrift | None = None


class LineDrift:
    """Per-line windows of one replica; `record` is called with each scored request's images."""

    def __init__(self, cfg: DriftConfig) -> None:
        self.cfg = cfg
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def project(self, reference: DriftReference | None, scores: list[ImageScore]) -> list[np.ndarray | None]:
        """Each image's drift coordinates, (D,) float32: what the window holds and the part records
        carry; all None with drift off, without a reference or without embeddings."""
        if self.cfg.enabled and scores and reference is not None and all(s.embedding is not None for s in scores):
            return list(reference.project(np.stack([s.embedding for s in scores])))
        return [None] * len(scores)

    def record(self, line: str, version: str | None, reference: DriftReference | None,
               scores: list[ImageScore], now: float | None = None,
               projected: list[np.ndarray | None] | None = None) -> bool:
        """Add a request's images (and their `project`ions, computed here when not given) to its line's
        window; True when a test of that line is now due (then call `test(line, reference)`, off the
        event loop)."""
        if not self.cfg.enabled or not scores:
            return False
        now = time.time() if now is None else now
        if projected is None:
            projected = self.project(reference, scores)
        with self._lock:
            window = self._windows.get(line)
            if window is None or window.version != version:  # a new version brings a new reference
                window = self._windows[line] = _Window(version)
            size = self.cfg.window_images
            for s, p in zip(scores, projected):
                window.times.append(now)
                window.projected.append(p)
                window.probabilities.append(s.probability)
                window.anomalous.append(s.is_anomalous)
                if len(window.times) > size:
                    for q in (window.times, window.projected, window.probabilities, window.anomalous):
                        q.popleft()
            window.since_test += len(scores)
            due = (window.since_test >= self.cfg.every_images and not window.testing
                   and len(window.times) >= self.cfg.min_images)
            if due:
                window.testing = True
            return due

    def test(self, line: str, version: str | None, reference: DriftReference | None,
             now: float | None = None) -> WindowDrift | None:
        """Test `line`'s window of `version` (after dropping images older than the horizon); None when it
        holds too few, or when a newer version's window replaced it meanwhile."""
        now = time.time() if now is None else now
        with self._lock:
            window = self._windows.get(line)
            if window is None or window.version != version:
                return None
            while window.times and now - window.times[0] > self.cfg.horizon_s:
                for q in (window.times, window.projected, window.probabilities, window.anomalous):
                    q.popleft()
            projected = list(window.projected)
            probabilities = np.array(window.probabilities, dtype=np.float64)
            anomalous = np.array(window.anomalous, dtype=bool)
            window.since_test = 0
        try:
            if len(probabilities) < self.cfg.min_images:
                return None
            vectors = None if any(p is None for p in projected) else np.stack(projected)
            result = window_drift(reference, vectors, probabilities, anomalous, self.cfg.alpha, now)
            with self._lock:
                window.last = result
            return result
        finally:
            with self._lock:
                window.testing = False

    def status(self, reference: DriftReference | None) -> dict[str, Any]:
        """/model's `line_health`: the settings, the served version's reference and, per line, the
        window size and the last test's result."""
        with self._lock:
            lines = {line: {"version": w.version, "window_images": len(w.times),
                            "last_test": None if w.last is None else asdict(w.last)}
                     for line, w in sorted(self._windows.items())}
        ref = None if reference is None else {"images": reference.images, "fit_images": len(reference.fit),
                                              "dims": int(reference.projection.shape[1]), "k": reference.k,
                                              "reject_rate": reference.reject_rate}
        return {"enabled": self.cfg.enabled, "method": "AUC of k-NN outlier scores vs held-out normal ones, "
                "one-sided Mann-Whitney test (evaluation/drift.py)",
                "alpha": self.cfg.alpha, "window_images": self.cfg.window_images,
                "every_images": self.cfg.every_images, "reference": ref, "lines": lines}
