"""What a replica counts of its live traffic for the rollout controller, and its shadow scorer.

Counts are kept as deltas and handed to the controller every `serve.rollout.follow_s` (`take`), so
the controller sums every replica's traffic. The shadow scorer runs after the champion's answer is
sent, on its own thread with a bounded queue: it never changes or fails an answer, and what it
cannot keep up with is dropped and counted. So that it does not slow the answers either, it uses
only CPU the champion leaves: it starts an image only while no request is being scored on the
replica, and its thread (with the torch threads it starts) runs at the lowest scheduling priority.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from plantad.serving.predictor import ImageScore, Predictor, Prepared

log = logging.getLogger(__name__)


class TrafficBook:
    """Canary counts by role (champion, canary) and shadow sums by line, since the last `take`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._canary: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._shadow: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.pair: tuple[str | None, str | None] = (None, None)

    def scored(self, role: str, scores: list[ImageScore]) -> None:
        with self._lock:
            c = self._canary[role]
            c["images"] += len(scores)
            c["rejects"] += sum(1 for s in scores if s.is_anomalous)

    def failed(self, role: str, images: int) -> None:
        with self._lock:
            c = self._canary[role]
            c["images"] += images
            c["errors"] += images

    def shadowed(self, line: str, pair: tuple[str | None, str | None], champion: list[ImageScore],
                 shadow: list[ImageScore], champion_ms: float, shadow_ms: float) -> None:
        with self._lock:
            if pair != self.pair:  # another shadow or champion: the old sums are for another comparison
                self._shadow.clear()
                self.pair = pair
            s = self._shadow[line]
            for a, b in zip(champion, shadow):
                s["images"] += 1
                s["agree"] += a.is_anomalous == b.is_anomalous
                s["champion_rejects"] += a.is_anomalous
                s["shadow_rejects"] += b.is_anomalous
                x, y = a.probability, b.probability
                s["sx"] += x
                s["sy"] += y
                s["sxx"] += x * x
                s["syy"] += y * y
                s["sxy"] += x * y
            s["champion_ms"] += champion_ms
            s["shadow_ms"] += shadow_ms

    def dropped(self, line: str, images: int) -> None:
        with self._lock:
            self._shadow[line]["dropped"] += images

    def take(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]], tuple[str | None, str | None]]:
        with self._lock:
            canary = {k: dict(v) for k, v in self._canary.items()}
            shadow = {k: dict(v) for k, v in self._shadow.items()}
            self._canary.clear()
            self._shadow.clear()
            return canary, shadow, self.pair


@dataclass(frozen=True)
class ShadowJob:
    predictor: Predictor
    line: str
    images: list[Image.Image | Prepared]  # a replica's are prepared on its decode threads
    champion: list[ImageScore]
    champion_ms: float
    pair: tuple[str | None, str | None]


class ShadowScorer:
    """Scores queued images with the shadow version on one background thread, in the champion's
    idle time: an image starts only when `idle()` says no request is being scored."""

    def __init__(self, book: TrafficBook, size: int, on_result: Any = None,
                 idle: Callable[[], bool] | None = None, idle_poll_s: float = 0.002) -> None:
        self.book, self.on_result = book, on_result
        self.idle = idle if idle is not None else (lambda: True)
        self.idle_poll_s = idle_poll_s
        self._queue: queue.Queue[ShadowJob] = queue.Queue(maxsize=size)
        self.dropped = 0
        self.scored = 0
        self.waited_s = 0.0  # time spent waiting for the champion to be idle
        self.niceness: int | None = None  # this thread's nice value once lowered; None where it cannot be
        self._thread = threading.Thread(target=self._run, name="plantad-shadow", daemon=True)
        self._thread.start()

    def offer(self, job: ShadowJob) -> bool:
        """Queue `job` unless the queue is full (then it is dropped and counted); never blocks."""
        try:
            self._queue.put_nowait(job)
            return True
        except queue.Full:
            self.dropped += len(job.images)
            self.book.dropped(job.line, len(job.images))
            return False

    def _lower_priority(self) -> None:
        """Nice 19 for this thread, so under contention the champion's threads get the cores (Linux:
        nice is per thread). In a replica it runs torch on this one thread: the forward thread holds
        the process's only OpenMP team (plantad.serving.forward)."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            self.niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        except (AttributeError, OSError) as exc:  # not Linux, or not allowed: idle gating still holds
            log.warning("the shadow thread keeps its scheduling priority: %s", exc)

    def _wait_idle(self) -> None:
        started = time.perf_counter()
        while not self.idle():
            time.sleep(self.idle_poll_s)
        self.waited_s += time.perf_counter() - started

    def _score(self, job: ShadowJob) -> tuple[list[ImageScore], float]:
        """One image at a time, each started in the champion's idle time; returns the scores and the
        milliseconds spent computing them (waits excluded)."""
        scores: list[ImageScore] = []
        ms = 0.0
        for image in job.images:
            self._wait_idle()
            started = time.perf_counter()
            scores.extend(job.predictor.score([image]))
            ms += (time.perf_counter() - started) * 1000.0
        return scores, ms

    def _run(self) -> None:
        self._lower_priority()
        while True:
            job = self._queue.get()
            try:
                scores, ms = self._score(job)
            except Exception:  # a failing shadow is the shadow's problem: logged, never answered
                log.exception("shadow %s failed on %d image(s) of line %r", job.predictor.ref.describe(),
                              len(job.images), job.line)
                continue
            self.book.shadowed(job.line, job.pair, job.champion, scores, job.champion_ms, ms)
            self.scored += len(scores)
            if self.on_result is not None:
                try:
                    self.on_result(job, scores, ms)
                except Exception:  # metrics must not stop the shadow thread
                    log.exception("recording the shadow result of line %r failed", job.line)
