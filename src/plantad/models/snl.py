"""Structural teacher-student normality learning (SNL, Deng and Li, arXiv 2402.17091):
`model.method` snl_rd (reverse distillation student) or snl_fd (feature distillation student).

[read] A student trained with the four structural losses (models/structural.py), a CRAM after
each student block feeding the next one; test-time map = channel distance + intra-affinity
distance per compared layer; RD4AD's maps are summed over layers after upsampling and its image
score is the maximum of the map. The teacher is the paper's CNN (`model.snl.teacher: cnn`,
WideResNet-50 stages 1-3) or, as well, the DINOv2 ViT of `model.teacher` (`vit`).
[reconstructed] With the ViT teacher, the FD student is a ViT of the teacher's architecture from
scratch with a CRAM after every block; the RD student is the Dinomaly-style decoder of
models/decoder_student.py (noisy bottleneck, one block per compared layer, reversed) with a CRAM
after every decoder block. The CNN students are in models/cnn.py.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from plantad.config import ModelConfig, ScoringConfig, SNLConfig
from plantad.models.cnn import CNNTeacher, ResNetFDStudent, ResNetRDStudent
from plantad.models.decoder_student import DecoderStudent
from plantad.models.interface import LossTerms, RawScores
from plantad.models.noisy_or import NoisyOr
from plantad.models.structural import CRAM, structural_loss, structural_map, to_tokens
from plantad.models.teacher import Teacher, TeacherFeatures


def with_crams(blocks: nn.ModuleList, dim: int, cfg: SNLConfig) -> nn.ModuleList:
    """Each block followed by its own CRAM (the block's output, aggregated, feeds the next block)."""
    if not cfg.cram:
        return blocks
    return nn.ModuleList(nn.Sequential(b, CRAM(dim, cfg.num_centers, cfg.cram_residual_weight)) for b in blocks)


class ViTFDStudent(nn.Module):
    """The teacher's ViT from scratch with a CRAM after every block; blocks after the last compared
    layer, the final norm and the head are pruned (nothing runs without a gradient)."""

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        self.vit = timm.create_model(cfg.teacher.name, pretrained=False, img_size=image_size, num_classes=0,
                                     **cfg.teacher.timm_kwargs)
        self.layers = list(cfg.teacher.layers)
        self.vit.prune_intermediate_layers(self.layers, prune_norm=True, prune_head=True)
        dim = self.vit.embed_dim
        self.crams = nn.ModuleList(CRAM(dim, cfg.snl.num_centers, cfg.snl.cram_residual_weight)
                                   for _ in self.vit.blocks) if cfg.snl.cram else None

    def forward(self, x: torch.Tensor, feats: TeacherFeatures) -> list[torch.Tensor]:
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        out = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if self.crams is not None:
                x = self.crams[i](x)
            if i in self.layers:
                out.append(x[:, vit.num_prefix_tokens :])  # (B, N, C) patch tokens
        return out


class ViTRDStudent(nn.Module):
    def __init__(self, cfg: ModelConfig, teacher: Teacher) -> None:
        super().__init__()
        singles = [[i] for i in range(len(teacher.layers))]
        self.decoder = DecoderStudent(cfg.decoder, teacher.embed_dim, len(teacher.layers), singles,
                                      cfg.decoder.num_heads or teacher.num_heads, teacher.num_prefix_tokens)
        self.decoder.blocks = with_crams(self.decoder.blocks, teacher.embed_dim, cfg.snl)

    def forward(self, x: torch.Tensor, feats: TeacherFeatures) -> list[torch.Tensor]:
        return self.decoder(feats.layers, feats.prefix)


def build_snl_teacher(cfg: ModelConfig, image_size: int, load_weights: bool) -> nn.Module:
    if cfg.snl.teacher == "cnn":
        return CNNTeacher(cfg.snl.cnn_teacher, load_weights)
    return Teacher(cfg.teacher, image_size, load_weights, final=False)  # SNL compares layers only


def build_snl_student(cfg: ModelConfig, teacher: nn.Module, image_size: int) -> nn.Module:
    rd = cfg.method == "snl_rd"
    if isinstance(teacher, CNNTeacher):
        return ResNetRDStudent(cfg.snl.cnn_teacher, cfg.snl) if rd else ResNetFDStudent(cfg.snl.cnn_teacher, cfg.snl)
    return ViTRDStudent(cfg, teacher) if rd else ViTFDStudent(cfg, image_size)


class SNLModel(nn.Module):
    """Frozen teacher + one SNL student; the Noisy-OR buffers hold the local branch's calibration."""

    optimizer_recipe = "rd4ad"  # SNL's FD / RD students train with RD4AD's Adam (train.snl_optimizer)

    def __init__(self, cfg: ModelConfig, image_size: int, load_teacher_weights: bool = True) -> None:
        super().__init__()
        if cfg.method not in ("snl_rd", "snl_fd"):
            raise ValueError(f"SNLModel cannot build model.method={cfg.method!r}")
        self.cfg, self.image_size = cfg, image_size
        self.teacher = build_snl_teacher(cfg, image_size, load_teacher_weights)
        self.student = build_snl_student(cfg, self.teacher, image_size)
        self.noisy_or = NoisyOr(cfg.noisy_or)

    def student_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"local": [p for p in self.student.parameters() if p.requires_grad]}

    def feature_pairs(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Per compared layer: teacher tokens, student tokens (B, N, C, float32) and the (h, w) grid."""
        feats = self.teacher(x)
        if isinstance(feats, TeacherFeatures):
            teacher, grids = feats.layers, [tuple(self.teacher.grid)] * len(feats.layers)
        else:
            teacher, grids = feats, [tuple(f.shape[-2:]) for f in feats]
        student = self.student(x, feats)
        return [(to_tokens(t).float(), to_tokens(s).float(), g) for t, s, g in zip(teacher, student, grids)]

    def forward(self, x: torch.Tensor, easy_fraction: float = 0.0, easy_factor: float = 1.0) -> LossTerms | RawScores:
        pairs = self.feature_pairs(x)
        if self.training:
            loss = torch.stack([structural_loss(t, s, self.cfg.snl) for t, s, _ in pairs]).mean()
            return LossTerms(loss, loss, None, 1.0, 0.0)
        return RawScores(self.anomaly_map(pairs), None, pairs[-1][0].mean(dim=1))  # deepest teacher layer's mean token

    def anomaly_map(self, pairs: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]) -> torch.Tensor:
        """Sum over layers of the per-layer structural map, upsampled to the finest grid: (B, h, w)."""
        size = max((g for _, _, g in pairs), key=lambda g: g[0] * g[1])
        maps = []
        for t, s, (h, w) in pairs:
            m = structural_map(t, s, self.cfg.snl.map_intra_weight).reshape(t.shape[0], 1, h, w)
            maps.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False) if (h, w) != size else m)
        return torch.cat(maps, dim=1).sum(dim=1)

    def image_score(self, anomaly_map: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
        """The maximum of the smoothed map [read, RD4AD's image score]."""
        return anomaly_map.flatten(1).amax(dim=1)

    def describe(self) -> dict[str, Any]:
        return {
            "student": "reverse distillation" if self.cfg.method == "snl_rd" else "feature distillation",
            "teacher_kind": self.cfg.snl.teacher,
            "cram": self.cfg.snl.cram,
            "map": "sum over layers of channel distance + map_intra_weight x intra-affinity distance",
            "image_score": "max of the smoothed map",
        }
