"""Teacher checkpoint files for tests: import as `from teacher_files import tiny_teacher_file`."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

# tests/tiny.py's teacher architecture (model.teacher.timm_kwargs of TINY) at 56 px
TINY_VIT = {"depth": 4, "embed_dim": 64, "num_heads": 2, "patch_size": 8, "init_values": 1.0}


def tiny_teacher_file(path: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A random-weight safetensors checkpoint of the tiny teacher, as a publisher would hold one."""
    torch.manual_seed(seed)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, **TINY_VIT)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net
