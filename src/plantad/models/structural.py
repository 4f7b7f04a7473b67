"""SNL's structural distillation (Deng and Li, arXiv 2402.17091) and its CRAM module.

[read] Spatial-channel distillation and intra-/inter-affinity distillation measure the structural
distance between teacher and student; a central residual aggregation module (CRAM) after each
student block encapsulates the normal representation space; the test-time map is the channel-wise
feature distance plus the intra-affinity distance.
[reconstructed] (the paper gives no formulas) channel: per-position 1 - cos over channels; spatial: each
channel's softmax over positions, KL(teacher || student) at a temperature (times T^2); intra: the
N x N cosine matrix of one image's positions, squared difference; inter: the B x B cosine matrix of
mean-pooled features across the batch, squared difference; CRAM: K learnable centres, soft
assignment softmax_k(w_k.x + b_k), residuals sum_k a_k (x - c_k), a projection added back.
All functions take token features (B, N, C); the teacher side is always detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plantad.config import SNLConfig


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, H*W, C) tokens; tokens pass through."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


class CRAM(nn.Module):
    """Central residual aggregation: x + w * proj(sum_k a_k(x) (x - c_k)), on tokens or maps.

    The projection starts at zero, so a new CRAM is the identity; `residual_weight` 0 keeps it so.
    """

    def __init__(self, dim: int, num_centers: int, residual_weight: float = 1.0) -> None:
        super().__init__()
        self.residual_weight = residual_weight
        self.centers = nn.Parameter(torch.randn(num_centers, dim) * 0.02)  # (K, C)
        self.assign = nn.Linear(dim, num_centers)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def aggregated_residual(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        a = self.assign(x).softmax(dim=-1)  # (B, N, K)
        # sum_k a_k (x - c_k) = x - sum_k a_k c_k, because the a_k sum to 1 (no (B, N, K, C) tensor)
        return x - a @ self.centers.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) or (B, C, H, W)
        if x.ndim == 4:
            b, c, h, w = x.shape
            return self.forward(to_tokens(x)).transpose(1, 2).reshape(b, c, h, w)
        return x + self.residual_weight * self.proj(self.aggregated_residual(x))


def channel_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-position 1 - cos over channels: (B, N)."""
    return 1.0 - F.cosine_similarity(t.detach(), s, dim=-1)


def channel_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Channel-wise distillation: mean per-position cosine distance (RD4AD's loss per position)."""
    return channel_distance(t, s).mean()


def spatial_loss(t: torch.Tensor, s: torch.Tensor, temperature: float) -> torch.Tensor:
    """Spatial-wise distillation: KL(T || S) of each channel's softmax over positions, mean over
    images and channels, times T^2 (the usual scale of distillation at a temperature)."""
    log_t = F.log_softmax(t.detach().transpose(1, 2) / temperature, dim=-1)  # (B, C, N)
    log_s = F.log_softmax(s.transpose(1, 2) / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2


def intra_affinity(x: torch.Tensor) -> torch.Tensor:
    """(B, N, N) cosine similarity between the positions of one image."""
    x = F.normalize(x, dim=-1)
    return x @ x.transpose(1, 2)


def intra_affinity_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Intra-affinity distillation: mean squared difference of the N x N affinity matrices."""
    return (intra_affinity(t.detach()) - intra_affinity(s)).pow(2).mean()


def intra_affinity_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-position mean absolute difference of affinity rows: the test-time structural map (B, N)."""
    return (intra_affinity(t.detach()) - intra_affinity(s)).abs().mean(dim=-1)


def inter_affinity_loss(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inter-affinity distillation: B x B cosine of mean-pooled features, mean squared difference."""
    pt, ps = F.normalize(t.detach().mean(1), dim=-1), F.normalize(s.mean(1), dim=-1)  # (B, C)
    return ((pt @ pt.T) - (ps @ ps.T)).pow(2).mean()


def structural_loss(t: torch.Tensor, s: torch.Tensor, cfg: SNLConfig) -> torch.Tensor:
    """Weighted sum of the four distillations for one compared layer; a 0 weight skips its term."""
    terms = (
        (cfg.weight_channel, lambda: channel_loss(t, s)),
        (cfg.weight_spatial, lambda: spatial_loss(t, s, cfg.temperature)),
        (cfg.weight_intra, lambda: intra_affinity_loss(t, s)),
        (cfg.weight_inter, lambda: inter_affinity_loss(t, s)),
    )
    return sum((w * term() for w, term in terms if w > 0.0), s.new_zeros(()))


def structural_map(t: torch.Tensor, s: torch.Tensor, intra_weight: float) -> torch.Tensor:
    """Test-time map of one layer: channel distance + intra_weight x intra-affinity distance (B, N)."""
    d = channel_distance(t, s)
    return d + intra_weight * intra_affinity_distance(t, s) if intra_weight > 0.0 else d
