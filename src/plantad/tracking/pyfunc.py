"""MLflow pyfunc wrapper: any MLflow consumer can score encoded images with a registered model.

Input: a DataFrame with a binary column `image` (PNG/JPEG/... bytes). Output: one row per image
with the scores of `plantad.scoring.score_batch` (the same function the server uses). The
optional `threshold` param overrides the stored decision threshold at inference time (a negative
value, the signature's default, means "use the stored one").

The model ships the plantad package itself (MLflow `code_paths`: the package folder is copied to
the model's `code/` folder, which MLflow puts first on sys.path before it loads the model), and
its pip requirements are plantad's runtime dependencies and MLflow pinned to the versions installed
when it was logged, all served by PyPI. So `mlflow models serve -m models:/<name>@champion` works in
an environment that never installed plantad. It is logged as "models from code"
(pyfunc_model.py), not as a cloudpickled object.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

SCORE_COLUMNS = ["probability", "is_anomalous", "p_local", "p_semantic", "local_score", "semantic_score", "threshold"]


class PlantadPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from plantad.serving.predictor import Predictor

        self.predictor = Predictor.load(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from plantad.data.images import decode_image_bytes

        if "image" not in model_input.columns:
            raise ValueError(f"input needs a binary column 'image'; got columns {list(model_input.columns)}")
        threshold = (params or {}).get("threshold")
        threshold = None if threshold is None or float(threshold) < 0 else float(threshold)
        images = [decode_image_bytes(bytes(b), source=f"row {i}") for i, b in enumerate(model_input["image"])]
        return scores_frame(self.predictor.score(images, threshold))


def scores_frame(scores: list[Any]) -> pd.DataFrame:
    """One row per ImageScore, the columns of SCORE_COLUMNS; an absent branch is NaN."""
    def col(name: str) -> np.ndarray:
        return np.array([np.nan if getattr(s, name) is None else getattr(s, name) for s in scores], dtype=float)

    frame = pd.DataFrame({name: col(name) for name in SCORE_COLUMNS if name != "is_anomalous"})
    frame.insert(1, "is_anomalous", np.array([s.is_anomalous for s in scores], dtype=bool))
    return frame[SCORE_COLUMNS]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _public_version(version: str) -> str:
    """`2.14.1+cpu` -> `2.14.1`: a local version label names a build that PyPI does not serve."""
    return version.split("+", 1)[0]


def runtime_requirements() -> list[str]:
    """`name==version` for plantad's runtime dependencies (pyproject `dependencies`, no extras) and
    MLflow, as installed now; plantad itself is shipped as code, not as a requirement."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        declared = [Requirement(r) for r in requires("plantad") or []]
    except PackageNotFoundError as exc:
        raise RuntimeError("plantad is not installed as a distribution, so its runtime dependencies are "
                           "unknown: install it with `pip install -e .` before logging a model") from exc
    names = [r.name for r in declared if r.marker is None] + ["mlflow"]  # extras carry an `extra ==` marker
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={_public_version(version(name))}")
        except PackageNotFoundError as exc:
            raise RuntimeError(f"plantad depends on '{name}', which is not installed here") from exc
    return pins


def package_dir() -> Path:
    """The folder of the imported plantad package (src/plantad in an editable install)."""
    import plantad

    return Path(plantad.__file__).resolve().parent


def log_pyfunc_model(model_dir: Path, example_png: bytes, name: str = "model"):
    """Log the model directory as a pyfunc model in the active run; returns MLflow's ModelInfo."""
    from mlflow.models import infer_signature

    example = pd.DataFrame({"image": [example_png]})
    signature = infer_signature(example, pd.DataFrame({c: [0.0] for c in SCORE_COLUMNS}).astype({"is_anomalous": bool}),
                                params={"threshold": -1.0})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"model_dir": str(model_dir)},
        input_example=example,
        signature=signature,
        pip_requirements=runtime_requirements(),
        code_paths=[str(package_dir())],
    )
