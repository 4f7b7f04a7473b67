"""Distillation losses and per-patch distances of the dual-student method."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scale_gradient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same forward value as `x`; its gradient is multiplied by `scale` (broadcast)."""
    return x.detach() + (x - x.detach()) * scale


def point_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-patch cosine distance over channels: (B, N, C) x 2 -> (B, N)."""
    return 1.0 - F.cosine_similarity(teacher, student, dim=-1)


def global_cosine_hard_mining(
    teacher_groups: list[torch.Tensor],
    student_groups: list[torch.Tensor],
    easy_fraction: float,
    easy_factor: float,
) -> torch.Tensor:
    """L_SD = 1/G * sum_g (1 - cos(vec(F_T^g), vec(F_S^g))), averaged over images (paper eq. for S_D).

    Hard mining as in Dinomaly [read]: the `easy_fraction` of patches (lowest per-patch distance,
    over the batch) get their gradient scaled by `easy_factor`; the loss value is unchanged.
    """
    total = teacher_groups[0].new_zeros(())
    for t, s in zip(teacher_groups, student_groups):
        t = t.detach().float()
        s = s.float()
        if easy_fraction > 0.0:
            with torch.no_grad():
                dist = point_distance(t, s)  # (B, N)
                k = max(1, int(dist.numel() * (1.0 - easy_fraction)))
                thresh = torch.topk(dist.flatten(), k).values[-1]
                scale = torch.where(dist < thresh, easy_factor, 1.0).unsqueeze(-1)
            s = scale_gradient(s, scale)
        cos = F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)  # (B,)
        total = total + (1.0 - cos).mean()
    return total / len(teacher_groups)


def local_distance_map(teacher_groups: list[torch.Tensor], student_groups: list[torch.Tensor]) -> torch.Tensor:
    """Mean over groups of the per-patch cosine distance: (B, N)."""
    maps = [point_distance(t.float(), s.float()) for t, s in zip(teacher_groups, student_groups)]
    return torch.stack(maps).mean(dim=0)


def semantic_distance(
    teacher_cls: torch.Tensor,
    student_cls: torch.Tensor,
    teacher_patch_mean: torch.Tensor | None = None,
    student_patch_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """s_E = 1 - cos(cls_T, cls_SE) [reconstructed]; with patch means, the mean of both terms. (B,)"""
    d = 1.0 - F.cosine_similarity(teacher_cls.float(), student_cls.float(), dim=-1)
    if teacher_patch_mean is None or student_patch_mean is None:
        return d
    d_patch = 1.0 - F.cosine_similarity(teacher_patch_mean.float(), student_patch_mean.float(), dim=-1)
    return 0.5 * (d + d_patch)
