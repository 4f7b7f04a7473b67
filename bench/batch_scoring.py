"""Bulk scoring throughput: `plantad score` (Ray Data, 1 and 2 actors; one actor per GPU on CUDA)
against raw in-process `score_batch` on the same images and model, in one run, with the ratio.

The model is the params.yaml architecture with random weights (throughput does not depend on them);
the images are demo images written to a temporary folder. "raw" scores tensors decoded and resized
beforehand (the model alone); "in-process" also decodes and resizes each image, as bulk scoring does.
Bulk figures: whole run (Ray Data start-up and model loading included) and warm (after the first
batch came back). Usage: python bench/batch_scoring.py [--images 384] [--actors 1 2] [--config params.yaml]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from plantad.config import DemoConfig, load_settings
from plantad.data.demo import generate_demo
from plantad.data.images import ImageTransform, decode_untrusted
from plantad.models.checkpoint import save_model
from plantad.scoring import score_batch
from plantad.serving.bulk import run_bulk
from plantad.training.loop import build_model


def demo_images(work: Path, n: int) -> list[Path]:
    """`n` normal demo images (128 px PNG) copied into `work/in`, the only files there."""
    generate_demo(work / "demo", DemoConfig(seed=0, image_size=128, n_train=-(-n // 3), n_test_good=1,
                                            n_test_defect=1))
    files = []
    for src in sorted((work / "demo").rglob("train/good/*.png"))[:n]:
        dest = work / "in" / src.parts[-4] / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        files.append(dest)
    return sorted(files)


def in_process(model, settings, files: list[Path], decode: bool) -> float:
    """Images/s of score_batch in chunks of scoring.batch_size; decode=True includes reading and resizing."""
    transform, step = ImageTransform(settings.data.image_size), settings.scoring.batch_size
    tensors = None if decode else [transform(decode_untrusted(f.read_bytes(), str(f)).image) for f in files]
    start = time.perf_counter()
    for i in range(0, len(files), step):
        if decode:
            x = torch.stack([transform(decode_untrusted(f.read_bytes(), str(f)).image) for f in files[i:i + step]])
        else:
            x = torch.stack(tensors[i:i + step])
        score_batch(model, x, settings.scoring)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import ray

    cuda = torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="plantad-bench-"))
    settings = load_settings(args.config, ["model.teacher.weights=random"])
    model = build_model(settings).eval()
    model.noisy_or.threshold.fill_(0.5)
    save_model(model, settings, work / "model")
    model = model.to("cuda" if cuda else "cpu")
    files = demo_images(work, args.images)
    ray.init(num_cpus=cpus, include_dashboard=False)
    torch.set_num_threads(cpus)
    print(f"torch {torch.__version__}, {cpus} CPUs{', GPU ' + torch.cuda.get_device_name() if cuda else ''}; "
          f"{len(files)} images of 128 px, model input {settings.data.image_size} px, batch "
          f"{settings.bulk.batch_size}")
    in_process(model, settings, files[:64], decode=False)  # warm-up
    raw = [in_process(model, settings, files, decode=False)]
    decoded = in_process(model, settings, files, decode=True)
    rows = []
    for n in args.actors:
        read = settings.bulk.read_cpus
        per_actor = [f"bulk.actors={n}", f"bulk.cpus_per_actor={(cpus - read) / n}"]
        if cuda:
            per_actor += ["bulk.gpus_per_actor=1", "bulk.device=cuda"]
        s = load_settings(args.config, ["model.teacher.weights=random", *per_actor])
        summary = run_bulk(s, str(work / "in"), str(work / f"out-{n}"), str(work / "model"), progress=False)
        assert summary.scored >= len(files), summary
        rows.append((n, summary))
        torch.set_num_threads(cpus)
        raw.append(in_process(model, settings, files, decode=False))  # interleaved: load changes over time
    base = sum(raw) / len(raw)
    print(f"raw in-process score_batch: {base:.1f} img/s (runs: {', '.join(f'{r:.1f}' for r in raw)}); "
          f"with decoding in-process: {decoded:.1f} img/s ({decoded / base:.2f} of raw)")
    print("| actors | device | whole run img/s | warm img/s | warm / raw | warm / in-process with decoding |")
    print("|---|---|---|---|---|---|")
    for n, s in rows:
        print(f"| {n} | {'cuda bf16, 1 GPU each' if cuda else 'CPU'} | {s.images_per_s:.1f} | "
              f"{s.warm_images_per_s:.1f} | {s.warm_images_per_s / base:.2f} | {s.warm_images_per_s / decoded:.2f} |")
    ray.shutdown()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
