"""Device and autocast helpers: the one place training, scoring and serving pick them."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from functools import cache

import torch
from torch import nn

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit cuda without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


_compute_threads: int | None = None


def set_compute_threads(threads: int) -> None:
    """The threads a forward may use in this process, where it differs from the calling thread's
    torch count (a serving process runs its forwards on one thread: `plantad.serving.forward`)."""
    global _compute_threads
    _compute_threads = threads


def compute_threads() -> int:
    """Threads for a compiled graph (OpenVINO's INFERENCE_NUM_THREADS): the process's forward
    threads where set, else this thread's torch count."""
    return _compute_threads if _compute_threads is not None else torch.get_num_threads()


@cache
def cpu_has_native_bf16() -> bool | None:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 / AMX); None when torch cannot tell."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return None if probe is None else bool(probe())


@cache
def _warn_slow_bf16() -> None:
    log.warning("cpu_amp is on but this CPU has no native bf16 (AVX512-BF16/AMX): bf16 runs slower than "
                "float32 here; set train.cpu_amp and scoring.cpu_amp to false")


def autocast(device: torch.device, amp: bool, cpu_amp: bool = False) -> AbstractContextManager:
    """bf16 autocast on CUDA when `amp` (train.amp), on CPU when `cpu_amp` (train.cpu_amp /
    scoring.cpu_amp); otherwise a no-op. Weights stay float32 either way."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu_amp and device.type == "cpu":
        if cpu_has_native_bf16() is False:
            _warn_slow_bf16()
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
