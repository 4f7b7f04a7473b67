"""Training throughput: images/s of Ray Train (DDP, Ray Data reading the dataset's Parquet shards
from a local folder) for 1 and 2 workers, against the raw `train_step` on in-memory tensors in this
process, measured in one run.

On CPU the workers split the same cores (`--cpus` in all, `cpus/n` torch threads each; Ray gets
one logical CPU more for the data tasks), so the scaling ratio shows what DDP + Ray Data cost or
gain at a fixed budget; with `--gpu` each worker
gets one GPU and the ratio is the per-GPU scaling. The Ray figure is the median of the per-epoch
`images_per_second` the workers report (global batch x steps / epoch wall time), first epoch
dropped as warm-up. Model: params.yaml (the demo config) unless --config says otherwise.
Usage: python bench/train_throughput.py [--workers 1 2] [--steps 60] [--gpu] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from plantad.config import Settings, load_settings
from plantad.data.demo import generate_demo
from plantad.data.manifest import scan_dataset
from plantad.data.shards import ShardSet, write_shards
from plantad.tracking.teacher_weights import build_model_with_teacher_weights
from plantad.training.loop import build_optimizer, train_step
from plantad.training.ray_train import run_ray_training


def raw_images_per_second(settings: Settings, steps: int, threads: int, device: torch.device) -> float:
    """The ceiling: train_step on one fixed batch already in memory, no data loading, no DDP."""
    torch.set_num_threads(threads)
    model = build_model_with_teacher_weights(settings).to(device)
    optimizer, scheduler = build_optimizer(model, settings.train)
    size, batch = settings.data.image_size, settings.train.batch_size
    images = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(3):  # warm-up
        train_step(model, images, optimizer, scheduler, step, settings.train)
    sync()
    started = time.perf_counter()
    for step in range(3, 3 + steps):
        train_step(model, images, optimizer, scheduler, step, settings.train)
    sync()
    return steps * batch / (time.perf_counter() - started)


def ray_images_per_second(config: str, overrides: list[str], workers: int, cpus: float, gpu: bool,
                          steps: int, shards: ShardSet, manifest: pd.DataFrame, work: Path) -> tuple[float, float]:
    """Median and best per-epoch images/s reported by the workers of one Ray Train run."""
    settings = load_settings(config, [
        *overrides, f"ray.num_workers={workers}", f"ray.cpus_per_worker={cpus / workers if not gpu else 1}",
        f"ray.use_gpu={str(gpu).lower()}", f"train.steps={steps}", f"ray.storage_path={work / 'ray'}",
    ])
    result = run_ray_training(settings, manifest, shards, work / f"model-{workers}")
    epochs = sorted((r for r in result.history if "images_per_second" in r), key=lambda r: r["epoch"])
    rates = [r["images_per_second"] for r in epochs[1:]] or [r["images_per_second"] for r in epochs]
    if not rates:
        raise RuntimeError(f"the Ray run reported no per-epoch throughput: {result.history}")
    return statistics.median(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60, help="steps per Ray run (epochs of ray.steps_per_epoch)")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPU budget shared by the workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="plantad-train-bench-"))
    # history holds the metrics of the kept checkpoints: keep every epoch's
    overrides = [*args.set, "ray.steps_per_epoch=10", "ray.checkpoint_every_epochs=1", "ray.keep_checkpoints=1000"]
    settings = load_settings(args.config, overrides)
    data = work / "demo"
    try:
        if not data.exists():
            generate_demo(data, settings.demo)

        import ray

        # one logical CPU beyond the workers' budget, for Ray Data's decoding tasks and the controller
        ray.init(num_cpus=int(args.cpus) + 1, include_dashboard=False, log_to_driver=False)
        device = torch.device("cuda" if args.gpu else "cpu")
        raw = raw_images_per_second(settings, 20, int(args.cpus), device)
        manifest = scan_dataset(data, settings.data.categories)
        shards = write_shards(manifest, data, str(work / "shards"), settings.s3, settings.data.shards.max_bytes)
        rows = [(n, *ray_images_per_second(args.config, overrides, n, args.cpus, args.gpu, args.steps, shards,
                                           manifest, work))
                for n in args.workers]
    finally:
        if args.work is None:  # data, shards, checkpoints and models of every run
            shutil.rmtree(work, ignore_errors=True)
    print(f"torch {torch.__version__}, image {settings.data.image_size} px, global batch {settings.train.batch_size}, "
          f"{'GPU ' + torch.cuda.get_device_name() if args.gpu else f'{args.cpus:g} CPUs in all'}")
    print(f"raw train_step, 1 process, no data loading: {raw:.1f} img/s")
    print("| workers | Ray Train img/s (median epoch) | best epoch | vs 1 worker | vs raw train_step |")
    print("|---|---|---|---|---|")
    base = rows[0][1]
    for n, median, best in rows:
        print(f"| {n} | {median:.1f} | {best:.1f} | {median / base:.2f} | {median / raw:.2f} |")


if __name__ == "__main__":
    main()
