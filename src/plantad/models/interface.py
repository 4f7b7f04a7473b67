"""The one interface every anomaly model implements, whatever `model.method` built it.

Training, scoring, checkpoints, the MLflow pyfunc model and serving see only this: an image size,
a forward pass (loss terms in training mode, raw scores in eval mode), the Noisy-OR calibration
buffers, the teacher's identity and the method's own metadata and image-score rule. Nothing
outside `plantad.models` branches on the method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from plantad.config import ScoringConfig
from plantad.models.noisy_or import NoisyOr
from plantad.models.teacher import TeacherIdentity


class LossTerms(NamedTuple):
    total: torch.Tensor
    local: torch.Tensor | None
    semantic: torch.Tensor | None
    weight_local: float
    weight_semantic: float


class RawScores(NamedTuple):
    patch_distance: torch.Tensor | None  # (B, h, w) distance per map cell, local branch
    semantic: torch.Tensor | None  # (B,) semantic distance
    # (B, C) what the teacher sees of each image (final class token, else the mean of its deepest
    # patch tokens read): the line-health drift statistic compares these with the version's reference
    embedding: torch.Tensor | None = None


class HasIdentity(Protocol):
    identity: TeacherIdentity


@runtime_checkable
class AnomalyModel(Protocol):
    """What `build_model` returns for every method (a plain nn.Module with these members)."""

    image_size: int  # input side the model expects (images are (B, 3, S, S))
    teacher: HasIdentity  # frozen; its identity travels in the saved metadata
    noisy_or: NoisyOr  # calibration lambdas and the decision threshold, as buffers
    # which optimiser trains the students (TrainConfig.optimizer): Dinomaly's AdamW or RD4AD's Adam
    optimizer_recipe: Literal["dinomaly", "rd4ad"]

    def __call__(self, x: torch.Tensor, easy_fraction: float = 0.0, easy_factor: float = 1.0) -> LossTerms | RawScores:
        """Training mode: the loss terms; eval mode: the raw scores."""
        ...

    def student_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters per student: every one of them gets a gradient in each step (DDP)."""
        ...

    def image_score(self, anomaly_map: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
        """(B, S, S) smoothed map -> (B,) raw local image score, by the method's own rule."""
        ...

    def describe(self) -> dict[str, Any]:
        """Method-specific facts for the saved metadata (map and image-score rules, students)."""
        ...

    # the nn.Module members the rest of the code uses
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...


def check_anomaly_model(model: object) -> AnomalyModel:
    """`model` itself, after checking it has the interface's members (names the missing ones)."""
    missing = [m for m in ("image_size", "teacher", "noisy_or", "optimizer_recipe", "student_parameter_groups",
                           "image_score", "describe") if not hasattr(model, m)]
    if missing:
        raise TypeError(f"{type(model).__name__} does not implement AnomalyModel: missing {missing}")
    return model  # type: ignore[return-value]
