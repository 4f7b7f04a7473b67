"""Accuracy benchmark: train and evaluate each model variant on the demo (defects, with masks) and
the semantic demo (object families, image-level labels only), all in one run.

Per row: image AUROC / AP, pixel AUROC / AUPRO (n/a without masks or without a local branch), the
cross-class interference probes (mixup of two categories, a patch of one pasted into another,
scored against the normal test images) and wall times. A second table gives each branch's raw score
alone and the joined score under the earlier scale-only fusion and the offset-and-spread fusion the
model stores (same model, same held-out normal images: equal training steps); a third the false-alarm
rate promised at the stored threshold, the rate on the normal test images and recall there; a last
one summarises each variant over its seeds.

Training time is the process's CPU seconds per training step (the mean over steps 2 to n: the first
step's one-off set-up left out), times the steps. With --equal-time, each variant is first timed for
a few steps; within each group of variants with the same model.branches, the dearest (most CPU
seconds per step) trains train.steps and each other variant the steps its own measured cost fits in
the same time, with its warm-up and hard-mining ramp scaled alike. Run it with one torch thread
(OMP_NUM_THREADS=1) so that CPU seconds measure work, not spinning threads on a shared machine.

Usage: python bench/accuracy.py [--config params.yaml] [--set key=value ...] [--work DIR]
       [--datasets demo,semantic] [--variants sd,se,se_patch,dual,dual_patch] [--seeds 0,1,2] [--json rows.json]
       python bench/accuracy.py --variants se,se_shared,dual,dual_shared --equal-time  (the lighter S_E)
       python bench/accuracy.py --tables rows-a.json rows-b.json  (the tables of saved runs, together)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plantad.config import load_settings
from plantad.data.demo import generate_demo, generate_semantic_demo
from plantad.data.manifest import scan_dataset
from plantad.data.dataset import split_holdout
from plantad.evaluation.evaluate import evaluate_model, predict
from plantad.evaluation.interference import PROBE_KINDS, interference_probes
from plantad.evaluation.metrics import compute_metrics, image_auroc
from plantad.models.checkpoint import load_model
from plantad.models.noisy_or import fit_lambda, noisy_or, score_to_probability
from plantad.serving.predictor import Predictor
from plantad.training.trainer import normal_train_rows, train_model

KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")
VARIANTS: dict[str, tuple[str, list[str]]] = {  # name -> (table label, overrides)
    "sd": ("S_D alone", ["model.branches=local"]),
    "se": ("S_E alone, class token", ["model.branches=semantic", "model.encoder.distill_patch_mean=false"]),
    "se_patch": ("S_E alone, + patch mean", ["model.branches=semantic", "model.encoder.distill_patch_mean=true"]),
    "dual": ("dual, S_E class token", ["model.branches=dual", "model.encoder.distill_patch_mean=false"]),
    "dual_patch": ("dual, S_E + patch mean", ["model.branches=dual", "model.encoder.distill_patch_mean=true"]),
    # the lighter S_E [reconstructed]: it shares the teacher's first 4 of the demo's 6 blocks (production:
    # 8 of 12) and trains the remaining 2 from scratch; the rows above are the paper's S_E
    "se_shared": ("S_E alone, on teacher blocks 0-3", [
        "model.branches=semantic", "model.encoder.distill_patch_mean=false", "model.encoder.shared_blocks=4",
        "model.encoder.depth=null"]),
    "dual_shared": ("dual, S_E on teacher blocks 0-3", [
        "model.branches=dual", "model.encoder.distill_patch_mean=false", "model.encoder.shared_blocks=4",
        "model.encoder.depth=null"]),
    # the paper's S_E on a downscaled view [reconstructed, a speed lever]: a 40 px view of a 64 px input
    # (--set data.image_size=64; production: 224 of 392), its target the full-size class token
    "se_view": ("S_E alone, on a 40 px view", [
        "model.branches=semantic", "model.encoder.distill_patch_mean=false", "model.encoder.image_size=40"]),
    "dual_view": ("dual, S_E on a 40 px view", [
        "model.branches=dual", "model.encoder.distill_patch_mean=false", "model.encoder.image_size=40"]),
    # a milder view: 48 px of 64 (36 of the 64 patch tokens; production: 294 of 392 px)
    "se_view48": ("S_E alone, on a 48 px view", [
        "model.branches=semantic", "model.encoder.distill_patch_mean=false", "model.encoder.image_size=48"]),
    "dual_view48": ("dual, S_E on a 48 px view", [
        "model.branches=dual", "model.encoder.distill_patch_mean=false", "model.encoder.image_size=48"]),
    # every other model.method, and SNL's ablations on the RD student; "no structural losses" keeps
    # only the channel-wise distillation (the RD/FD baselines' loss)
    "snl_rd": ("SNL, RD student", ["model.method=snl_rd"]),
    "snl_rd_no_structural": ("SNL RD, no structural losses", [
        "model.method=snl_rd", "model.snl.weight_spatial=0", "model.snl.weight_intra=0",
        "model.snl.weight_inter=0", "model.snl.map_intra_weight=0"]),
    "snl_rd_no_cram": ("SNL RD, no CRAM", ["model.method=snl_rd", "model.snl.cram=false"]),
    "snl_fd": ("SNL, FD student", ["model.method=snl_fd"]),
    "dual_snl": ("dual_snl", ["model.method=dual_snl"]),
}
DEFAULT_VARIANTS = "sd,se,se_patch,dual,dual_patch"
METHOD_VARIANTS = "dual,snl_rd,snl_rd_no_structural,snl_rd_no_cram,snl_fd,dual_snl"
PROBES_PER_PAIR = 4
TIMING_STEPS = 8  # --equal-time: steps each variant is timed for before the budget is set


def make_data(name: str, work: Path, config: str, overrides: list[str]) -> Path:
    base = load_settings(config, overrides)
    data = work / name
    if not data.exists():
        if name == "demo":
            generate_demo(data, base.demo)
        else:
            generate_semantic_demo(data, base.semantic_demo, seed=base.demo.seed)
    return data


def probe_aurocs(model_dir: Path, manifest: Any, data: Path, normal_probability: np.ndarray) -> dict[str, float]:
    """AUROC of each probe kind (positives) against the normal test images (negatives)."""
    predictor = Predictor.load(str(model_dir), device="cpu")
    probes = interference_probes(manifest, data, PROBES_PER_PAIR)
    out = {}
    for kind in PROBE_KINDS:
        scores = [s.probability for s in predictor.score([p.image for p in probes if p.kind == kind])]
        labels = np.r_[np.zeros(len(normal_probability)), np.ones(len(scores))]
        out[f"probe_{kind}"] = image_auroc(labels, np.r_[normal_probability, scores])
    return out


def branch_aurocs(pred: Any) -> dict[str, float | None]:
    """Image AUROC (mean over categories, as in the metrics) of each raw branch score on its own."""
    cats = pred.rows["category"].to_numpy()
    return {f"auroc_{name}": None if s is None else compute_metrics(pred.labels, s, cats)["image_auroc"]
            for name, s in (("local", pred.local_score), ("semantic", pred.semantic_score))}


def scale_rule_auroc(pred: Any, holdout: Any, settings: Any) -> float | None:
    """Joined image AUROC under the earlier fusion (p_k = 1 - exp(-lambda_k s_k), lambda_k mapping the
    normal calibration quantile to calibration_probability, no offset) on the same model and holdout."""
    if pred.local_score is None or pred.semantic_score is None:
        return None
    cfg = settings.model.noisy_or
    probs = [score_to_probability(torch.from_numpy(test), torch.tensor(fit_lambda(
        torch.from_numpy(held), cfg.calibration_quantile, cfg.calibration_probability)))
        for test, held in ((pred.local_score, holdout.local_score), (pred.semantic_score, holdout.semantic_score))]
    joined = noisy_or(*probs).numpy()
    return compute_metrics(pred.labels, joined, pred.rows["category"].to_numpy())["image_auroc"]


def gap_to_best_branch(pred: Any, joined: np.ndarray, draws: int = 1000) -> tuple[float, float, float]:
    """Joined image AUROC minus the better branch's (the branch better on these test images), and a 95%
    bootstrap interval of that difference (test images resampled within category and label, paired)."""
    cats = pred.rows["category"].to_numpy()
    scores = {"joined": joined, "local": pred.local_score, "semantic": pred.semantic_score}

    def mean_auroc(idx: np.ndarray) -> dict[str, float]:
        per = {k: [image_auroc(pred.labels[idx[cats[idx] == c]], v[idx[cats[idx] == c]]) for c in np.unique(cats)]
               for k, v in scores.items()}
        return {k: float(np.mean(v)) for k, v in per.items()}

    full = mean_auroc(np.arange(len(cats)))
    best = max(("local", "semantic"), key=lambda k: full[k])
    strata = [np.flatnonzero((cats == c) & (pred.labels == y)) for c in np.unique(cats) for y in (0, 1)]
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(draws):
        idx = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        m = mean_auroc(idx)
        gaps.append(m["joined"] - m[best])
    low, high = np.quantile(gaps, [0.025, 0.975])
    return full["joined"] - full[best], float(low), float(high)


def holdout_predictions(model: Any, manifest: Any, data: Path, settings: Any) -> Any:
    """The raw branch scores of the held-out normal images the model was calibrated on."""
    _, rows = split_holdout(normal_train_rows(manifest), settings.data.holdout_fraction, settings.train.seed,
                            settings.data.holdout_min_images)
    return predict(model, rows.reset_index(drop=True), data, settings, progress=False)


def timed_train(settings: Any, manifest: Any, data: Path, out_dir: Path) -> tuple[Any, float]:
    """Train; returns the result and the process's CPU seconds per step (mean over steps 2 to n)."""
    marks: list[float] = []
    result = train_model(settings, manifest, data, out_dir, on_step=lambda step, logs: marks.append(time.process_time()),
                         progress=False)
    if len(marks) < 2:
        raise ValueError(f"train.steps={settings.train.steps}: timing a training step needs at least 2 steps")
    return result, float(np.mean(np.diff(marks)))


def equal_time_overrides(seconds_per_step: dict[str, float], train: Any) -> dict[str, list[str]]:
    """Per variant, the train.* overrides that give it the training time of the dearest variant (most
    CPU seconds per step) at train.steps: its own steps from its own cost, warm-up and ramp scaled alike."""
    if not seconds_per_step or min(seconds_per_step.values()) <= 0:
        raise ValueError(f"equal training time needs a positive time per step for every variant: {seconds_per_step}")
    budget = train.steps * max(seconds_per_step.values())
    out = {}
    for variant, cost in seconds_per_step.items():
        steps = max(1, round(budget / cost))
        scale = steps / train.steps
        out[variant] = [f"train.steps={steps}", f"train.warmup_steps={round(train.warmup_steps * scale)}",
                        f"train.hard_mining.ramp_steps={round(train.hard_mining.ramp_steps * scale)}"]
    return out


def equal_time_plan(dataset: str, data: Path, manifest: Any, variants: list[str], config: str,
                    overrides: list[str], work: Path) -> dict[str, list[str]]:
    """Time each variant for TIMING_STEPS steps, then equal_time_overrides within each model.branches group."""
    groups: dict[str, dict[str, float]] = {}
    for variant in variants:
        settings = load_settings(config, [*overrides, *VARIANTS[variant][1], f"train.steps={TIMING_STEPS}"])
        out = work / f"timing-{dataset}-{variant}"
        _, cost = timed_train(settings, manifest, data, out)
        shutil.rmtree(out, ignore_errors=True)
        groups.setdefault(str(settings.model.branches), {})[variant] = cost
        print(f"  timing {variant}: {cost:.3f} CPU s per step", flush=True)
    train = load_settings(config, overrides).train
    plan = {v: o for group in groups.values() for v, o in equal_time_overrides(group, train).items()}
    print(f"  equal time: {', '.join(f'{v} {o[0]}' for v, o in plan.items())}", flush=True)
    return plan


def run_variant(dataset: str, data: Path, manifest: Any, variant: str, config: str, overrides: list[str],
                work: Path) -> dict[str, Any]:
    settings = load_settings(config, [*overrides, *VARIANTS[variant][1]])
    t0 = time.perf_counter()
    result, cpu_per_step = timed_train(settings, manifest, data,
                                       work / f"model-{dataset}-{variant}-{settings.train.seed}")
    t1 = time.perf_counter()
    model, _ = load_model(result.model_path)
    metrics, pred = evaluate_model(model, manifest, data, settings, progress=False)
    t2 = time.perf_counter()
    normal = pred.probability[pred.labels == 0]
    fa = metrics["false_alarm"]
    return {"dataset": dataset, "variant": variant, **{k: metrics[k] for k in KEYS},
            **probe_aurocs(result.model_path.parent, manifest, data, normal), **branch_aurocs(pred),
            "auroc_joined": metrics["branches"]["joined"]["image_auroc"],
            "gap_to_best": None if pred.semantic_score is None or pred.local_score is None
            else gap_to_best_branch(pred, pred.probability),
            "seed": settings.train.seed,
            "auroc_joined_scale_rule": scale_rule_auroc(pred, holdout_predictions(model, manifest, data, settings),
                                                        settings),
            "fa_promised": fa["promised"], "fa_promised_90": fa["promised_90"], "fa_requested": fa["requested"],
            "fa_images": fa["threshold_images"],
            "fa_achieved": fa["achieved"], "fa_ci": (fa["ci_low"], fa["ci_high"]), "fa_normal": fa["normal_images"],
            "recall_at_threshold": metrics["at_threshold"]["recall"],
            "train_s": t1 - t0, "eval_s": t2 - t1, "per_category": metrics["per_category"],
            "steps": settings.train.steps, "train_cpu_s": cpu_per_step * settings.train.steps,
            "branches": metrics["branches"], "labels": pred.labels.tolist(),
            "categories": pred.rows["category"].tolist(), "probability": pred.probability.tolist(),
            **{f"score_{k}": None if v is None else v.tolist()
               for k, v in (("local", pred.local_score), ("semantic", pred.semantic_score))}}


def fmt(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def print_tables(rows: list[dict[str, Any]]) -> None:
    print("\n| data | model | image AUROC | image AP | pixel AUROC | AUPRO | mixup probe AUROC | paste probe AUROC "
          "| steps | train CPU s | train s | eval s |")
    print("|---" * 12 + "|")
    for r in rows:
        cells = [fmt(r[k]) for k in (*KEYS, "probe_mixup", "probe_paste")]
        print(f"| {r['dataset']} | {VARIANTS[r['variant']][0]}, seed {r['seed']} | {' | '.join(cells)} "
              f"| {r['steps']} | {r['train_cpu_s']:.1f} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
    print("\nbranch scores alone and joined (image AUROC; joined: the earlier scale-only rule and the "
          "offset-and-spread rule, fitted on the same held-out normal images of the same model):")
    print("| data | model | seed | S_D score | S_E score | joined, scale rule | joined, offset-and-spread rule "
          "| joined - best branch (95% bootstrap) |")
    print("|---" * 8 + "|")
    for r in rows:
        gap = "n/a" if r["gap_to_best"] is None else "{:+.3f} ({:+.3f} to {:+.3f})".format(*r["gap_to_best"])
        print(f"| {r['dataset']} | {VARIANTS[r['variant']][0]} | {r['seed']} | {fmt(r['auroc_local'])} "
              f"| {fmt(r['auroc_semantic'])} | {fmt(r['auroc_joined_scale_rule'])} | {fmt(r['auroc_joined'])} "
              f"| {gap} |")
    print("\nfalse alarms at the stored threshold (normal test images; 95% Clopper-Pearson interval):")
    print("| data | model | seed | asked | promised | promised, 90% of calibrations | threshold images | achieved "
          "| interval | recall |")
    print("|---" * 10 + "|")
    for r in rows:
        low, high = r["fa_ci"]
        print(f"| {r['dataset']} | {VARIANTS[r['variant']][0]} | {r['seed']} | {fmt(r['fa_requested'])} "
              f"| {fmt(r['fa_promised'])} | {fmt(r['fa_promised_90'])} "
              f"| {r['fa_images']} | {fmt(r['fa_achieved'])} ({r['fa_normal']} images) | {fmt(low)} to {fmt(high)} "
              f"| {fmt(r['recall_at_threshold'])} |")
    print_summary(rows)


def spread(values: list[float | None]) -> str:
    """Mean over seeds and, where the seeds differ, the range: '0.812 (0.790 to 0.840)'."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "n/a"
    return fmt(float(np.mean(vals))) + ("" if min(vals) == max(vals) else f" ({fmt(min(vals))} to {fmt(max(vals))})")


def category_auroc(labels: np.ndarray, cats: np.ndarray, score: np.ndarray, idx: np.ndarray) -> float:
    """Image AUROC of score over the images idx, the mean over categories (as in the metrics)."""
    return float(np.mean([image_auroc(labels[idx[cats[idx] == c]], score[idx[cats[idx] == c]])
                          for c in np.unique(cats)]))


def paired_difference(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str,
                      draws: int = 1000) -> tuple[list[float], float, float, float]:
    """AUROC of a's `key` scores minus b's, per seed (a and b: rows of the same seeds, same test images);
    their mean; a 95% bootstrap interval of the mean (test images resampled within category and label,
    one draw for every seed and both variants)."""
    labels, cats = np.asarray(a[0]["labels"]), np.asarray(a[0]["categories"])
    pairs = [(np.asarray(x[key], dtype=float), np.asarray(y[key], dtype=float)) for x, y in zip(a, b)]
    if any(len(y["labels"]) != len(labels) for y in [*a, *b]):
        raise ValueError("paired rows must score the same test images")

    def mean_gap(idx: np.ndarray) -> tuple[list[float], float]:
        gaps = [category_auroc(labels, cats, x, idx) - category_auroc(labels, cats, y, idx) for x, y in pairs]
        return gaps, float(np.mean(gaps))

    per_seed, mean = mean_gap(np.arange(len(labels)))
    strata = [np.flatnonzero((cats == c) & (labels == y)) for c in np.unique(cats) for y in (0, 1)]
    rng = np.random.default_rng(0)
    boot = [mean_gap(np.concatenate([rng.choice(s, size=len(s)) for s in strata]))[1] for _ in range(draws)]
    low, high = np.quantile(boot, [0.025, 0.975])
    return per_seed, mean, float(low), float(high)


# (a lighter S_E, the paper's S_E)
SE_PAIRS = (("se_shared", "se"), ("dual_shared", "dual"), ("se_view", "se"), ("dual_view", "dual"),
            ("se_view48", "se"), ("dual_view48", "dual"))


def print_summary(rows: list[dict[str, Any]]) -> None:
    """One row per data set and variant over its seeds, then shared minus paper S_E at the same seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["variant"]), []).append(r)
    print("\nsummary over seeds (mean, and the range over seeds; image AUROC; false alarms at the stored threshold):")
    print("| data | model | seeds | steps | train CPU s | S_D score | S_E score | joined | false alarms promised "
          "| achieved | recall |")
    print("|---" * 11 + "|")
    for (dataset, variant), rs in groups.items():
        steps = sorted({r["steps"] for r in rs})
        print(f"| {dataset} | {VARIANTS[variant][0]} | {','.join(str(r['seed']) for r in rs)} "
              f"| {'/'.join(map(str, steps))} | {np.mean([r['train_cpu_s'] for r in rs]):.1f} "
              f"| {spread([r['auroc_local'] for r in rs])} | {spread([r['auroc_semantic'] for r in rs])} "
              f"| {spread([r['auroc_joined'] for r in rs])} | {spread([r['fa_promised'] for r in rs])} "
              f"| {spread([r['fa_achieved'] for r in rs])} | {spread([r['recall_at_threshold'] for r in rs])} |")
    pairs = [(d, s, p) for d in dict.fromkeys(r["dataset"] for r in rows) for s, p in SE_PAIRS
             if (d, s) in groups and (d, p) in groups]
    if not pairs:
        return
    print("\na lighter S_E minus the paper's S_E, image AUROC at the same seeds (mean, per seed, 95% bootstrap of the mean):")
    print("| data | pair | seeds | S_E score: mean | per seed | bootstrap | joined: mean | per seed | bootstrap |")
    print("|---" * 9 + "|")
    for dataset, shared, paper in pairs:
        seeds = sorted({r["seed"] for r in groups[dataset, shared]} & {r["seed"] for r in groups[dataset, paper]})
        a = [next(r for r in groups[dataset, shared] if r["seed"] == s) for s in seeds]
        b = [next(r for r in groups[dataset, paper] if r["seed"] == s) for s in seeds]
        cells = []
        for key in ("score_semantic", "probability"):
            per_seed, mean, low, high = paired_difference(a, b, key)
            cells += [f"{mean:+.3f}", " / ".join(f"{g:+.3f}" for g in per_seed), f"{low:+.3f} to {high:+.3f}"]
        print(f"| {dataset} | {shared} - {paper} | {','.join(map(str, seeds))} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--datasets", default="demo,semantic")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"any of {','.join(VARIANTS)}")
    parser.add_argument("--methods", action="store_true",
                        help=f"every model.method and SNL's ablations on the demo data (--variants {METHOD_VARIANTS})")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON (after every row)")
    parser.add_argument("--seeds", default="0", help="train.seed values: each variant is trained once per seed")
    parser.add_argument("--equal-time", action="store_true",
                        help="equal training CPU time within each model.branches group (see above)")
    parser.add_argument("--tables", type=Path, nargs="+", help="print the tables of rows saved by --json (several "
                        "runs together) and train nothing")
    args = parser.parse_args()
    if args.tables:
        missing = [str(p) for p in args.tables if not p.is_file()]
        if missing:
            parser.error(f"--tables: no such file: {', '.join(missing)}")
        print_tables([r for p in args.tables for r in json.loads(p.read_text())])
        return
    if args.methods:
        args.datasets, args.variants = "demo", METHOD_VARIANTS
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    work = args.work or Path(tempfile.mkdtemp(prefix="plantad-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        for dataset in args.datasets.split(","):
            t0 = time.perf_counter()
            data = make_data(dataset, work, args.config, args.set)
            manifest = scan_dataset(data, None)
            print(f"{dataset}: data + manifest {time.perf_counter() - t0:.1f} s ({len(manifest)} images)", flush=True)
            variants = args.variants.split(",")
            plan = (equal_time_plan(dataset, data, manifest, variants, args.config, args.set, work)
                    if args.equal_time else {v: [] for v in variants})
            for variant in variants:
                for seed in args.seeds.split(","):
                    rows.append(run_variant(dataset, data, manifest, variant, args.config,
                                            [*args.set, f"train.seed={seed}", *plan[variant]], work))
                    r = rows[-1]
                    print(f"  {variant} seed {seed}: image_auroc={fmt(r['image_auroc'])} {r['steps']} steps, "
                          f"train {r['train_cpu_s']:.1f} CPU s ({r['train_s']:.0f} s)", flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=2))
    finally:
        if args.work is None:  # the data sets and one model per variant
            shutil.rmtree(work, ignore_errors=True)
    print_tables(rows)


if __name__ == "__main__":
    main()
