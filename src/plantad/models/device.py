"""Device and autocast helpers: the one place training, scoring and serving pick them."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit cuda without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    """bf16 autocast on CUDA when `amp` (train.amp); a no-op on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
