"""SNL's CNN side: the frozen timm ResNet teacher and the two baseline students (FD and RD).

[read] SNL builds on FD (STPM-like: the student has the teacher's architecture, trained from
scratch, compared stage by stage) and RD (reverse distillation: a one-class bottleneck embedding of
the teacher's stages, then a mirrored decoder), both on a WideResNet-50 teacher (layers 1-3), with a
CRAM after each student block feeding the next block.
[read, RD4AD (Deng and Li, CVPR 2022) and its public code] RD's one-class bottleneck embedding:
multi-scale fusion (each shallower teacher map brought to the deepest compared map's size by strided
3x3 conv+BN+ReLU, concatenated), then a ResNet stage of the teacher's block type whose first block is
strided (for WRN-50 layers 1-3: three Bottlenecks to the 2048-channel layer4 size). The decoder
mirrors the teacher: per compared stage, deepest first, a stage of the same block type whose first
block upsamples by 2x2 stride-2 transposed convolutions (main path and shortcut) in place of the
strided convolution. Both are built from the timm teacher's own blocks and widths, so any timm
BasicBlock / Bottleneck ResNet works.
[reconstructed] A 1x1 conv+BN+ReLU fuses the concatenation to the deepest compared stage's width, so
the embedding stage is a fresh copy of the teacher's next stage (RD4AD's public code defines a 1x1
convolution there but its forward pass skips it and feeds the 3x wider concatenation to the stage). Each decoder stage has as many
blocks as the teacher stage it mirrors (the paper's "symmetric but reversed"; the public code uses
the teacher's counts in forward order: 3, 4, 6 where the mirror is 6, 4, 3). At an odd teacher
size, the upsampled map drops the row and column that the teacher's strided convolution padded.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.resnet import BasicBlock, Bottleneck
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


def _block_kwargs(block: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a timm ResNet block that set its widths, read back from the block."""
    if isinstance(block, Bottleneck):
        groups, width, planes = block.conv2.groups, block.conv2.out_channels, block.conv3.out_channels // 4
        base_width, exact = divmod(64 * (width // groups), planes)
        if exact:
            raise ValueError(f"cannot mirror a Bottleneck of width {width} over {planes} planes")
        return {"cardinality": groups, "base_width": base_width, "act_layer": type(block.act1),
                "norm_layer": type(block.bn1)}
    if isinstance(block, BasicBlock):
        return {"act_layer": type(block.act1), "norm_layer": type(block.bn1)}
    raise ValueError(f"RD's decoder mirrors timm BasicBlock / Bottleneck stages, not {type(block).__name__}")


def _upsampling_block(like: nn.Module, cin: int, cout: int) -> nn.Module:
    """A block of `like`'s type from cin to cout channels whose strided 3x3 convolution, and shortcut, are
    2x2 stride-2 transposed convolutions: the block doubles the map's size [read, RD4AD]."""
    kwargs = _block_kwargs(like)
    shortcut = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), kwargs["norm_layer"](cout))
    block = type(like)(cin, cout // type(like).expansion, stride=2, downsample=shortcut, **kwargs)
    strided = [n for n, m in block.named_children() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    conv = getattr(block, strided[0])
    setattr(block, strided[0], nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 2, stride=2,
                                                  groups=conv.groups, bias=False))
    return block


class DecoderStage(nn.Module):
    """RD's decoder stage mirroring one teacher stage: an upsampling block, then the stage's other
    blocks at the teacher stage's size and width."""

    def __init__(self, mirrored: nn.Sequential, cin: int) -> None:
        super().__init__()
        cout = _stage_channels(mirrored)
        kwargs = _block_kwargs(mirrored[0])
        rest = [type(mirrored[0])(cout, cout // type(mirrored[0]).expansion, **kwargs) for _ in mirrored[1:]]
        self.blocks = nn.Sequential(_upsampling_block(mirrored[0], cin, cout), *rest)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.blocks[0](x)  # (B, C, 2h, 2w)
        # an odd teacher size (ceil-mode strided convolution): drop the row/column the teacher padded
        x = x[..., : size[0], : size[1]]
        if tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(f"RD's decoder doubles {tuple(x.shape[-2:])} to reach the teacher's {tuple(size)}: "
                             "the teacher's stages must each halve the map (no dilated ResNets)")
        return self.blocks[1:](x)


def _stage_channels(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.conv3 if isinstance(last, Bottleneck) else last.conv2).out_channels


class ResNetRDStudent(nn.Module):
    """RD student [read, RD4AD]: one-class bottleneck embedding (OCBE) of the teacher's compared stages,
    then a decoder mirroring them, deepest first, with a CRAM after each decoder stage; outputs in the
    teacher's stage order, each the size and width of the teacher's map."""

    def __init__(self, teacher_cfg: CNNTeacherConfig, cfg: SNLConfig) -> None:
        import timm

        super().__init__()
        stages = list(teacher_cfg.stages)
        if stages[-1] == 4:
            raise ValueError(f"model.snl.cnn_teacher.stages={stages}: snl_rd's one-class embedding is the ResNet "
                             "stage after the deepest compared one, so the stages must end at 3 or below")
        net = timm.create_model(teacher_cfg.name, pretrained=False, **teacher_cfg.timm_kwargs)
        _check_resnet(net, teacher_cfg.name)
        teacher = [getattr(net, STAGES[i - 1]) for i in stages]
        channels = [_stage_channels(s) for s in teacher]
        deep = channels[-1]
        # MFF: each shallower map brought to the deepest one's size by strided 3x3 conv+BN+ReLU, through
        # the teacher's own stage widths; concatenated; fused by a 1x1 conv+BN+ReLU to the deepest width
        self.mff = nn.ModuleList(
            nn.Sequential(*[_conv_bn(channels[k], channels[k + 1], stride=2) for k in range(i, len(channels) - 1)])
            for i in range(len(channels))
        )
        self.fuse = _conv_bn(len(channels) * deep, deep, kernel=1)
        # OCE: a fresh copy of the teacher's next stage (its block type and count, the first block strided)
        self.oce = getattr(net, STAGES[stages[-1]])
        ins = [_stage_channels(self.oce), *channels[::-1][:-1]]
        self.decoder = nn.ModuleList(DecoderStage(s, cin) for s, cin in zip(teacher[::-1], ins))
        self.crams = _crams(channels[::-1], cfg)

    def forward(self, x: torch.Tensor, teacher_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        y = self.oce(self.fuse(torch.cat([down(f) for down, f in zip(self.mff, teacher_maps)], dim=1)))
        out = []
        for i, (stage, target) in enumerate(zip(self.decoder, teacher_maps[::-1])):
            y = stage(y, tuple(target.shape[-2:]))
            if self.crams is not None:
                y = self.crams[i](y)
            out.append(y)
        return out[::-1]
