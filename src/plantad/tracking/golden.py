"""Where a version's golden images and expected outputs live: its run's artifacts, under
`golden/v<version>/` (the images as recorded, and expected.json), named by the version tag
`golden_outputs`. A copy of the version elsewhere in the registry keeps the tag and so the record."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plantad.serving.golden import GoldenImage, SelfTestError, expected_outputs
from plantad.tracking.model_source import ModelFetchError, ModelRef

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from plantad.serving.predictor import Predictor

TAG = "golden_outputs"
EXPECTED = "expected.json"


def record_golden(client: MlflowClient, name: str, version: str, run_id: str, predictor: Predictor,
                  images: list[GoldenImage]) -> dict[str, Any]:
    """Score `images` with `predictor` (the version, as torch computes it), store them with the
    outputs in the run's artifacts and tag the version with where they are."""
    expected = expected_outputs(predictor, images)
    path = f"golden/v{version}"
    with tempfile.TemporaryDirectory(prefix="plantad-golden-") as tmp:
        folder = Path(tmp)
        for g in images:
            (folder / g.name).write_bytes(g.data)
        (folder / EXPECTED).write_text(json.dumps(expected, indent=2))
        client.log_artifacts(run_id, str(folder), path)
    client.set_model_version_tag(name, version, TAG, path)
    return expected


def load_golden(client: MlflowClient, ref: ModelRef) -> tuple[list[GoldenImage], dict[str, Any]] | None:
    """The golden images and expected outputs recorded with `ref`; None for a version registered
    without them (before they existed, or by hand)."""
    path = ref.tags.get(TAG)
    if not path or client is None or not ref.run_id:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="plantad-golden-") as tmp:
            local = Path(client.download_artifacts(ref.run_id, path, tmp))
            expected = json.loads((local / EXPECTED).read_text())
            images = [GoldenImage(n, (local / n).read_bytes()) for n in expected["images"]]
    except (KeyError, ValueError) as exc:  # a damaged record: the version is refused, not fetched again
        raise SelfTestError(f"the golden outputs of {ref.describe()} at {path} are unreadable: {exc!r}") from exc
    except Exception as exc:  # MLflow and S3 errors: the store did not deliver
        raise ModelFetchError(f"cannot download the golden outputs of {ref.describe()} at {path}: {exc}") from exc
    return images, expected


def graph_agreement(model_dir: Path, runtime: str, images: list[GoldenImage], expected: dict[str, Any],
                    atol: float) -> str:
    """"agrees" when the serving runtime's network (the exported OpenVINO graph) reproduces the
    recorded torch outputs within `atol`, else "disagrees: ..." naming the images; "torch" needs no graph."""
    from plantad.serving.golden import differences
    from plantad.serving.predictor import Predictor

    if runtime == "torch":
        return "agrees (torch serves)"
    predictor = Predictor.load(str(model_dir), device="cpu", runtime=runtime)
    ran = predictor.info()["runtime"]  # "torch", or "openvino <precision>"
    if ran.split()[0] != runtime:
        return f"disagrees: the {runtime} graph is unusable, scoring fell back to {ran}"
    found = differences(predictor, images, expected, atol)
    return "agrees" if not found else "disagrees: " + "; ".join(found)[:4000]
