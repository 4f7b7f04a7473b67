"""Single-machine training from a manifest: split, train, calibrate, save.

`plantad train`, the DVC stage (through Ray Train) and the benchmarks share these functions; the
Ray Train worker only swaps where batches come from and how the model is wrapped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from plantad.config import Settings
from plantad.data.dataset import ManifestDataset, split_holdout
from plantad.data.images import ImageTransform, decode_image_bytes
from plantad.data.shards import ShardSet, read_shard_images
from plantad.models.checkpoint import save_model
from plantad.models.device import resolve_device
from plantad.tracking.teacher_weights import build_model_with_teacher_weights
from plantad.training.calibration import calibrate
from plantad.training.loop import StepCallback, build_optimizer, fit

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    model_path: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def normal_train_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    rows = manifest[(manifest["split"] == "train") & (manifest["label"] == 0)]
    if rows.empty:
        raise ValueError("the manifest has no normal training images (split=train, label=0)")
    return rows.reset_index(drop=True)

def image_loader(rows: pd.DataFrame, root: Path, settings: Settings, shuffle: bool, seed: int = 0) -> DataLoader:
    ds = ManifestDataset(rows, root, settings.data.image_size)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=settings.train.batch_size if shuffle else settings.scoring.batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(ds) >= settings.train.batch_size,
        num_workers=settings.data.loader_workers,
        generator=gen,
    )

def endless_images(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Image batches forever, reshuffled each pass (training is counted in steps, not epochs)."""
    while True:
        for batch in loader:
            yield batch["image"]

def holdout_batches(loader: DataLoader) -> list[torch.Tensor]:
    return [batch["image"] for batch in loader]

def shard_holdout_batches(shards: ShardSet, settings: Settings, rows: pd.DataFrame) -> list[torch.Tensor]:
    """The held-out normal images, read from the shard set, as scoring batches (B, 3, S, S)."""
    paths = rows["path"].astype(str).tolist()
    data = read_shard_images(shards, settings.s3, paths)
    transform = ImageTransform(settings.data.image_size)
    images = [transform(decode_image_bytes(data[p], p)) for p in paths]
    size = settings.scoring.batch_size
    return [torch.stack(images[i : i + size]) for i in range(0, len(images), size)]

def train_model(
    settings: Settings,
    manifest: pd.DataFrame,
    root: Path,
    out_dir: Path,
    on_step: StepCallback | None = None,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on the manifest's normal train images, calibrate on a held-out share, save to out_dir."""
    seed_everything(settings.train.seed)
    train_rows, holdout_rows = split_holdout(
        normal_train_rows(manifest), settings.data.holdout_fraction, settings.train.seed,
        settings.data.holdout_min_images,
    )
    log.info("training on %d normal images, calibrating on %d held out", len(train_rows), len(holdout_rows))
    device = resolve_device(settings.train.device)
    model = build_model_with_teacher_weights(settings).to(device)  # a remote teacher fetched first
    optimizer, scheduler = build_optimizer(model, settings.train)
    history: list[dict[str, float]] = []

    def record(step: int, logs: dict[str, float]) -> None:
        history.append({"step": step, **logs})
        if on_step is not None:
            on_step(step, logs)

    batches = endless_images(image_loader(train_rows, root, settings, shuffle=True, seed=settings.train.seed))
    fit(model, batches, settings.train, device, optimizer, scheduler, on_step=record, progress=progress)
    held = holdout_batches(image_loader(holdout_rows, root, settings, shuffle=False))
    calib = calibrate(model, held, settings.scoring, amp=settings.train.amp)
    log.info("calibration: %s", calib)
    meta = {"training": {"steps": settings.train.steps, "n_train": len(train_rows), "n_holdout": len(holdout_rows)}}
    path = save_model(model, settings, out_dir, {**meta, **(extra_meta or {})})
    return TrainResult(path, settings.train.steps, history, calib)
