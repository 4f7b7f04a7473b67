"""A version's expected answers on a few golden images, recorded at registration and compared on load.

A replica that loads a version (torch or its exported OpenVINO graph, on whatever CPU or GPU it
has) scores the same images and must land within `serve.rollout.golden_atol` of every recorded
probability; otherwise the version is refused with the images and differences named. This catches
what a file hash cannot: a wrong runtime, a graph that disagrees with its torch forward, a device
whose kernels differ, a version whose recorded outputs are not its own.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from plantad.serving.predictor import ImageScore, Predictor

PACKAGED = "golden.png"
COMPARED = ("probability", "p_local", "p_semantic")  # None for an absent branch on both sides


class SelfTestError(RuntimeError):
    """A newly loaded version whose answers on the golden images are unusable or not its own."""


@dataclass(frozen=True)
class GoldenImage:
    name: str
    data: bytes  # the encoded file, as recorded with the version

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)).convert("RGB")


def golden_images(extra: list[str] | None = None) -> list[GoldenImage]:
    """The packaged demo image, then the user's own (`serve.golden_image`), by file name."""
    images = [GoldenImage(PACKAGED, resources.files("plantad.serving").joinpath(PACKAGED).read_bytes())]
    for path in extra or []:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"golden image {p} does not exist")
        images.append(GoldenImage(p.name if p.name != PACKAGED else f"user-{p.name}", p.read_bytes()))
    return images


def _row(score: ImageScore) -> dict[str, float | None]:
    return {name: getattr(score, name) for name in COMPARED}


def expected_outputs(predictor: Predictor, images: list[GoldenImage]) -> dict[str, Any]:
    """What `predictor` answers on `images`: recorded with the version at registration."""
    scores = predictor.score([g.image() for g in images])
    return {"runtime": predictor.info()["runtime"], "device": str(predictor.device),
            "images": {g.name: _row(s) for g, s in zip(images, scores)}}


def differences(predictor: Predictor, images: list[GoldenImage], expected: dict[str, Any],
                atol: float) -> list[str]:
    """One line per golden image and output where `predictor` is off by more than `atol` (empty: agrees)."""
    recorded = expected.get("images", {})
    missing = [g.name for g in images if g.name not in recorded]
    if missing:
        return [f"no recorded output for {missing}"]
    scores = predictor.score([g.image() for g in images])
    found = []
    for g, score in zip(images, scores):
        for name, got in _row(score).items():
            want = recorded[g.name].get(name)
            if (got is None) != (want is None):
                found.append(f"{g.name} {name}: {got} instead of {want}")
            elif got is not None and not (math.isfinite(got) and abs(got - want) <= atol):
                found.append(f"{g.name} {name}: {got:.5f} instead of {want:.5f} (|diff| {abs(got - want):.5f} > {atol})")
    return found


def self_test(predictor: Predictor, images: list[GoldenImage], expected: dict[str, Any] | None,
              atol: float) -> str:
    """Refuse a version whose answers are unusable (not finite, not in [0, 1], not repeatable) or,
    when outputs were recorded with it, not within `atol` of them; returns what was checked."""
    first = images[0].image()
    a, b = predictor.score([first, first.copy()])
    p = a.probability
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise SelfTestError(f"{predictor.ref.describe()} gives probability {p} on the golden image {images[0].name}")
    if abs(p - b.probability) > 1e-5:
        raise SelfTestError(f"{predictor.ref.describe()} is not deterministic on the golden image "
                            f"({p} then {b.probability})")
    if expected is None:
        return "no recorded outputs: finite, in [0, 1] and repeatable"
    found = differences(predictor, [g for g in images if g.name in expected.get("images", {})] or images,
                        expected, atol)
    if found:
        raise SelfTestError(f"{predictor.ref.describe()} does not reproduce its recorded golden outputs "
                            f"({expected.get('runtime')} on {expected.get('device')}): " + "; ".join(found))
    return f"{len(expected['images'])} golden image(s) within {atol} of the recorded outputs"
