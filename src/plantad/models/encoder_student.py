"""Encoder-encoder student S_E (semantic branch): a ViT trained from scratch on the teacher's
class token [read]. Distilling only the class token is sparse supervision, so the student cannot
learn an identity map of the image; optionally the mean patch token is regressed too
[reconstructed, `model.encoder.distill_patch_mean`].

`model.encoder.image_size` [reconstructed, a speed lever] lets the paper's S_E see the image
downscaled (`Downscale`) while its target stays the teacher's class token from the full-size pass:
a ViT's cost grows with its token count, and the class token is an image-level target.

Two forms, chosen by `model.encoder.shared_blocks`:
- 0, `EncoderStudent`: the paper's S_E, a whole ViT of the teacher's architecture on the image.
- k > 0, `SharedEncoderStudent` [reconstructed, a speed lever]: S_E reads the teacher's tokens after
  its first k blocks (frozen patch embedding and blocks, from the teacher forward that runs anyway)
  and trains only its own upper blocks from scratch. It still learns the path to the class token
  from normal images only, which is what makes it fail on unseen semantics; it costs
  `depth` blocks instead of a whole second ViT.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from plantad.config import EncoderConfig, TeacherConfig
from plantad.models.class_token import final_class_token


class EncoderOutput(NamedTuple):
    cls: torch.Tensor  # (B, C)
    patch_mean: torch.Tensor | None  # (B, C); None unless model.encoder.distill_patch_mean reads it


def _vit(teacher_cfg: TeacherConfig, image_size: int, depth: int | None) -> nn.Module:
    kwargs: dict[str, Any] = dict(teacher_cfg.timm_kwargs)
    if depth is not None:
        kwargs["depth"] = depth
    return timm.create_model(teacher_cfg.name, pretrained=False, img_size=image_size, num_classes=0, **kwargs)


def _resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in): torch's antialiased bilinear resize along one axis, as a linear map."""
    basis = torch.eye(size_in).reshape(size_in, 1, 1, size_in)  # each input pixel alone, as a 1-row image
    rows = F.interpolate(basis, size=(1, size_out), mode="bilinear", antialias=True, align_corners=False)
    return rows.reshape(size_in, size_out).T.contiguous()


class Downscale(nn.Module):
    """Antialiased bilinear downscaling of square images, as two matrix products. It equals torch's
    `interpolate(..., antialias=True)`, which is separable, and unlike that op it exports to ONNX and
    OpenVINO (their converters have no antialiased resize)."""

    def __init__(self, size_in: int, size_out: int) -> None:
        super().__init__()
        self.size_out = size_out
        # recomputed from the sizes, so not part of the state dict (saved models stay the same)
        self.register_buffer("matrix", _resize_matrix(size_in, size_out), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, H) -> (B, C, size_out, size_out)
        m = self.matrix.to(x.dtype)
        return m @ x @ m.T


class EncoderStudent(nn.Module):
    """The paper's S_E: same timm architecture as the teacher (depth overridable), random init, own
    weights, run on the image (downscaled to `model.encoder.image_size` when set)."""

    def __init__(self, cfg: EncoderConfig, teacher_cfg: TeacherConfig, image_size: int, patch_size: int) -> None:
        super().__init__()
        view = cfg.image_size or image_size
        if view > image_size or view % patch_size:
            raise ValueError(f"model.encoder.image_size={view} must be a multiple of the teacher's patch size "
                             f"({patch_size}) and at most the model's input size (data.image_size {image_size})")
        self.view_size = view
        self.downscale = Downscale(image_size, view) if view != image_size else None
        self.vit = _vit(teacher_cfg, view, cfg.depth)
        self.num_prefix_tokens: int = self.vit.num_prefix_tokens
        self.patch_mean = cfg.distill_patch_mean

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        if self.downscale is not None:
            x = self.downscale(x)
        if not self.patch_mean:  # the class token alone; its last block runs for that token only
            v = self.vit  # forward_features' steps up to its blocks
            tokens = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
            return EncoderOutput(final_class_token(v.blocks, v.norm, tokens), None)
        tokens = self.vit.forward_features(x)  # (B, P+N, C), normalised like the teacher's output
        return EncoderOutput(tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1))


class SharedEncoderStudent(nn.Module):
    """S_E on the teacher's tokens after its first `shared_blocks` blocks: the teacher's block type,
    `depth` of them (default: the teacher's remaining blocks) and a final norm, from scratch."""

    def __init__(self, cfg: EncoderConfig, teacher_cfg: TeacherConfig, image_size: int, teacher_depth: int) -> None:
        super().__init__()
        depth = cfg.depth if cfg.depth is not None else teacher_depth - cfg.shared_blocks
        if depth < 1:
            raise ValueError(f"model.encoder.shared_blocks={cfg.shared_blocks} leaves S_E no block of its own "
                             f"(teacher depth {teacher_depth}); lower it or set model.encoder.depth")
        vit = _vit(teacher_cfg, image_size, depth)  # only its blocks and final norm are kept
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.patch_mean = cfg.distill_patch_mean

    def forward(self, tokens: torch.Tensor) -> EncoderOutput:
        if not self.patch_mean:  # the class token alone; the last block runs for that token only
            return EncoderOutput(final_class_token(self.blocks, self.norm, tokens), None)
        x = self.norm(self.blocks(tokens))  # (B, P+N, C)
        return EncoderOutput(x[:, 0], x[:, self.num_prefix_tokens :].mean(dim=1))
