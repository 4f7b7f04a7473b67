"""plantad against anomalib's Dinomaly on the same machine, input size and batch, in one run.

Scoring: images/s of plantad's `score_batch` (dual and local-only) and of Dinomaly's eval forward
(it includes its own maps, blur and top-1% score), beside the bare teacher forward as the
reference. Training: one optimisation step (forward, backward, AdamW with the same lr for both;
Dinomaly's own optimiser is StableAdamW) on a fixed in-memory batch. A per-stage breakdown of
plantad's scoring shows where the time goes. All models have random weights (this machine cannot
download DINOv2; speed does not depend on the weights). Timings are interleaved, best and median
of `--rounds`. anomalib is an optional extra: `pip install -e ".[bench]"`.
Usage: python bench/vs_anomalib.py [--size 392] [--batch 8] [--rounds 5] [--devices cpu cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from plantad.config import Settings, load_settings
from plantad.scoring import gaussian_blur, score_batch, top_k_mean, upsample
from plantad.models.factory import build_model
from plantad.training.loop import build_optimizer, train_step

Timed = dict[str, Callable[[], object]]


@contextlib.contextmanager
def no_download() -> Iterator[None]:
    """anomalib builds its encoder with pretrained=True; random weights need no network."""
    import timm

    original = timm.create_model

    def create(*args, **kwargs):
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = original


def dinomaly(teacher: str, device: torch.device) -> torch.nn.Module:
    from anomalib.models.image.dinomaly import torch_model

    with no_download():
        return torch_model.DinomalyModel(encoder_name=teacher, decoder_depth=8, bottleneck_dropout=0.2).to(device)


def plantad(config: str, size: int, branches: str, device: torch.device) -> tuple[Settings, torch.nn.Module]:
    settings = load_settings(config, ["model.teacher.weights=random", f"data.image_size={size}",
                                      f"model.branches={branches}"])
    model = build_model(settings).to(device)
    model.noisy_or.threshold.fill_(0.5)
    return settings, model


def interleaved(fns: Timed, rounds: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each fn, round-robin so background load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def scoring_fns(args, device: torch.device) -> Timed:
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    dual_settings, dual = plantad(args.config, args.size, "dual", device)
    local_settings, local = plantad(args.config, args.size, "local", device)
    peer = dinomaly(dual_settings.model.teacher.name, device).eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    @torch.no_grad()
    def peer_forward():
        with amp:
            return peer(x)

    @torch.no_grad()
    def stages():  # plantad dual, one stage at a time (for the breakdown)
        with amp:
            feats = dual.teacher(x)
            t0 = _now(device)
            targets, preds = dual._local_pairs(feats)
            t1 = _now(device)
            dual._semantic(x, feats)
            t2 = _now(device)
        amap = gaussian_blur(upsample(torch.zeros(x.shape[0], *dual.teacher.grid, device=device), args.size),
                             dual_settings.scoring.gaussian_sigma)
        top_k_mean(amap, dual_settings.scoring.top_k_fraction)
        t3 = _now(device)
        return t1 - t0, t2 - t1, t3 - t2

    return {
        "teacher forward": lambda: torch.no_grad()(dual.teacher)(x),
        "Dinomaly forward": peer_forward,
        "plantad dual score_batch": lambda: score_batch(dual, x, dual_settings.scoring),
        "plantad local score_batch": lambda: score_batch(local, x, local_settings.scoring),
        "_stages": stages,
    }


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def training_fns(args, device: torch.device) -> Timed:
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    fns: Timed = {}
    for branches in ("dual", "local"):
        settings, model = plantad(args.config, args.size, branches, device)
        opt, sched = build_optimizer(model, settings.train)
        counter = iter(range(10**9))
        fns[f"plantad {branches} train step"] = (
            lambda m=model, o=opt, s=sched, c=counter, st=settings: train_step(m, x, o, s, next(c), st.train))
    peer = dinomaly(settings.model.teacher.name, device).train()
    peer_opt = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=settings.train.lr)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    steps = iter(range(10**9))

    def peer_step():
        with amp:
            loss = peer(x, global_step=next(steps))
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()

    fns["Dinomaly train step"] = peer_step
    return fns


def report(title: str, times: dict[str, list[float]], batch: int, reference: str) -> None:
    print(f"\n{title}")
    print(f"| model | best img/s | median img/s | vs {reference} (best) |")
    print("|---|---|---|---|")
    ref = batch / min(times[reference])
    for name, t in times.items():
        best, med = batch / min(t), batch / statistics.median(t)
        print(f"| {name} | {best:.2f} | {med:.2f} | {best / ref:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/production.yaml")
    parser.add_argument("--size", type=int, default=392)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px, batch {args.batch}, "
          f"{args.rounds} interleaved rounds" + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    for name in args.devices:
        device = torch.device(name)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        fns = scoring_fns(args, device)
        stages = fns.pop("_stages")
        times = interleaved(fns, args.rounds, sync)
        report(f"Scoring on {name} (ratios against Dinomaly's forward)", times, args.batch, "Dinomaly forward")
        split = [stages() for _ in range(args.rounds)]
        parts = ("S_D bottleneck + decoder", "S_E encoder", "maps, blur, top-k")
        teacher_s = min(times["teacher forward"])
        print(f"\nplantad dual per batch of {args.batch} on {name} (best of {args.rounds}): teacher {teacher_s:.3f} s, "
              + ", ".join(f"{p} {min(s[i] for s in split):.3f} s" for i, p in enumerate(parts)))
        del fns, times
        train_times = interleaved(training_fns(args, device), max(2, args.rounds // 2), sync)
        report(f"Training step on {name} (ratios against Dinomaly's step)", train_times, args.batch, "Dinomaly train step")


if __name__ == "__main__":
    main()
