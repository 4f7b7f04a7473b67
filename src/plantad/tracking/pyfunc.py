"""MLflow pyfunc wrapper: any MLflow consumer can score encoded images with a registered model.

Input: a DataFrame with a binary column `image` (PNG/JPEG/... bytes). Output: one row per image
with the scores of `plantad.scoring.score_batch` (the same function the server uses). The
optional `threshold` param overrides the stored decision threshold at inference time (a negative
value, the signature's default, means "use the stored one").
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

SCORE_COLUMNS = ["probability", "is_anomalous", "p_local", "p_semantic", "local_score", "semantic_score", "threshold"]


class PlantadPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from plantad.config import settings_from_dict
        from plantad.data.images import ImageTransform
        from plantad.models.checkpoint import load_model

        self.model, self.meta = load_model(Path(context.artifacts["model_dir"]))
        self.settings = settings_from_dict(self.meta["settings"], source="mlflow model")
        self.transform = ImageTransform(self.settings.data.image_size)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from plantad.data.images import decode_image_bytes
        from plantad.scoring import score_batch

        if "image" not in model_input.columns:
            raise ValueError(f"input needs a binary column 'image'; got columns {list(model_input.columns)}")
        threshold = (params or {}).get("threshold")
        threshold = None if threshold is None or float(threshold) < 0 else float(threshold)
        images = [self.transform(decode_image_bytes(bytes(b), source=f"row {i}")) for i, b in enumerate(model_input["image"])]
        out = score_batch(self.model, torch.stack(images), self.settings.scoring, threshold=threshold)
        thr = float(self.model.noisy_or.threshold) if threshold is None else float(threshold)
        return scores_frame(out, thr)


def scores_frame(out: Any, threshold: float) -> pd.DataFrame:
    n = out.probability.shape[0]
    nan = np.full(n, np.nan)
    col = lambda t: nan if t is None else t.cpu().numpy().astype(float)  # noqa: E731
    return pd.DataFrame({
        "probability": col(out.probability),
        "is_anomalous": out.is_anomalous.cpu().numpy().astype(bool),
        "p_local": col(out.p_local),
        "p_semantic": col(out.p_semantic),
        "local_score": col(out.local_score),
        "semantic_score": col(out.semantic_score),
        "threshold": np.full(n, threshold),
    })


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def log_pyfunc_model(model_dir: Path, example_png: bytes, name: str = "model"):
    """Log the model directory as a pyfunc model in the active run; returns MLflow's ModelInfo."""
    from mlflow.models import infer_signature

    example = pd.DataFrame({"image": [example_png]})
    signature = infer_signature(example, pd.DataFrame({c: [0.0] for c in SCORE_COLUMNS}).astype({"is_anomalous": bool}),
                                params={"threshold": -1.0})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=PlantadPyfunc(),
        artifacts={"model_dir": str(model_dir)},
        input_example=example,
        signature=signature,
        pip_requirements=["plantad"],
    )
