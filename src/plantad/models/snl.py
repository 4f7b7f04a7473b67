"""Structural teacher-student normality learning (SNL, Deng and Li, arXiv 2402.17091), on the
same frozen ViT teacher as the dual-student method.

[read] A student is distilled with structural losses (spatial-channel and intra-/inter-affinity
distillation); a CRAM after each student block encapsulates the normal representation space; at
test time the map is the channel-wise feature distance plus the intra-affinity distance.
[reconstructed] The student is an FD-style (STPM-like) ViT of the teacher's architecture trained
from scratch, compared at the teacher's configured layers; the loss forms and CRAM are METHOD.md's
reading (spatial: per-channel softmax over positions, KL(T||S) at a temperature; intra: HW x HW
cosine matrices, squared difference; inter: B x B cosine of pooled features, squared difference).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from plantad.config import ModelConfig, SNLConfig
from plantad.models.dual import LossTerms, RawScores
from plantad.models.noisy_or import NoisyOr
from plantad.models.teacher import Teacher


class CRAM(nn.Module):
    """Central residual aggregation: soft-assign tokens to K centres, add projected residuals back."""

    def __init__(self, dim: int, num_centers: int) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_centers, dim) * 0.02)
        self.assign = nn.Linear(dim, num_centers)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)  # starts as the identity map: x + 0
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        a = self.assign(x).softmax(dim=-1)  # (B, N, K)
        residual = torch.einsum("bnk,bnkc->bnc", a, x.unsqueeze(2) - self.centers)  # sum_k a_k (x - c_k)
        return x + self.proj(residual)


def channel_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-position 1 - cos over channels: (B, N)."""
    return 1.0 - F.cosine_similarity(t, s, dim=-1)


def spatial_kl(t: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each channel's softmax over positions, averaged: scalar."""
    log_t = F.log_softmax(t.transpose(1, 2) / temperature, dim=-1)  # (B, C, N)
    log_s = F.log_softmax(s.transpose(1, 2) / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2


def intra_affinity(x: torch.Tensor) -> torch.Tensor:
    """(B, N, N) cosine similarity between the positions of one image."""
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(1, 2)


def intra_affinity_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-position mean absolute difference of affinity rows: (B, N) map for test time."""
    return (intra_affinity(t) - intra_affinity(s)).abs().mean(dim=-1)


def inter_affinity_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """B x B cosine similarity of mean-pooled features across the batch, teacher vs student."""
    pt, ps = F.normalize(t.mean(1), dim=-1), F.normalize(s.mean(1), dim=-1)
    return ((pt @ pt.T) - (ps @ ps.T)).pow(2).mean()


class SNLModel(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int, load_teacher_weights: bool = True) -> None:
        super().__init__()
        self.cfg, self.image_size = cfg, image_size
        self.teacher = Teacher(cfg.teacher, image_size, load_teacher_weights)
        t = self.teacher
        self.student = timm.create_model(cfg.teacher.name, pretrained=False, img_size=image_size, num_classes=0,
                                         **cfg.teacher.timm_kwargs)
        self.crams = nn.ModuleList(CRAM(t.embed_dim, cfg.snl.num_centers) for _ in t.layers)
        self.noisy_or = NoisyOr(cfg.noisy_or)  # local branch only: holds calibration and threshold

    def student_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"local": [p for p in [*self.student.parameters(), *self.crams.parameters()] if p.requires_grad]}

    def _student_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        inter = self.student.forward_intermediates(x, indices=self.teacher.layers, norm=False, output_fmt="NLC",
                                                   intermediates_only=True)
        return [cram(f) for cram, f in zip(self.crams, inter)]  # (B, N, C) each

    def forward(self, x: torch.Tensor, easy_fraction: float = 0.0, easy_factor: float = 1.0) -> LossTerms | RawScores:
        teacher = [f.float() for f in self.teacher(x).layers]
        student = [f.float() for f in self._student_layers(x)]
        if self.training:
            loss = sum(self._structural_loss(t, s, self.cfg.snl) for t, s in zip(teacher, student)) / len(teacher)
            return LossTerms(loss, loss, None, 1.0, 0.0)
        h, w = self.teacher.grid
        maps = [channel_distance(t, s) + intra_affinity_distance(t, s) for t, s in zip(teacher, student)]
        return RawScores(torch.stack(maps).mean(0).reshape(x.shape[0], h, w), None)

    @staticmethod
    def _structural_loss(t: torch.Tensor, s: torch.Tensor, cfg: SNLConfig) -> torch.Tensor:
        t = t.detach()
        return (
            cfg.weight_channel * channel_distance(t, s).mean()
            + cfg.weight_spatial * spatial_kl(t, s, cfg.temperature)
            + cfg.weight_intra * (intra_affinity(t) - intra_affinity(s)).pow(2).mean()
            + cfg.weight_inter * inter_affinity_loss(t, s)
        )
