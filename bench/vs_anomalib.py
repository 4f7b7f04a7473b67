"""plantad against anomalib's Dinomaly on the same machine, input size and batch, in one run.

Scoring: images/s of plantad's `score_batch` in several variants (the speed levers of
configs/production.yaml on and off) and of Dinomaly's eval forward (its own maps, blur and top-1%
score) in float32, as anomalib runs it on a CPU, and under the same bf16 autocast as plantad's
`scoring.cpu_amp`; beside them the bare teacher forward (all blocks, and stopped at the deepest
tapped layer) as the reference. On a CPU, also Dinomaly as anomalib deploys it there: exported by its
own `to_openvino` (ONNX, then OpenVINO IR) with each compression type (none: OpenVINO's default
precision, FP16 weights, INT8 weights, INT8_PTQ calibrated on normal demo images), and the bare teacher
as an OpenVINO graph, all compiled with the properties of plantad's production graph and timed in the
same rounds; then a per-stage profile of plantad's production graph and of Dinomaly's exported graph
(bench/exported_peer.py). Training: one optimisation step (forward, backward, AdamW with the
same lr for both; Dinomaly's own optimiser is StableAdamW) on a fixed in-memory batch. A per-stage
breakdown (teacher, S_D, S_E, maps) shows where each plantad variant spends its time in scoring
(not for the OpenVINO rows: their network runs as one graph), and
one for the training step (teacher, each student's forward with its loss and its backward, the
optimiser step) beside Dinomaly's (its frozen encoder timed alone; its decoder forward and loss is
the rest of its forward). All models
have random weights (this machine cannot download DINOv2; speed does not depend on the weights).
Timings are interleaved round-robin, best and median of `--rounds`. On a machine shared with other
jobs, `--clock cpu --threads 1` times the CPU seconds this process spends instead of wall-clock
seconds, which other jobs' load disturbs far less. `--weights` adds plantad's production graphs with fp32
weights and NNCF INT8 (calibrated on normal demo images only) beside them. `--parts flops` counts the work
per image of each scoring forward by stage (torch's FlopCounterMode), untimed. anomalib is an optional extra
(`pip install -e ".[bench]"`); without it the Dinomaly rows are skipped with a note.
Usage: python bench/vs_anomalib.py [--size 392] [--batch 8] [--rounds 5] [--devices cpu cuda]
       [--clock wall|cpu] [--threads N] [--parts scoring profile training flops] [--compile] [--levers]
       [--weights]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from plantad.config import Settings, load_settings
from plantad.models.device import autocast
from plantad.models.exported import OpenVinoModel, for_scoring
from plantad.models.factory import build_model
from plantad.scoring import map_sigma, score_batch, smooth_map
from plantad.training.loop import build_optimizer, easy_fraction, train_step

Timed = dict[str, Callable[[], object]]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set from --clock in main()
unit = "img/s"  # "img per CPU-s" with --clock cpu
T = TypeVar("T")
TODAY = ["model.encoder.shared_blocks=0", "scoring.cpu_amp=false", "train.cpu_amp=false", "scoring.runtime=torch"]
FP32 = ["scoring.cpu_amp=false", "train.cpu_amp=false", "scoring.runtime=torch"]
# not a setting: the teacher's and S_E's last blocks run whole, as before they ran for the class token
# alone (plantad.models.class_token); the same scores, so the row times that lever alone
WHOLE = "bench:whole-last-blocks"
# label -> (model.branches, overrides on configs/production.yaml); the production rows use its defaults
# (scoring.runtime: openvino, so their scoring runs the exported graph; "in torch" runs it eagerly).
# "fp32" holds on CPU only: on CUDA every plantad row runs under bf16 autocast (train.amp), in torch
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plantad dual, paper S_E, fp32 (before)": ("dual", TODAY),
    "plantad dual, shared S_E, fp32": ("dual", [*FP32, "model.encoder.shared_blocks=8"]),
    "plantad dual, production in torch": ("dual", ["scoring.runtime=torch"]),
    "plantad dual, production": ("dual", []),
    "plantad dual, production, last blocks whole (before)": ("dual", [WHOLE]),
    # the paper's S_E on a 224 px view of the 392 px input [reconstructed lever; target: the full-size class token]
    "plantad dual, production, S_E on a 224 px view": ("dual", ["model.encoder.image_size=224"]),
    # a milder view: 294 of 392 px (441 of S_E's 784 patch tokens)
    "plantad dual, production, S_E on a 294 px view": ("dual", ["model.encoder.image_size=294"]),
    "plantad local, fp32": ("local", FP32),
    "plantad local, production in torch": ("local", ["scoring.runtime=torch"]),
    "plantad local, production": ("local", []),
}


def variants(size: int) -> dict[str, tuple[str, list[str]]]:
    """VARIANTS without the S_E views larger than the input (`--size` below 294 or 224 px)."""
    def view(overrides: list[str]) -> int:
        return max([int(o.split("=")[1]) for o in overrides if o.startswith("model.encoder.image_size=")], default=0)

    return {label: v for label, v in VARIANTS.items() if view(v[1]) <= size}


PEER_OV = "Dinomaly, anomalib's to_openvino, default precision"
TARGETS = [  # the speed targets: (what, row, reference, at least)
    ("production dual scoring vs Dinomaly exported to OpenVINO", "plantad dual, production", PEER_OV, 1.0),
    ("production local-only scoring vs Dinomaly exported to OpenVINO", "plantad local, production", PEER_OV, 1.3),
    ("dual train step vs Dinomaly's at equal precision (bf16)", "plantad dual, production",
     "Dinomaly train step, bf16", 1.0),
]


def have_anomalib() -> bool:
    try:
        import anomalib  # noqa: F401
    except ImportError as exc:
        print(f"\nNOTE: anomalib is not installed ({exc}); the Dinomaly rows are skipped "
              "(pip install -e \".[bench]\")")
        return False
    return True


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


def plantad(config: str, size: int, branches: str, device: torch.device, overrides: list[str] = ()
            ) -> tuple[Settings, torch.nn.Module]:
    settings = load_settings(config, ["model.teacher.weights=random", f"data.image_size={size}",
                                      f"model.branches={branches}", *(o for o in overrides if o != WHOLE)])
    model = build_model(settings).to(device)
    model.noisy_or.threshold.fill_(0.5)
    if WHOLE in overrides:  # the class token's distance reads only token 0 either way
        model.teacher.class_token_only = False
        if model.encoder is not None:
            model.encoder.patch_mean = True
    return settings, model


def bf16(device: torch.device, on: bool = True) -> contextlib.AbstractContextManager:
    """The autocast plantad uses (train.amp on CUDA, cpu_amp on CPU), for the peer as well."""
    return autocast(device, on, on)


def interleaved(fns: Timed, rounds: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each fn, round-robin so background load hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = clock()
            fn()
            sync()
            times[name].append(clock() - t)
    return times


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock()


def stage_times(model: torch.nn.Module, settings: Settings, x: torch.Tensor) -> list[float]:
    """Seconds of teacher, S_D (bottleneck, decoder, distance), S_E and maps for one batch."""
    device, size = x.device, settings.data.image_size
    t = [_now(device)]
    with torch.no_grad(), autocast(device, settings.train.amp, settings.scoring.cpu_amp):
        feats = model.teacher(x)
        t.append(_now(device))
        patch = model._local_map(*model._local_pairs(feats)) if model.decoder is not None else None
        t.append(_now(device))
        if model.encoder is not None:
            model._semantic(x, feats)
        t.append(_now(device))
    if patch is not None:
        amap = smooth_map(patch.float().reshape(x.shape[0], *model.teacher.grid), size,
                          map_sigma(settings.scoring.gaussian_sigma, size))
        model.image_score(amap, settings.scoring)
    t.append(_now(device))
    return [b - a for a, b in zip(t, t[1:])]


Profiles = dict[str, Callable[[], dict[str, float]]]


def scoring_fns(args, device: torch.device, peer_ok: bool
                ) -> tuple[Timed, dict[str, Callable[[], list[float]]], Profiles]:
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    models = {label: plantad(args.config, args.size, br, device, ov) for label, (br, ov) in variants(args.size).items()}
    teacher_name = models["plantad dual, production"][0].model.teacher.name
    full_teacher = models["plantad dual, paper S_E, fp32 (before)"][1].teacher
    early_teacher = models["plantad local, fp32"][1].teacher

    def teacher_bf16():
        with bf16(device):
            return full_teacher(x)

    fns: Timed = {
        "teacher forward, all blocks": lambda: full_teacher(x),
        "teacher forward, all blocks, bf16": teacher_bf16,
        f"teacher forward, {early_teacher.blocks_run} blocks": lambda: early_teacher(x),
    }
    if peer_ok:
        peer = dinomaly(teacher_name, device).eval()

        def peer_forward(on: bool):
            with torch.no_grad(), bf16(device, on):
                return peer(x)

        fns["Dinomaly forward, fp32"] = lambda: peer_forward(False)
        fns["Dinomaly forward, bf16"] = lambda: peer_forward(True)
    scorers = {label: for_scoring(model, settings.scoring, None) for label, (settings, model) in models.items()}
    for label, (settings, _) in models.items():  # scoring.runtime as serving would run it
        fns[label] = lambda s=settings, m=scorers[label]: score_batch(m, x, s.scoring)
    if args.compile:  # torch.compile (inductor) of the production dual model in torch; it compiles in the warm-up
        settings, model = models["plantad dual, production"]
        compiled = torch.compile(model)
        fns["plantad dual, production in torch, torch.compile"] = lambda: score_batch(
            compiled, x, settings.scoring.model_copy(update={"runtime": "torch"}))
    stages = {label: (lambda s=settings, m=model: stage_times(m, s, x)) for label, (settings, model) in models.items()
              if settings.scoring.runtime == "torch"}  # an OpenVINO graph has no stages to time
    report_agreement(*models["plantad dual, production"], x)
    profiles: Profiles = {}
    if device.type == "cpu":
        profiles = exported_fns(args, x, scorers["plantad dual, production"], models["plantad dual, production"][0],
                                full_teacher, peer_ok, fns)
        if args.weights and "scoring" in args.parts:
            weight_fns(args, x, {k: (models[k][0], scorers[k]) for k in WEIGHT_ROWS}, fns)
    return fns, stages, profiles


WEIGHT_ROWS = ["plantad dual, production", "plantad local, production"]


def weight_fns(args, x: torch.Tensor, graphs: dict[str, tuple[Settings, torch.nn.Module]], fns: Timed) -> None:
    """Adds rows for the production graphs with other weight storage (bench/exported_peer.py WEIGHTS),
    INT8 calibrated on 16 normal demo images; prints each one's largest probability gap against the
    production graph on the demo's test images of category metal (8 good, 8 of each of its 3 defect
    types), the Noisy-OR fitted on the normal ones."""
    import exported_peer
    from plantad.evaluation.metrics import image_auroc as auroc

    with exported_peer.demo_images(args.size, 16, 8) as (normal, test, labels):
        for row, (settings, graph) in graphs.items():
            if not isinstance(graph, OpenVinoModel):
                continue
            normal_scores = score_batch(graph, normal, settings.scoring)
            graph.noisy_or.fit(normal_scores.local_score, normal_scores.semantic_score)
            ref = score_batch(graph, test, settings.scoring).probability
            print(f"\n{row}: weights against its production graph on {len(labels)} demo test images "
                  f"({int(labels.sum())} defective), random weights, "
                  f"Noisy-OR fitted on the 16 normal images (image AUROC of the production graph "
                  f"{auroc(labels.numpy(), ref.numpy()):.3f})")
            for label, lever in exported_peer.weight_graphs(graph, normal, exported_peer.compile_config(graph)).items():
                got = score_batch(lever, test, settings.scoring).probability
                print(f"- {label}: largest probability gap {float((got - ref).abs().max()):.2e}, "
                      f"image AUROC {auroc(labels.numpy(), got.numpy()):.3f}")
                fns[f"{row}, {label}"] = lambda m=lever, s=settings: score_batch(m, x, s.scoring)


def exported_fns(args, x: torch.Tensor, graph: torch.nn.Module, settings: Settings, full_teacher: torch.nn.Module,
                 peer_ok: bool, fns: Timed) -> Profiles:
    """Adds the OpenVINO rows to `fns` (the bare teacher; anomalib's own exports of Dinomaly), compiled
    with the properties of plantad's production graph; returns the per-stage profiles to run."""
    import tempfile

    import exported_peer

    if not isinstance(graph, OpenVinoModel):
        print("\nNOTE: plantad's production graph did not load (see the warning above); no OpenVINO rows")
        return {}
    config = exported_peer.compile_config(graph)
    print(f"\nOpenVINO {exported_peer.import_openvino().__version__}: every graph compiled on CPU with {config} "
          "(read back from plantad's production graph), one reused infer request each")
    timed = "scoring" in args.parts
    if timed and args.levers:  # only the production rows, the peer's default export and the levers
        for key in [k for k in fns if not k.endswith(", production")]:
            del fns[key]
        for label, lever in exported_peer.lever_graphs(graph, tuple(x.shape), config).items():
            fns[f"plantad dual, production, OpenVINO {label}"] = lambda m=lever: score_batch(m, x, settings.scoring)
    elif timed:
        teacher = exported_peer.teacher_graph(full_teacher, args.size, config)
        fns["teacher forward, all blocks, OpenVINO"] = lambda: teacher(x)
    profiles: Profiles = {"plantad dual, production (OpenVINO graph)": lambda: exported_peer.plantad_profile(
        graph, settings, x, config, args.rounds)}
    if not peer_ok:
        return profiles
    images = torch.rand_like(x)  # anomalib's graph takes images in [0, 1] and normalises them itself
    peer = exported_peer.peer_model(settings.model.teacher.name, args.size, no_download)
    graphs = {}
    if timed:
        with tempfile.TemporaryDirectory(prefix="plantad-peer-ov-") as tmp:
            graphs = exported_peer.peer_graphs(peer, args.size, args.batch, config, Path(tmp), compressions={
                k: v for k, v in exported_peer.COMPRESSIONS.items() if not args.levers or v is None})
    for label, compiled in graphs.items():
        fns[f"Dinomaly, anomalib's to_openvino, {label}"] = lambda g=compiled: g(images)
    profiles["anomalib Dinomaly, to_openvino, default precision"] = lambda: exported_peer.peer_profile(
        peer, args.size, images, config, args.rounds)
    return profiles


TRAIN_STAGES = ["teacher / encoder", "S_D fwd + loss", "S_E fwd + loss", "S_D bwd", "S_E bwd", "optimiser"]


def train_stage_times(model: torch.nn.Module, settings: Settings, x: torch.Tensor, opt: torch.optim.Optimizer,
                      step: int) -> list[float]:
    """Seconds per stage of one training step, as train_step runs it; each student's loss is
    back-propagated on its own (their graphs share nothing trainable, so the gradients are the same)."""
    device, cfg = x.device, settings.train
    model.train()
    frac = easy_fraction(step, cfg.hard_mining)
    t = [_now(device)]
    with autocast(device, cfg.amp, cfg.cpu_amp):
        feats = model.teacher(x)
        t.append(_now(device))
        local = semantic = None
        if model.decoder is not None:
            local = model._local_loss(*model._local_pairs(feats), frac, cfg.hard_mining.factor)
        t.append(_now(device))
        if model.encoder is not None:
            semantic = model._semantic(x, feats).mean()
        t.append(_now(device))
        w_local, w_sem = model.noisy_or.training_weights(local, semantic)
    opt.zero_grad(set_to_none=True)
    for w, loss in ((w_local, local), (w_sem, semantic)):
        if loss is not None:
            (w * loss).backward()
        t.append(_now(device))
    if cfg.grad_clip:
        for group in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], cfg.grad_clip)
    opt.step()
    t.append(_now(device))
    return [b - a for a, b in zip(t, t[1:])]


def training_fns(args, device: torch.device, peer_ok: bool) -> tuple[Timed, dict[str, Callable[[], list[float]]]]:
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    fns: Timed = {}
    stages: dict[str, Callable[[], list[float]]] = {}
    for label, (branches, overrides) in variants(args.size).items():
        if label.endswith("production in torch"):
            continue  # the runtime is scoring's only: these train like the production row
        settings, model = plantad(args.config, args.size, branches, device, overrides)
        opt, sched = build_optimizer(model, settings.train)
        counter = iter(range(10**9))
        fns[label] = lambda m=model, o=opt, s=sched, c=counter, st=settings: train_step(m, x, o, s, next(c), st.train)
        stages[label] = lambda m=model, o=opt, c=counter, st=settings: train_stage_times(m, st, x, o, next(c))
    if not peer_ok:
        return fns, stages
    peer = dinomaly(settings.model.teacher.name, device).train()
    peer_opt = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=settings.train.lr)
    steps = iter(range(10**9))

    def peer_step(on: bool, split: bool = False) -> list[float]:
        t = [_now(device)]
        if split:  # the frozen encoder alone (Dinomaly runs it under no_grad)
            with torch.no_grad(), bf16(device, on):
                peer.encoder(x)
            t.append(_now(device))
        with bf16(device, on):
            loss = peer(x, global_step=next(steps))
        t.append(_now(device))
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(_now(device))
        peer_opt.step()
        t.append(_now(device))
        if not split:
            return []
        encoder, forward, backward, step = [b - a for a, b in zip(t, t[1:])]
        return [encoder, max(forward - encoder, 0.0), 0.0, backward, 0.0, step]

    fns["Dinomaly train step, fp32"] = lambda: peer_step(False)
    fns["Dinomaly train step, bf16"] = lambda: peer_step(True)
    stages["Dinomaly train step, fp32"] = lambda: peer_step(False, split=True)
    stages["Dinomaly train step, bf16"] = lambda: peer_step(True, split=True)
    return fns, stages


def report(title: str, times: dict[str, list[float]], batch: int, references: list[str]) -> dict[str, float]:
    """Print the table; returns best images/s per row."""
    best = {name: batch / min(t) for name, t in times.items()}
    print(f"\n{title}")
    print(f"| model | best {unit} | median {unit} | " + " | ".join(f"vs {r}" for r in references) + " |")
    print("|---|---|---|" + "---|" * len(references))
    for name, t in times.items():
        ratios = " | ".join(f"{best[name] / best[r]:.2f}" for r in references)
        print(f"| {name} | {best[name]:.2f} | {batch / statistics.median(t):.2f} | {ratios} |", flush=True)
    return best


def report_stages(title: str, columns: list[str], stages: dict[str, Callable[[], list[float]]], rounds: int,
                  batch: int, device: str) -> None:
    """Per-stage seconds (best of `rounds` per stage) and their sum; for Dinomaly's training step the
    S_D columns hold its bottleneck and decoder."""
    runs: dict[str, list[list[float]]] = {k: [] for k in stages}
    for _ in range(rounds):
        for name, fn in stages.items():
            runs[name].append(fn())
    clock_name = "CPU seconds" if unit != "img/s" else "seconds"
    print(f"\n{title}: where the time goes, {clock_name} per batch of {batch} on {device} (best of {rounds}, "
          "interleaved)")
    print("| model | " + " | ".join(columns) + " | sum |\n|---|" + "---|" * (len(columns) + 1))
    for name, split in runs.items():
        best = [min(s[i] for s in split) for i in range(len(columns))]
        print(f"| {name} | " + " | ".join(f"{b:.3f}" for b in best) + f" | {sum(best):.3f} |", flush=True)


def report_agreement(settings: Settings, model: torch.nn.Module, x: torch.Tensor) -> None:
    """bf16 against float32 on the same model and batch (raw scores: random weights, no calibration)."""
    if not settings.scoring.cpu_amp or x.device.type != "cpu":
        return
    ref = score_batch(model, x, settings.scoring.model_copy(update={"cpu_amp": False}))
    low = score_batch(model, x, settings.scoring)
    pairs = {"map": (low.anomaly_map, ref.anomaly_map), "S_D score": (low.local_score, ref.local_score),
             "S_E score": (low.semantic_score, ref.semantic_score)}
    print("\nbf16 against fp32, production dual model, same weights and batch (max |difference| / max |fp32 value|): "
          + ", ".join(f"{k} {float((a - b).abs().max()):.2e} / {float(b.abs().max()):.2e}"
                      for k, (a, b) in pairs.items()))


def flop_split(model: torch.nn.Module, run: Callable[[], object], parts: tuple[str, ...], grad: bool = False
               ) -> tuple[list[float], dict[str, float]]:
    """GFLOPs of one call of `run` per child module of `model` named in `parts`, then the rest, as
    torch's FlopCounterMode counts them: matrix products (attention's included, run as such here),
    convolutions; element-wise ops are not counted. A ModuleList child counts as the sum of its
    members. Also every module's GFLOPs by its qualified name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # attention as its matrix products: the counter has no formula for the CPU's fused kernels
    with torch.set_grad_enabled(grad), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        run()
    counts = {k: sum(v.values()) / 1e9 for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__

    def part(name: str) -> float:
        prefix = f"{root}.{name}"
        if prefix in counts:
            return counts[prefix]
        return sum(v for k, v in counts.items() if k.startswith(prefix + ".") and k[len(prefix) + 1:].isdigit())

    split = [part(p) for p in parts]
    return [*split, counts.get("Global", 0.0) - sum(split)], counts


def report_flops(args, device: torch.device, peer_ok: bool) -> None:
    """GFLOPs per image of one scoring forward, by stage, and the throughput ratio they allow: at
    equal speed per FLOP a model is as much faster than the other as it does less work."""
    x = torch.randn(1, 3, args.size, args.size, device=device)
    rows: dict[str, list[float]] = {}
    steps: dict[str, float] = {}
    for label in ("plantad dual, production", "plantad local, production"):
        settings, model = plantad(args.config, args.size, VARIANTS[label][0], device, VARIANTS[label][1])
        scoring = settings.scoring.model_copy(update={"runtime": "torch", "cpu_amp": False})
        rows[label], _ = flop_split(model.eval(), lambda m=model, c=scoring: score_batch(m, x, c),
                                    ("teacher", "decoder", "encoder"))
        opt, sched = build_optimizer(model, settings.train)  # train_step puts the model in training mode
        steps[label] = sum(flop_split(model, lambda m=model, o=opt, sc=sched, st=settings: train_step(
            m, x, o, sc, 0, st.train), (), grad=True)[0])
        teacher_name = settings.model.teacher.name
    if peer_ok:
        peer = dinomaly(teacher_name, device).eval()
        (enc, bottleneck, decoder, rest), counts = flop_split(peer, lambda: peer(x),
                                                              ("encoder", "bottleneck", "decoder"))
        rows[PEER] = [enc, bottleneck + decoder, 0.0, rest]
        # its torch forward runs every encoder block; nothing reads those after the last target layer
        last = max(peer.target_layers)
        unused = sum(v for k, v in counts.items()
                     if (m := re.search(r"\.encoder\..*\bblocks\.(\d+)$", k)) and int(m.group(1)) > last)
        rows[PEER_NEEDED.format(last=last)] = [enc - unused, bottleneck + decoder, 0.0, rest]
        peer.train()
        steps[PEER] = sum(flop_split(peer, lambda: peer(x, global_step=0).backward(), (), grad=True)[0])
    refs = [r for r in rows if r.startswith(PEER)]
    print(f"\nWork per image, GFLOPs of one scoring forward at {args.size} px (torch's FlopCounterMode: matrix "
          "products, convolutions, attention), and the throughput ratio it allows against Dinomaly")
    print("| model | teacher (Dinomaly: encoder) | S_D (Dinomaly: bottleneck + decoder) | S_E | maps, scores | total | "
          + " | ".join(f"{r} / this" for r in refs) + " |\n|---|---|---|---|---|---|" + "---|" * len(refs))
    for label, split in rows.items():
        print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in split) + f" | {sum(split):.2f} | "
              + " | ".join(f"{sum(rows[r]) / sum(split):.3f}" for r in refs) + " |", flush=True)
    print(f"\nWork per image of one training step at {args.size} px (forward and backward), GFLOPs")
    print("| model | GFLOPs | " + (f"{PEER} / this |\n|---|---|---|" if PEER in steps else "\n|---|---|"))
    for label, total in steps.items():
        print(f"| {label} | {total:.2f} | " + (f"{steps[PEER] / total:.3f} |" if PEER in steps else ""), flush=True)


PEER = "anomalib Dinomaly"
PEER_NEEDED = PEER + ", encoder blocks 0 to {last} only (what its outputs need)"
SCORE_REFS = (PEER_OV, "Dinomaly forward, bf16", "teacher forward, all blocks")
TRAIN_REFS = ("Dinomaly train step, bf16",)


def kept(fns: dict[str, T], rows: re.Pattern[str] | None, refs: tuple[str, ...]) -> dict[str, T]:
    """The rows `--rows` asks for, and the reference rows the ratios are taken against."""
    return {k: v for k, v in fns.items() if rows is None or k in refs or rows.search(k)}


def report_targets(score: dict[str, float], train: dict[str, float]) -> None:
    print("\nspeed targets (ratios of best throughput in this run; production rows use bf16 on CPU)")
    for what, row, ref, goal in TARGETS:
        table = train if "train" in ref else score
        if row in table and ref in table:
            ratio = table[row] / table[ref]
            print(f"- {what}: {ratio:.2f} (target >= {goal}: {'met' if ratio >= goal else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/production.yaml")
    parser.add_argument("--size", type=int, default=392)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--parts", nargs="+", choices=["scoring", "profile", "training", "flops"],
                        default=["scoring", "profile", "training"],
                        help="profile: of the OpenVINO graphs (CPU); flops: work per image by stage (not timed)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (compiles for about 1 min)")
    parser.add_argument("--levers", action="store_true",
                        help="OpenVINO compile levers for the production graph, beside the production rows only")
    parser.add_argument("--rows", type=re.compile, default=None, metavar="REGEX",
                        help="time only the rows whose label matches (the reference rows are always kept)")
    parser.add_argument("--weights", action="store_true",
                        help="rows for the production graphs with fp32 and NNCF INT8 weights (quantizing takes ~1 min)")
    args = parser.parse_args()
    global clock, unit
    clock = CLOCKS[args.clock]
    unit = "img/s" if args.clock == "wall" else "img per CPU-s"
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, {args.size} px, "
          f"batch {args.batch}, {args.rounds} interleaved rounds"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    peer_ok = have_anomalib()
    for name in args.devices:
        device = torch.device(name)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        score: dict[str, float] = {}
        train: dict[str, float] = {}
        if "flops" in args.parts:
            report_flops(args, device, peer_ok)
        if "scoring" in args.parts or "profile" in args.parts:
            fns, stages, profiles = scoring_fns(args, device, peer_ok)
            fns, stages = kept(fns, args.rows, SCORE_REFS), kept(stages, args.rows, SCORE_REFS)
            if "scoring" in args.parts:
                refs = [r for r in SCORE_REFS if r in fns]
                with torch.no_grad():
                    score = report(f"Scoring on {name}", interleaved(fns, args.rounds, sync), args.batch, refs)
                report_stages("Scoring", ["teacher", "S_D", "S_E", "maps, blur, top-k"], stages, args.rounds,
                              args.batch, name)
            if "profile" in args.parts:
                import exported_peer

                for label, run_profile in profiles.items():
                    exported_peer.report_profile(f"{label}, where the time goes", run_profile(), args.batch)
            del fns, stages, profiles
        if "training" in args.parts:
            train_fns, train_stages = training_fns(args, device, peer_ok)
            train_fns, train_stages = kept(train_fns, args.rows, TRAIN_REFS), kept(train_stages, args.rows, TRAIN_REFS)
            train_rounds = max(2, args.rounds // 2)
            train_times = interleaved(train_fns, train_rounds, sync)
            refs = [r for r in TRAIN_REFS if r in train_fns]
            train = report(f"Training step on {name}", train_times, args.batch, refs)
            report_stages("Training step", TRAIN_STAGES, train_stages, train_rounds, args.batch, name)
            del train_fns, train_stages
        report_targets(score, train)


if __name__ == "__main__":
    main()
