"""Save and load a trained model as one self-contained file (weights, calibration, identity).

`model.pt` holds the full state_dict (teacher included, so a random or private teacher travels
with the model), the settings it was built from and the teacher's identity; `model.json` beside
it is the same metadata for people and tools, plus `model_sha256`, the hash of model.pt. Loading
checks that hash before it reads model.pt, reads it with `torch.load(weights_only=True)`, rebuilds
the architecture without touching the network and loads the weights strictly.
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
from plantad.models.noisy_or import FUSION_OFFSET_SCALE, FUSION_SCALE
from plantad.models.safe_load import UnverifiedFileError, file_sha256, load_weights, verify_sha256

FORMAT_VERSION = 1
FUSION_RULES = {  # models/noisy_or.py, as model.json names them
    FUSION_SCALE: "p_k = 1 - exp(-lambda_k s_k); threshold = scoring.threshold_quantile of held-out normal P",
    FUSION_OFFSET_SCALE: "p_k = 1 - exp(-gain softplus((s_k - median_k) / spread_k)) fitted on every second held-out "
                         "normal image; threshold = conformal order statistic ceil((n + 1)(1 - alpha)) of the other "
                         "n held-out normal P",
}
MODEL_FILE = "model.pt"
META_FILE = "model.json"
SHA256_KEY = "model_sha256"  # in model.json: sha256 of model.pt


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
            "median_local": float(nor.median_local),
            "spread_local": float(nor.spread_local),
            "median_semantic": float(nor.median_semantic),
            "spread_semantic": float(nor.spread_semantic),
            "fusion_gain": float(nor.fusion_gain),
            "rule": FUSION_RULES[nor.fusion_rule],
            "false_alarm": nor.guarantee(),
        },
        "settings": settings_to_dict(settings),
        # the line-health reference that calibration fitted (evaluation/drift.py); absent: no drift test
        **({"drift_reference": model.drift_reference} if getattr(model, "drift_reference", None) else {}),
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
    """Write model.pt, then model.json with model.pt's sha256, each atomically: an interrupted save
    never leaves a torn file, and a model.json never names a model.pt that is not on disk."""
    if not model.noisy_or.calibrated:
        raise ValueError("refusing to save an uncalibrated model: run calibration first")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = model_metadata(model, settings, extra)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    blob = {"meta": meta, "state_dict": state}
    if getattr(model, "normal_sample", None) is not None:  # held-out normal images (uint8): int8 calibration
        blob["normal_sample"] = model.normal_sample.detach().cpu()
    _atomic_write(out_dir / MODEL_FILE, lambda p: torch.save(blob, p))
    recorded = {**meta, SHA256_KEY: file_sha256(out_dir / MODEL_FILE)}
    _atomic_write(out_dir / META_FILE, lambda p: Path(p).write_text(json.dumps(recorded, indent=2)))
    return out_dir / MODEL_FILE


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[AnomalyModel, dict[str, Any]]:
    """Rebuild a saved model (a model directory or its model.pt) in eval mode on `device`.

    model.pt must match the sha256 in the model.json beside it; it is read with weights_only=True."""
    from plantad.models.factory import build_model

    file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ModelLoadError(f"no saved model at {file}: expected the model.pt written by `plantad train`")
    meta_file = file.parent / META_FILE
    expected = recorded_sha256(meta_file)
    if expected is None:
        raise ModelLoadError(f"refusing to load {file}: {meta_file} records no '{SHA256_KEY}' to check it against "
                             "(a model saved before hashes were recorded, or model.json is missing); train or "
                             "re-save the model with this version of plantad")
    try:
        verify_sha256(file, expected, f"{meta_file} ({SHA256_KEY})")
        blob = load_weights(file)
    except UnverifiedFileError as exc:
        raise ModelLoadError(str(exc)) from exc
    except Exception as exc:  # torch's errors for truncated or foreign files
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
    model.normal_sample = blob.get("normal_sample")  # None for a model saved before samples were kept
    return model.to(device).eval(), meta


def recorded_sha256(meta_file: Path) -> str | None:
    """model.pt's hash as model.json records it; None when model.json is absent or has none
    (models saved before hashes were recorded: re-save them to load them)."""
    if not meta_file.is_file():
        return None
    try:
        value = json.loads(meta_file.read_text()).get(SHA256_KEY)
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{meta_file} is not the JSON object written by `plantad train`: {exc}") from exc
    return value if isinstance(value, str) else None


def _identity_from_meta(d: dict[str, Any]):
    from plantad.models.teacher import TeacherIdentity

    return TeacherIdentity(d["name"], d["weights"], d["source"], d.get("sha256"), d.get("timm_kwargs", {}))
