"""Save and load a trained model as one self-contained file (weights, calibration, identity).

`model.pt` holds the full state_dict (teacher included, so a random or private teacher travels
with the model), the settings it was built from and the teacher's identity; `model.json` beside
it is the same metadata for people and tools. Loading rebuilds the architecture without touching
the network and loads the weights strictly.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import plantad
from plantad.config import Settings, settings_from_dict, settings_to_dict
from plantad.models.interface import AnomalyModel

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
META_FILE = "model.json"


class ModelLoadError(RuntimeError):
    """A model directory that is missing, incomplete or from an incompatible version."""


def model_metadata(model: AnomalyModel, settings: Settings, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    nor = model.noisy_or
    return {
        "format_version": FORMAT_VERSION,
        "plantad_version": plantad.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "method": settings.model.method,
        "branches": settings.model.branches,
        "image_size": settings.data.image_size,
        "teacher": model.teacher.identity.as_dict(),
        "model": model.describe(),
        "calibration": {
            "lambda_local": float(nor.lambda_local),
            "lambda_semantic": float(nor.lambda_semantic),
            "threshold": float(nor.threshold),
            "rule": "p_k = 1 - exp(-lambda_k s_k); threshold = scoring.threshold_quantile of held-out normal P",
        },
        "settings": settings_to_dict(settings),
        **(extra or {}),
    }


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: AnomalyModel, settings: Settings, out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write model.pt and model.json atomically; an interrupted save never leaves a torn file."""
    if not model.noisy_or.calibrated:
        raise ValueError("refusing to save an uncalibrated model: run calibration first")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = model_metadata(model, settings, extra)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_write(out_dir / MODEL_FILE, lambda p: torch.save({"meta": meta, "state_dict": state}, p))
    _atomic_write(out_dir / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return out_dir / MODEL_FILE


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[AnomalyModel, dict[str, Any]]:
    """Rebuild a saved model (a model directory or its model.pt) in eval mode on `device`."""
    from plantad.models.factory import build_model

    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"no saved model at {file}: expected the model.pt written by `plantad train`")
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{file} is not a readable plantad model: {exc}") from exc
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{file} has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    settings = settings_from_dict(meta["settings"], source=str(file))
    model = build_model(settings, load_teacher_weights=False)
    model.teacher.identity = _identity_from_meta(meta["teacher"])
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {file} do not fit the architecture in its metadata: {exc}") from exc
    return model.to(device).eval(), meta


def _identity_from_meta(d: dict[str, Any]):
    from plantad.models.teacher import TeacherIdentity

    return TeacherIdentity(d["name"], d["weights"], d["source"], d.get("sha256"), d.get("timm_kwargs", {}))
