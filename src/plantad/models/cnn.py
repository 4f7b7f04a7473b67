"""SNL's CNN side: the frozen timm ResNet teacher and the two baseline students (FD and RD).

[read] SNL builds on FD (STPM-like: the student has the teacher's architecture, trained from
scratch, compared stage by stage) and RD (reverse distillation: a one-class bottleneck embedding of
the teacher's stages, then a mirrored decoder), both on a WideResNet-50 teacher (layers 1-3), with a
CRAM after each student block feeding the next block.
[reconstructed] RD's bottleneck: each compared stage is brought to the deepest stage's resolution by
stride-2 3x3 convolutions, concatenated, fused by a 1x1 convolution and embedded by one stride-2
3x3 convolution; each decoder block is a stride-2 transposed convolution followed by a residual
3x3-3x3 block, one per compared stage, deepest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plantad.config import CNNTeacherConfig, SNLConfig
from plantad.models.structural import CRAM
from plantad.models.teacher import build_timm_teacher

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _check_resnet(net: nn.Module, name: str) -> None:
    missing = [m for m in ("conv1", "bn1", "act1", "maxpool", *STAGES) if not hasattr(net, m)]
    if missing:
        raise ValueError(f"model.snl.cnn_teacher.name={name!r} is not a timm ResNet (no {missing}); "
                         "use wide_resnet50_2, resnet18, resnet10t, ...")


class CNNTeacher(nn.Module):
    """Frozen timm ResNet; `forward` returns the configured stages' maps, each (B, C_l, H_l, W_l)."""

    def __init__(self, cfg: CNNTeacherConfig, load_weights: bool = True) -> None:
        super().__init__()
        create = {"features_only": True, "out_indices": tuple(cfg.stages)}
        self.net, self.identity = build_timm_teacher(cfg.name, cfg.weights, cfg.timm_kwargs, create, load_weights,
                                                     key="model.snl.cnn_teacher.weights", sha256=cfg.sha256)
        self.channels: list[int] = list(self.net.feature_info.channels())
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> CNNTeacher:
        """The teacher stays in eval mode (frozen BatchNorm statistics) whatever its parent does."""
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))


def _crams(channels: list[int], cfg: SNLConfig) -> nn.ModuleList | None:
    return nn.ModuleList(CRAM(c, cfg.num_centers, cfg.cram_residual_weight) for c in channels) if cfg.cram else None


class ResNetFDStudent(nn.Module):
    """FD student: the teacher's ResNet from scratch, run stage by stage with a CRAM after each
    stage; stages past the last compared one are removed (never run, no idle parameters)."""

    def __init__(self, teacher_cfg: CNNTeacherConfig, cfg: SNLConfig) -> None:
        import timm

        super().__init__()
        net = timm.create_model(teacher_cfg.name, pretrained=False, **teacher_cfg.timm_kwargs)
        _check_resnet(net, teacher_cfg.name)
        last = max(teacher_cfg.stages)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
        self.stages = nn.ModuleList(getattr(net, STAGES[i]) for i in range(last))
        self.compared = [i - 1 for i in teacher_cfg.stages]  # indices into self.stages
        channels = [info["num_chs"] for info in net.feature_info[1 : last + 1]]
        self.crams = _crams(channels, cfg)

    def forward(self, x: torch.Tensor, teacher_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.crams is not None:
                x = self.crams[i](x)
            if i in self.compared:
                out.append(x)
        return out


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UpBlock(nn.Module):
    """RD decoder block: x2 transposed convolution to `cout`, then a residual 3x3-3x3 block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.body = nn.Sequential(_conv_bn(cout, cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.up(x)
        if tuple(x.shape[-2:]) != tuple(size):  # odd sizes: match the teacher's stage exactly
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.relu(x + self.body(x))


class ResNetRDStudent(nn.Module):
    """RD student: one-class bottleneck embedding (OCBE) of the teacher's stages, then a decoder
    that mirrors them, deepest first, with a CRAM after each decoder block; outputs in the
    teacher's stage order."""

    def __init__(self, channels: list[int], cfg: SNLConfig) -> None:
        super().__init__()
        n, deep = len(channels), channels[-1]
        self.to_deepest = nn.ModuleList(
            nn.Sequential(*[_conv_bn(c if k == 0 else deep, deep, stride=2) for k in range(n - 1 - i)])
            if i < n - 1 else _conv_bn(c, deep)
            for i, c in enumerate(channels)
        )
        self.embed = nn.Sequential(_conv_bn(n * deep, deep, kernel=1), _conv_bn(deep, 2 * deep, stride=2))
        ins = [2 * deep, *channels[::-1][:-1]]
        self.blocks = nn.ModuleList(UpBlock(cin, cout) for cin, cout in zip(ins, channels[::-1]))
        self.crams = _crams(channels[::-1], cfg)

    def forward(self, x: torch.Tensor, teacher_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        size = teacher_maps[-1].shape[-2:]
        fused = []
        for down, f in zip(self.to_deepest, teacher_maps):
            y = down(f)
            fused.append(y if y.shape[-2:] == size else F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        y = self.embed(torch.cat(fused, dim=1))
        out = []
        for i, (block, target) in enumerate(zip(self.blocks, teacher_maps[::-1])):
            y = block(y, tuple(target.shape[-2:]))
            if self.crams is not None:
                y = self.crams[i](y)
            out.append(y)
        return out[::-1]
