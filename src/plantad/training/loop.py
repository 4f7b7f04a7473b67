"""Plain PyTorch training: the step every runner (CLI, DVC stage, Ray Train worker) calls.

Optimiser and schedule follow the model's recipe (`optimizer_recipe`, settings in TrainConfig.optimizer):
Dinomaly's [read] for the dual models, AdamW lr 2e-3, wd 1e-4, linear warm-up then cosine to min_lr,
grad-norm clip; RD4AD's [read] for SNL's students, Adam lr 0.005, betas (0.5, 0.999), constant lr.
The hard-mining fraction ramps linearly to its final value.

The two students train independently: they share no parameters, each one's gradient comes from its
own loss only and is clipped on its own, so the Noisy-OR weights of the summed loss only rescale
each student's own gradient (which clipping and AdamW largely normalise away). One optimiser is a
convenience, not a coupling; the Noisy-OR joins the students' scores at calibration and scoring.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from plantad.config import HardMiningConfig, TrainConfig
from plantad.models.device import autocast, resolve_device  # noqa: F401 (resolve_device: re-exported)
from plantad.models.factory import build_model  # noqa: F401 (re-exported for older callers)
from plantad.models.interface import LossTerms
from plantad.training.distributed import stop_if_not_finite

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step`: linear warm-up, then cosine from lr down to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def easy_fraction(step: int, cfg: HardMiningConfig) -> float:
    if not cfg.enabled:
        return 0.0
    if cfg.ramp_steps == 0:
        return cfg.final_fraction
    return cfg.final_fraction * min(1.0, step / cfg.ramp_steps)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser and lr schedule of the model's recipe; each student's group carries its grad clip."""
    raw = unwrap(model)
    o = cfg.optimizer(raw.optimizer_recipe)
    groups = raw.student_parameter_groups()
    params = [{"params": ps, "name": name, "grad_clip": o.grad_clip} for name, ps in groups.items()]
    # the fused kernel: the same update as the per-tensor loop, about 3x faster on a CPU for the
    # dual model's 158 tensors (bench/vs_anomalib.py, "optimiser"); CPU and CUDA only
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for ps in groups.values() for p in ps)
    kind = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    opt = kind(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, fused=fused)
    factor = (lambda s: lr_factor(s, cfg)) if o.schedule == "warmup_cosine" else (lambda s: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    step: int,
    cfg: TrainConfig,
) -> dict[str, float]:
    """One optimisation step on a batch of normal images (B, 3, S, S); returns scalar logs."""
    model.train()
    device = images.device
    frac = easy_fraction(step, cfg.hard_mining)
    with autocast(device, cfg.amp, cfg.cpu_amp):
        terms: LossTerms = model(images, frac, cfg.hard_mining.factor)
    stop_if_not_finite(terms, step)  # before backward and the step: every rank stops, no weight is touched
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    for group in optimizer.param_groups:  # each student clipped on its own, by its recipe's clip
        if group["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(group["params"], group["grad_clip"])
    optimizer.step()
    scheduler.step()
    logs = {"loss": float(terms.total.detach()), "lr": optimizer.param_groups[0]["lr"], "easy_fraction": frac}
    if terms.local is not None:
        logs["loss_local"] = float(terms.local.detach())
        logs["weight_local"] = terms.weight_local
    if terms.semantic is not None:
        logs["loss_semantic"] = float(terms.semantic.detach())
        logs["weight_semantic"] = terms.weight_semantic
    return logs


def fit(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    start_step: int = 0,
    stop_step: int | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
) -> int:
    """Run steps [start_step, stop_step) over an endless iterator of image batches; returns the next step."""
    stop = cfg.steps if stop_step is None else min(stop_step, cfg.steps)
    bar = tqdm(total=stop - start_step, desc="train", disable=not (progress and sys.stderr.isatty()))
    step = start_step
    for step in range(start_step, stop):
        images = next(batches).to(device, non_blocking=True)
        logs = train_step(model, images, optimizer, scheduler, step, cfg)
        if on_step is not None:
            on_step(step, logs)
        if step % cfg.log_every == 0 or step == stop - 1:
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        bar.update(1)
    bar.close()
    return stop
