"""Encoder-decoder student S_D (local branch): reconstructs the teacher's mid-layer patch tokens.

Follows Dinomaly (Guo et al., CVPR 2025) as its public code does it: the mean of the
teacher's layers goes through a noisy MLP bottleneck (dropout is the noise), then a stack of ViT
blocks with linear attention; the block outputs, reversed, are averaged in the same groups as the
teacher's layers. Class/register tokens pass through and are dropped before loss and maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plantad.config import DecoderConfig


def init_linear(module: nn.Module) -> None:
    """Dinomaly's init: trunc_normal(std 0.01) for Linear weights, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class NoisyBottleneck(nn.Module):
    """MLP dim -> ratio*dim -> dim with dropout on its input, after GELU and after fc2 [read]."""

    def __init__(self, dim: int, ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.drop_in = nn.Dropout(dropout)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.drop_in(x))))))


class LinearAttention(nn.Module):
    """Softmax-free attention with q, k = elu + 1 (Dinomaly's decoder); cost linear in tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]  # (B, H, N, d)
        kv = k.transpose(-2, -1) @ v  # (B, H, d, d)
        norm = 1.0 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)  # (B, H, N, 1)
        out = (q @ kv) * norm
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SoftmaxAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, linear_attention: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LinearAttention(dim, num_heads) if linear_attention else SoftmaxAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderStudent(nn.Module):
    """Input: the teacher's configured layers (full tokens); output: one tensor per group (B, N, C)."""

    def __init__(
        self,
        cfg: DecoderConfig,
        dim: int,
        num_layers: int,
        groups: list[list[int]],
        num_heads: int,
        num_prefix_tokens: int,
    ) -> None:
        super().__init__()
        self.groups = [list(g) for g in groups]
        self.num_prefix_tokens = num_prefix_tokens
        self.bottleneck = NoisyBottleneck(dim, cfg.mlp_ratio, cfg.bottleneck_dropout)
        heads = cfg.num_heads or num_heads
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, heads, cfg.mlp_ratio, cfg.linear_attention) for _ in range(num_layers)
        )
        self.apply(init_linear)

    def forward(self, layers: list[torch.Tensor], prefix: list[torch.Tensor]) -> list[torch.Tensor]:
        # mean over layers of prefix and patch tokens apart, then one cat: the same values as the
        # mean of full token tensors without copying every layer back together first
        x = self.bottleneck(torch.cat([torch.stack(prefix).mean(dim=0), torch.stack(layers).mean(dim=0)], dim=1))
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        outputs = outputs[::-1]  # the last block reconstructs the shallowest teacher layer
        return [
            torch.stack([outputs[i] for i in group]).mean(dim=0)[:, self.num_prefix_tokens :]
            for group in self.groups
        ]


def group_teacher_layers(layers: list[torch.Tensor], groups: list[list[int]]) -> list[torch.Tensor]:
    """Teacher targets: the mean of each group of configured layers, patch tokens only (B, N, C)."""
    return [torch.stack([layers[i] for i in group]).mean(dim=0) for group in groups]
