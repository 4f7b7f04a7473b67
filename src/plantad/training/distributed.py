"""What data-parallel training needs beyond DDP's gradient average: ranks that draw different
dropout masks, a non-finite loss that stops every rank at the same step, BatchNorm statistics over
the global batch on GPUs, and a per-worker batch large enough for the losses that compare the
images of a batch.

Plain torch.distributed: the Ray Train worker calls these, and they run without Ray too.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from plantad.config import Settings
from plantad.models.interface import LossTerms

log = logging.getLogger(__name__)

RANK_STRIDE = 1_000_003  # a prime: the ranks' seeds never collide with another run's seed + small offsets
TERM_BITS = {"local": 1, "semantic": 2, "total": 4}


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_rank(seed: int, rank: int) -> None:
    """Called after the model is built from `seed` (so every rank starts from the same weights):
    each rank then draws its own random stream, so the noisy bottleneck's dropout masks differ
    across workers instead of repeating on every one. Rank 0 keeps `seed`."""
    torch.manual_seed(seed + RANK_STRIDE * rank)


def stop_if_not_finite(terms: LossTerms, step: int) -> None:
    """Before backward: a non-finite loss term on any rank raises FloatingPointError on every rank at
    this step, naming the step, the ranks and their terms. Each rank contributes its own slot to one
    small all-reduce, so no rank is left waiting in the gradient all-reduce of a rank that stopped."""
    bad = 0
    for name, value in (("local", terms.local), ("semantic", terms.semantic), ("total", terms.total)):
        if value is not None and not bool(torch.isfinite(value.detach()).all()):
            bad |= TERM_BITS[name]
    rank, world = _world()
    if world > 1:
        flags = torch.zeros(world, dtype=torch.int64, device=terms.total.device)
        flags[rank] = bad
        dist.all_reduce(flags)
        per_rank = {r: int(f) for r, f in enumerate(flags.tolist()) if f}
    else:
        per_rank = {rank: bad} if bad else {}
    if per_rank:
        where = "; ".join(f"rank {r}: {', '.join(n for n, b in TERM_BITS.items() if bits & b)}"
                          for r, bits in sorted(per_rank.items()))
        raise FloatingPointError(f"training stopped at step {step}: a loss is not finite ({where}); every rank "
                                 "stops here. Lower the learning rate (train.lr; train.snl_optimizer.lr for "
                                 "snl_rd and snl_fd), or check the data of this step")


def sync_batchnorm(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """BatchNorm layers (SNL's CNN students) normalise over the global batch on GPU workers. torch's
    SyncBatchNorm runs on GPUs only: CPU workers keep per-worker statistics, and say so once."""
    if world_size < 2 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.warning("BatchNorm statistics are per worker: SyncBatchNorm needs GPU workers (%d CPU workers)", world_size)
    return model


def min_worker_batch(settings: Settings) -> int:
    """The smallest per-worker batch the losses need: SNL's inter-affinity compares the images of a
    batch (zero at one image), so methods that train it need two per worker."""
    snl = settings.model.method in ("snl_rd", "snl_fd", "dual_snl") and settings.model.snl.weight_inter > 0
    return 2 if snl else 1


def check_worker_batch(settings: Settings, world_size: int) -> None:
    """Refuse, on the driver, a train.batch_size that gives a worker fewer images than its losses
    need. Hard mining picks its hard points within each worker's batch (as DDP computes it)."""
    per_worker = max(1, settings.train.batch_size // world_size)
    need = min_worker_batch(settings)
    if per_worker < need:
        raise ValueError(f"train.batch_size={settings.train.batch_size} over {world_size} workers gives each "
                         f"{per_worker} image(s); model.method={settings.model.method} needs at least {need} per "
                         "worker (SNL's inter-affinity compares the images of a batch): raise train.batch_size "
                         "or lower ray.num_workers")
