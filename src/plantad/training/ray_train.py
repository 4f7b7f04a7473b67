"""Distributed training with Ray Train (TorchTrainer, DDP) over the dataset's Parquet shards.

The only module that touches `get_dataset_shard`, `prepare_model`, `report` and `TorchTrainer`.
Workers read images only from the shard set (a local folder or s3://, data/shards.py) and fetch a
remote teacher into their node's cache, so no node needs the driver's files. Workers run the same
`fit`/`train_step` as `plantad train`; rank 0 checkpoints every epoch to the configured storage
(local or s3://) and a restarted worker group resumes from the newest one: restarted by Ray Train
(`FailureConfig`) for an elastic count, by the driver once the cluster has room for a fixed one
(ray_restarts.py). The driver then calibrates on held-out normal images, read from the shards
too, and saves the model.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from plantad.cluster import check_ray_address, connect  # noqa: F401 (this module's API)
from plantad.cluster.watch import Beat, StallError, run_watched, start_board
from plantad.config import Settings, settings_from_dict, settings_to_dict
from plantad.data.dataset import split_holdout
from plantad.data.shards import ShardSet, require_match
from plantad.models.checkpoint import save_model
from plantad.tracking.teacher_weights import build_model_with_teacher_weights
from plantad.training.calibration import calibrate
from plantad.training.loop import build_optimizer, fit, unwrap
from plantad.training.ray_budget import abort_train_runs, fit_training, stall_reason, worker_resources
from plantad.training.ray_data import endless_shard, image_dataset
from plantad.training.ray_restarts import elastic_placement_timeout, run_with_restarts
from plantad.training.distributed import check_worker_batch, seed_rank, sync_batchnorm
from plantad.training.trainer import TrainResult, normal_train_rows, seed_everything, shard_holdout_batches

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"


def worker_batch(batch_size: int, world_size: int) -> int:
    """Each DDP worker's share of train.batch_size."""
    return max(1, batch_size // world_size)


def check_shard_size(n_train: int, num_workers: int, batch_size: int) -> None:
    """Each worker reads about n_train / num_workers rows; fewer than its batch would only surface on
    the workers, after the cluster has started them."""
    per_worker = worker_batch(batch_size, num_workers)
    if n_train // num_workers < per_worker:
        raise ValueError(f"{n_train} training images over ray.num_workers={num_workers} give each worker "
                         f"{n_train // num_workers}, fewer than {per_worker} images (its part of "
                         f"train.batch_size={batch_size}): lower ray.num_workers or train.batch_size")


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Students and calibration buffers; the teacher too only when it is random (not re-loadable)."""
    raw = unwrap(model)
    keep_teacher = raw.teacher.identity.source == "random"
    return {k: v.detach().cpu() for k, v in raw.state_dict().items() if keep_teacher or not k.startswith("teacher.")}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a training checkpoint; only the (re-loaded) teacher may be absent from it."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("teacher.")] + list(unexpected)
    if bad:
        raise RuntimeError(f"training checkpoint does not fit the model: mismatched keys {bad[:10]}")


def stored_states(filesystem: Any, run_dir: str) -> list[str]:
    """The training states rank 0 wrote into the run's storage folder, newest first (Ray names each
    checkpoint folder after the time it was written)."""
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(run_dir, recursive=True, allow_not_found=True)
    found = [f.path for f in filesystem.get_file_info(selector)
             if f.type == pyarrow.fs.FileType.File and f.path.endswith(f"/{STATE_FILE}")]
    return sorted(found, key=lambda path: path.rsplit("/", 2)[-2], reverse=True)


def newest_stored_state(filesystem: Any, run_dir: str) -> dict[str, Any] | None:
    """The newest complete training state in the run's storage, or None.

    Ray Train hands a restarted worker group only a checkpoint that every rank reported; a node lost
    between rank 0's upload and the other ranks' reports leaves a newer, complete state that Ray never
    registered. Under DDP every rank holds the same weights, so rank 0's state is the run's state: a
    restart resumes from the newest one that loads (a partly copied file is skipped)."""
    for path in stored_states(filesystem, run_dir):
        try:
            with filesystem.open_input_file(path) as f:
                return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:  # removed meanwhile, or cut short
            log.warning("training state %s does not load (%s): trying an older one", path, exc)
    return None


def _storage_filesystem(settings: Settings) -> Any:
    import pyarrow.fs

    from plantad.tracking.s3 import pyarrow_filesystem

    return pyarrow_filesystem(settings.s3) if settings.ray.storage_path.startswith("s3://") else pyarrow.fs.LocalFileSystem()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    settings = settings_from_dict(config["settings"], source="ray train config")
    cfg, rcfg = settings.train, settings.ray
    torch.set_num_threads(max(1, int(rcfg.cpus_per_worker)))
    seed_everything(cfg.seed)
    ctx = ray.train.get_context()
    beat = Beat(config.get("progress"), f"rank {ctx.get_world_rank()}")
    beat("started", force=True)
    # one progress line per epoch, from rank 0; the per-step losses go to MLflow, not the console
    logging.getLogger("plantad.training.loop").setLevel(logging.WARNING)
    if ctx.get_world_rank() != 0:  # rank 0 says it (the random-teacher warning too)
        logging.getLogger("plantad").setLevel(logging.ERROR)
    model = build_model_with_teacher_weights(settings)  # a remote teacher: fetched into this node's cache
    step = 0
    # the newest state in the run's storage: Ray's last registered checkpoint is one of them, and a
    # newer one is there when a node was lost while the ranks reported
    state = newest_stored_state(_storage_filesystem(settings), config["run_dir"]) if config.get("run_dir") else None
    resume = ray.train.get_checkpoint() if state is None else None
    if resume is not None:
        with resume.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    if state is not None:
        load_trainable_state(model, state["model"])
        step = int(state["step"])
    seed_rank(cfg.seed, ctx.get_world_rank())  # same initial weights everywhere, a dropout stream per rank
    model = sync_batchnorm(model, ray.train.torch.get_device(), ctx.get_world_size())
    model = ray.train.torch.prepare_model(model)
    optimizer, scheduler = build_optimizer(model, cfg)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    device = ray.train.torch.get_device()
    per_worker = worker_batch(cfg.batch_size, ctx.get_world_size())
    batches = endless_shard(ray.train.get_dataset_shard("train"), per_worker, cfg.seed + ctx.get_world_rank(),
                            on_batch=lambda: beat("a dataset batch"))
    step_logger = _step_logger(config.get("mlflow")) if ctx.get_world_rank() == 0 else None
    spe = rcfg.steps_per_epoch
    while step < cfg.steps:
        epoch_start = step
        stop = min(cfg.steps, (step // spe + 1) * spe)
        losses: list[float] = []
        started = time.perf_counter()
        step = fit(model, batches, cfg, device, optimizer, scheduler, step, stop,
                   on_step=_collect(losses, step_logger, beat), progress=False)
        seconds = time.perf_counter() - started
        metrics = {"step": step, "epoch": -(-step // spe), "loss": float(np.mean(losses)),
                   "resumed_from": int(state["step"]) if state else 0, "epoch_seconds": seconds,
                   "world_size": ctx.get_world_size(),
                   # the global batch: every worker ran the same number of steps on its own shard
                   "images_per_second": (step - epoch_start) * per_worker * ctx.get_world_size() / seconds}
        if step_logger is not None:
            step_logger.epoch(metrics["epoch"], {k: metrics[k] for k in ("loss", "epoch_seconds", "images_per_second")})
        if (step // spe) % rcfg.checkpoint_every_epochs == 0 or step >= cfg.steps:
            _report_with_checkpoint(model, optimizer, scheduler, step, metrics, ctx.get_world_rank())
        else:
            ray.train.report(metrics)
        log.info("epoch %d/%d: steps %d-%d, loss %.4f, %.1f images/s", metrics["epoch"], -(-cfg.steps // spe),
                 epoch_start, step, metrics["loss"], metrics["images_per_second"])


def _collect(losses: list[float], then, beat: Beat):
    def on_step(step: int, logs: dict[str, float]) -> None:
        losses.append(logs["loss"])
        beat(f"step {step}")
        if then is not None:
            then(step, logs)

    return on_step


def _step_logger(mlflow_cfg: dict[str, Any] | None):
    if not mlflow_cfg:
        return None
    from plantad.tracking.step_logger import MlflowStepLogger

    return MlflowStepLogger(mlflow_cfg["tracking_uri"], mlflow_cfg["run_id"], every=mlflow_cfg.get("every", 10))


def _report_with_checkpoint(model, optimizer, scheduler, step: int, metrics: dict[str, Any], rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step}
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def settings_for_workers(settings: Settings) -> Settings:
    """The settings the workers build from: an MLflow teacher URI resolves against the driver's
    tracking store (not the worker's working directory), and a remote teacher is fetched here
    first, so that a wrong pin or source fails before any worker starts."""
    from plantad.tracking.store import resolve_tracking_uri
    from plantad.tracking.teacher_weights import localize_teachers

    uri = settings.mlflow.tracking_uri or resolve_tracking_uri(settings.mlflow, Path.cwd())
    pinned = settings.model_copy(update={"mlflow": settings.mlflow.model_copy(update={"tracking_uri": uri})})
    localize_teachers(pinned, uri)
    return pinned


def run_ray_training(
    settings: Settings,
    manifest: pd.DataFrame,
    shards: ShardSet,
    out_dir: Path,
    mlflow_run: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on the cluster from `shards` (the manifest's shard set), calibrate on the driver, save
    the model to out_dir."""
    from plantad.tracking.s3 import endpoint_name, resolve_storage

    require_match(shards, manifest, shards.folder)
    rcfg = settings.ray
    seed_everything(settings.train.seed)
    train_rows, holdout_rows = split_holdout(normal_train_rows(manifest), settings.data.holdout_fraction, settings.train.seed,
                                             settings.data.holdout_min_images)
    check_shard_size(len(train_rows), rcfg.num_workers, settings.train.batch_size)
    check_worker_batch(settings, rcfg.num_workers)
    connect(rcfg)  # before `import ray`: it sets the environment Ray reads on import
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = fit_training(rcfg)
    storage_path, filesystem = resolve_storage(rcfg.storage_path, settings.s3)
    name = f"plantad-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    resources = worker_resources(rcfg, plan.cpus_per_worker)
    worker_settings = settings_for_workers(settings)
    worker_settings = worker_settings.model_copy(update={"ray": rcfg.model_copy(update={"cpus_per_worker": plan.cpus_per_worker})})
    board = start_board()
    fixed = rcfg.min_workers is None
    datasets = {"train": image_dataset(shards, settings.s3, train_rows, settings.data.image_size, rcfg.data_cpus,
                                       rcfg.cache_images, board, rcfg.stall_timeout_s,
                                       lambda beats: stall_reason(plan, rcfg, beats, reading=True))}

    def attempt(n: int):
        ray.get(board.clear.remote())  # this attempt's quiet time counts from its own start
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"settings": settings_to_dict(worker_settings), "mlflow": mlflow_run, "progress": board,
                               "run_dir": f"{storage_path}/{name}"},
            scaling_config=ScalingConfig(num_workers=rcfg.scaling_workers(), use_gpu=rcfg.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=name,  # a restart continues the same run: Ray restores its checkpoint list from storage
                storage_path=storage_path,
                storage_filesystem=filesystem,
                # a fixed count: the driver restarts (ray_restarts.py), Ray Train none; elastic: Ray Train does
                failure_config=(FailureConfig(max_failures=0, controller_failure_limit=0, max_preemption_failures=0)
                                if fixed else FailureConfig(max_failures=rcfg.max_failures)),
                checkpoint_config=CheckpointConfig(num_to_keep=rcfg.keep_checkpoints),
                # Ray Train's own INFO lines (worker group, process group, every report) stay in its log files
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
            datasets=datasets,
        )
        with elastic_placement_timeout(None if fixed else rcfg.elastic_placement_timeout_s):
            return run_watched(trainer.fit, board, rcfg.stall_timeout_s, lambda beats: stall_reason(plan, rcfg, beats),
                               abort=lambda: abort_train_runs(job))

    job = ray.get_runtime_context().get_job_id()
    try:
        result = (run_with_restarts(attempt, rcfg.max_failures, rcfg.num_workers, resources, rcfg.stall_timeout_s)
                  if fixed else attempt(0))
    except StallError:
        raise
    except Exception as exc:  # Ray's error names neither the storage nor its endpoint
        where = f" at S3 endpoint {endpoint_name(settings.s3)}" if filesystem is not None else ""
        raise RuntimeError(f"Ray Train run {name} failed (checkpoints in {rcfg.storage_path}{where}): {exc}") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint (error: {result.error})")
    model = build_model_with_teacher_weights(settings)
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    load_trainable_state(model, state["model"])
    held = shard_holdout_batches(shards, settings, holdout_rows)
    calib = calibrate(model, held, settings.scoring, amp=settings.train.amp)
    meta = {"training": {"steps": int(state["step"]), "n_train": len(train_rows), "n_holdout": len(holdout_rows),
                         "ray_run": name, "ray_checkpoint": result.checkpoint.path, "num_workers": rcfg.num_workers,
                         "cpus_per_worker": plan.cpus_per_worker,
                         "shards": shards.folder, "manifest_fingerprint": shards.fingerprint}}
    path = save_model(model, settings, out_dir, {**meta, **(extra_meta or {})})
    frame = result.metrics_dataframe
    history = frame.to_dict("records") if frame is not None and not frame.empty else [dict(result.metrics or {})]
    return TrainResult(path, int(state["step"]), history, calib)
