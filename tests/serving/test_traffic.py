"""The shadow scorer uses only what the champion leaves: it waits while a request is being scored,
scores one image at a time, runs at the lowest scheduling priority, and drops (and counts) what
its bounded queue cannot hold."""

from __future__ import annotations

import os
import threading
import time

from PIL import Image

from plantad.serving.predictor import Predictor
from plantad.serving.traffic import ShadowJob, ShadowScorer, TrafficBook


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def _images(demo_root, n: int) -> list[Image.Image]:
    paths = sorted(demo_root.rglob("*.png"))[:n]
    return [Image.open(p).convert("RGB") for p in paths]


def test_the_shadow_scores_only_while_no_request_is_scored_and_at_the_lowest_priority(trained_tiny, demo_root):
    _, result = trained_tiny
    predictor = Predictor.load(str(result.model_path.parent))
    images = _images(demo_root, 3)
    champion = predictor.score(images)
    busy = threading.Event()
    busy.set()  # a champion request is in flight
    results: list[tuple[list, float]] = []
    book = TrafficBook()
    scorer = ShadowScorer(book, size=1, on_result=lambda job, scores, ms: results.append((scores, ms)),
                          idle=lambda: not busy.is_set())
    pair = (predictor.ref.version, predictor.ref.version)
    assert scorer.offer(ShadowJob(predictor, "press-1", images, champion, 5.0, pair))
    time.sleep(0.5)
    assert results == [] and scorer.scored == 0, "the shadow scored while the champion was busy"
    # the first job waits on the thread, the queue holds one more; a third offer is dropped and counted
    assert scorer.offer(ShadowJob(predictor, "press-1", images[:1], champion[:1], 5.0, pair))
    assert not scorer.offer(ShadowJob(predictor, "press-2", images[:2], champion[:2], 5.0, pair))
    assert scorer.dropped == 2
    busy.clear()
    _wait(lambda: len(results) == 2, 60, "the shadow to score the queued jobs once the champion is idle")
    scores, ms = results[0]
    assert [s.probability for s in scores] == [s.probability for s in predictor.score(images)]
    assert ms > 0 and scorer.waited_s >= 0.4
    if os.name == "posix":
        assert scorer.niceness == 19
    _, shadow, _ = book.take()
    assert shadow["press-1"]["images"] == 4 and shadow["press-1"]["agree"] == 4
    assert shadow["press-2"]["dropped"] == 2
