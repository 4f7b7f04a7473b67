"""Scoring throughput of the production-size model: images/s of `score_batch` (maps, smoothing,
Noisy-OR) against the raw model forward, on CPU and, when present, CUDA with bf16 autocast.

Architecture as configs/production.yaml (ViT-S/14 teacher) with random weights: throughput does
not depend on the weights, and this machine cannot download them.
Usage: python bench/scoring_throughput.py [--sizes 224 392] [--batch 16] [--iters 5] [--config ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from plantad.config import load_settings
from plantad.scoring import score_batch
from plantad.models.factory import build_model


def timed(fns: list, iters: int, sync) -> list[float]:
    """Best-of-`iters` seconds per call for each fn, interleaved so background load hits all alike."""
    best = [float("inf")] * len(fns)
    for fn in fns:  # warm-up
        fn()
    for _ in range(iters):
        for i, fn in enumerate(fns):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def bench(config: str, size: int, batch: int, iters: int, device: torch.device) -> dict[str, float]:
    settings = load_settings(config, ["model.teacher.weights=random", f"data.image_size={size}"])
    model = build_model(settings).to(device).eval()
    model.noisy_or.threshold.fill_(0.5)
    x = torch.randn(batch, 3, size, size, device=device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def raw() -> None:
        with torch.no_grad(), amp:
            model(x)

    t_raw, t_score = timed([raw, lambda: score_batch(model, x, settings.scoring, amp=True)], iters, sync)
    return {"raw_img_s": batch / t_raw, "score_img_s": batch / t_score, "ratio": t_raw / t_score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/production.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 392])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print("| device | image px | batch | raw forward img/s | score_batch img/s | score/raw |")
    print("|---|---|---|---|---|---|")
    for dev in args.devices:
        for size in args.sizes:
            r = bench(args.config, size, args.batch, args.iters, torch.device(dev))
            print(f"| {dev}{' bf16' if dev == 'cuda' else ' fp32'} | {size} | {args.batch} | {r['raw_img_s']:.1f} | "
                  f"{r['score_img_s']:.1f} | {r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
