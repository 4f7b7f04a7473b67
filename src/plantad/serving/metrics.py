"""Prometheus metrics of the scoring app, exported through Ray's metrics agent on every node
(scrape `<node>:<metrics-export-port>/metrics`; names get Ray's `ray_` prefix)."""

from __future__ import annotations

import logging

from ray.serve.metrics import Counter, Gauge, Histogram

from plantad.evaluation.drift import WindowDrift

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
PROBABILITY_BOUNDARIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
NO_LINE = "unspecified"  # requests that name no line
OTHER_LINES = "other"  # lines beyond serve.max_lines


class LineLabels:
    """The `line` label of a request: its line name while this replica has seen at most `max_lines`
    of them, then "other", so that a client sending ever new names cannot grow the metrics without end."""

    def __init__(self, max_lines: int) -> None:
        self.max_lines = max_lines
        self.seen: set[str] = set()
        self.warned = False

    def label(self, line: str | None) -> str:
        if line is None:
            return NO_LINE
        if line in self.seen:
            return line
        if len(self.seen) < self.max_lines:
            self.seen.add(line)
            return line
        if not self.warned:
            self.warned = True
            log.warning("more than serve.max_lines (%d) lines: line %r and later new lines are counted as %r",
                        self.max_lines, line, OTHER_LINES)
        return OTHER_LINES


class ServeMetrics:
    def __init__(self) -> None:
        self.requests = Counter("plantad_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency_ms = Histogram("plantad_request_latency_ms", description="request latency in ms by route",
                                    boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("route",))
        self.batch_images = Histogram("plantad_batch_images", description="images per @serve.batch call",
                                      boundaries=BATCH_BOUNDARIES)
        self.batch_requests = Histogram("plantad_batch_requests", description="requests per @serve.batch call",
                                        boundaries=BATCH_BOUNDARIES)
        self.probability = Histogram("plantad_probability", description="final anomaly probability per image, by line",
                                     boundaries=PROBABILITY_BOUNDARIES, tag_keys=("line",))
        self.decisions = Counter("plantad_decisions", description="scored images by decision and line",
                                 tag_keys=("decision", "line"))
        self.image_errors = Counter("plantad_image_errors", description="images refused, by HTTP status and line",
                                    tag_keys=("status", "line"))
        self.model_version = Gauge("plantad_model_version", description="registry version this replica serves",
                                   tag_keys=("model",))
        self.swap_error = Gauge("plantad_swap_error", description="1 while the replica's last attempt to follow "
                                "the alias failed (it keeps serving its version), else 0", tag_keys=("model",))
        # rollout (serving/rollout.py, traffic.py)
        self.serving_last_known_good = Gauge("plantad_serving_last_known_good", description="1 while the replica "
                                             "serves the last-known-good version because the champion cannot be "
                                             "served, else 0")
        self.behind_declared_s = Gauge("plantad_behind_declared_seconds", description="seconds the replica has "
                                       "served a version other than the declared champion (0: it serves it)")
        self.shadow_images = Counter("plantad_shadow_images", description="images the shadow version scored after "
                                     "the answer, by line and whether its decision agreed with the answer's",
                                     tag_keys=("line", "agreement"))
        self.shadow_rejects = Counter("plantad_shadow_rejects", description="shadow-compared images decided "
                                      "anomalous, by line and by the version that decided (champion, shadow)",
                                      tag_keys=("line", "role"))
        self.shadow_latency_ms = Histogram("plantad_shadow_latency_ms", description="ms to score a shadow-compared "
                                           "request, by line and version (champion: in the answer's batch; shadow: "
                                           "after it)", boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("line", "role"))
        self.shadow_dropped = Counter("plantad_shadow_dropped", description="images not shadow-scored because the "
                                      "replica's shadow queue was full, by line", tag_keys=("line",))

        # line health (serving/drift.py): the last test of each line's window in this replica
        self.drift_tests = Counter("plantad_drift_tests", description="drift tests of a line's window by result "
                                   "(drift: p-value at or below serve.drift.alpha)", tag_keys=("line", "result"))
        self.drift_p_value = Gauge("plantad_drift_p_value", description="p-value of the last drift test of the "
                                   "line's window against the version's reference", tag_keys=("line",))
        self.drift_auc = Gauge("plantad_drift_auc", description="AUC of the window's outlier scores against "
                               "held-out normal images' (0.5: like normal, 1: all more unusual)", tag_keys=("line",))
        self.drift_score_shift = Gauge("plantad_drift_score_shift", description="KS distance of the window's "
                                       "probabilities from the reference's normal ones", tag_keys=("line",))
        self.drift_reject_rate = Gauge("plantad_drift_reject_rate", description="share of the window's images "
                                       "decided anomalous", tag_keys=("line",))
        self.drift_reference_reject_rate = Gauge("plantad_drift_reference_reject_rate", description="share of "
                                                 "the reference's normal images at or above the threshold",
                                                 tag_keys=("line",))
        self.drift_window_images = Gauge("plantad_drift_window_images", description="images in the line's window "
                                         "at its last test", tag_keys=("line",))

    def drift(self, line: str, result: WindowDrift) -> None:
        tags = {"line": line}
        self.drift_window_images.set(result.images, tags=tags)
        self.drift_reject_rate.set(result.reject_rate, tags=tags)
        if result.p_value is not None and result.auc is not None:
            self.drift_tests.inc(tags={"line": line, "result": "drift" if result.drifted else "normal"})
            self.drift_p_value.set(result.p_value, tags=tags)
            self.drift_auc.set(result.auc, tags=tags)
        if result.score_shift is not None and result.reference_reject_rate is not None:
            self.drift_score_shift.set(result.score_shift, tags=tags)
            self.drift_reference_reject_rate.set(result.reference_reject_rate, tags=tags)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency_ms.observe(seconds * 1000.0, tags={"route": route})

    def scored(self, probability: float, anomalous: bool, line: str) -> None:
        self.probability.observe(probability, tags={"line": line})
        self.decisions.inc(tags={"decision": "anomalous" if anomalous else "normal", "line": line})

    def holder_state(self, name: str | None, version: str | None, swap_failing: bool) -> None:
        """The served version and whether following the alias fails (Serve's health check calls it
        every few seconds, so the gauges are there without traffic)."""
        self.version(name, version)
        self.swap_error.set(1.0 if swap_failing else 0.0, tags={"model": name or "local"})

    def rollout_state(self, last_known_good: bool, behind_s: float, shadow_dropped: int) -> None:
        self.serving_last_known_good.set(1.0 if last_known_good else 0.0)
        self.behind_declared_s.set(behind_s)

    def version(self, name: str | None, version: str | None) -> None:
        self.model_version.set(float(version) if version and version.isdigit() else 0.0,
                               tags={"model": name or "local"})
