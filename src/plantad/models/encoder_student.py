"""Encoder-encoder student S_E (semantic branch): a ViT trained from scratch on the teacher's
class token [read]. Distilling only the class token is sparse supervision, so the student cannot
learn an identity map of the image; optionally the mean patch token is regressed too
[reconstructed, `model.encoder.distill_patch_mean`].
"""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from torch import nn

from plantad.config import EncoderConfig, TeacherConfig


class EncoderOutput(NamedTuple):
    cls: torch.Tensor  # (B, C)
    patch_mean: torch.Tensor  # (B, C)


class EncoderStudent(nn.Module):
    """Same timm architecture as the teacher (depth overridable), random init, own weights."""

    def __init__(self, cfg: EncoderConfig, teacher_cfg: TeacherConfig, image_size: int) -> None:
        super().__init__()
        kwargs = dict(teacher_cfg.timm_kwargs)
        if cfg.depth is not None:
            kwargs["depth"] = cfg.depth
        self.vit = timm.create_model(teacher_cfg.name, pretrained=False, img_size=image_size, num_classes=0, **kwargs)
        self.num_prefix_tokens: int = self.vit.num_prefix_tokens

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        tokens = self.vit.forward_features(x)  # (B, P+N, C), normalised like the teacher's output
        return EncoderOutput(tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1))
