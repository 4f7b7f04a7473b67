"""The model factory: `model.method` -> the nn.Module that implements models/interface.py."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from plantad.config import ModelConfig, Settings
from plantad.models.interface import AnomalyModel, check_anomaly_model


def _builders() -> dict[str, Callable[[ModelConfig, int, bool], nn.Module]]:
    from plantad.models.dual import DualStudentModel
    from plantad.models.dual_snl import DualSNLModel
    from plantad.models.snl import SNLModel

    return {"dual": DualStudentModel, "dual_snl": DualSNLModel, "snl_rd": SNLModel, "snl_fd": SNLModel}


def build_model(settings: Settings, load_teacher_weights: bool = True) -> AnomalyModel:
    """The configured method's model (plain nn.Module, teacher frozen); `load_teacher_weights=False`
    builds the bare architecture for a saved model that brings its own weights.

    The teacher reads local files only: remote weights (s3://, models:/, runs:/) are fetched into a
    verified local file by the caller first (training does it through
    `plantad.tracking.teacher_weights.build_model_with_teacher_weights`); given one, it refuses."""
    builders = _builders()
    method = settings.model.method
    if method not in builders:
        raise ValueError(f"unknown model.method {method!r} (known: {', '.join(builders)})")
    return check_anomaly_model(builders[method](settings.model, settings.data.image_size, load_teacher_weights))
