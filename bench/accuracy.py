"""Accuracy benchmark: train and evaluate each model variant on the demo (defects, with masks) and
the semantic demo (object families, image-level labels only), all in one run.

Per row: image AUROC / AP, pixel AUROC / AUPRO (n/a without masks or without a local branch), the
cross-class interference probes (mixup of two categories, a patch of one pasted into another,
scored against the normal test images) and wall times. A second table puts the dual model's
branch scores next to the same student trained alone: what the joint objective changes.

Usage: python bench/accuracy.py [--config params.yaml] [--set key=value ...] [--work DIR]
       [--datasets demo,semantic] [--variants sd,se,se_patch,dual,dual_patch] [--json rows.json]
       python bench/accuracy.py --variants se,se_shared,dual,dual_shared  (the lighter S_E)
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

from plantad.config import load_settings
from plantad.data.demo import generate_demo, generate_semantic_demo
from plantad.data.manifest import scan_dataset
from plantad.evaluation.evaluate import evaluate_model
from plantad.evaluation.interference import PROBE_KINDS, interference_probes
from plantad.evaluation.metrics import compute_metrics, image_auroc
from plantad.models.checkpoint import load_model
from plantad.serving.predictor import Predictor
from plantad.training.trainer import train_model

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


def run_variant(dataset: str, data: Path, manifest: Any, variant: str, config: str, overrides: list[str],
                work: Path) -> dict[str, Any]:
    settings = load_settings(config, [*overrides, *VARIANTS[variant][1]])
    t0 = time.perf_counter()
    result = train_model(settings, manifest, data, work / f"model-{dataset}-{variant}", progress=False)
    t1 = time.perf_counter()
    model, _ = load_model(result.model_path)
    metrics, pred = evaluate_model(model, manifest, data, settings, progress=False)
    t2 = time.perf_counter()
    normal = pred.probability[pred.labels == 0]
    return {"dataset": dataset, "variant": variant, **{k: metrics[k] for k in KEYS},
            **probe_aurocs(result.model_path.parent, manifest, data, normal), **branch_aurocs(pred),
            "train_s": t1 - t0, "eval_s": t2 - t1, "per_category": metrics["per_category"]}


def fmt(v: float | None) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def print_tables(rows: list[dict[str, Any]]) -> None:
    print("\n| data | model | image AUROC | image AP | pixel AUROC | AUPRO | mixup probe AUROC | paste probe AUROC "
          "| train s | eval s |")
    print("|---" * 10 + "|")
    for r in rows:
        cells = [fmt(r[k]) for k in (*KEYS, "probe_mixup", "probe_paste")]
        print(f"| {r['dataset']} | {VARIANTS[r['variant']][0]} | {' | '.join(cells)} | {r['train_s']:.0f} "
              f"| {r['eval_s']:.0f} |")
    print("\nbranch scores alone (image AUROC of the raw S_D / S_E score):")
    print("| data | model | S_D score | S_E score |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {VARIANTS[r['variant']][0]} | {fmt(r['auroc_local'])} | {fmt(r['auroc_semantic'])} |")


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
    args = parser.parse_args()
    if args.methods:
        args.datasets, args.variants = "demo", METHOD_VARIANTS
    work = args.work or Path(tempfile.mkdtemp(prefix="plantad-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        for dataset in args.datasets.split(","):
            t0 = time.perf_counter()
            data = make_data(dataset, work, args.config, args.set)
            manifest = scan_dataset(data, None)
            print(f"{dataset}: data + manifest {time.perf_counter() - t0:.1f} s ({len(manifest)} images)", flush=True)
            for variant in args.variants.split(","):
                rows.append(run_variant(dataset, data, manifest, variant, args.config, args.set, work))
                r = rows[-1]
                print(f"  {variant}: image_auroc={fmt(r['image_auroc'])} train {r['train_s']:.0f} s", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2))
    finally:
        if args.work is None:  # the data sets and one model per variant
            shutil.rmtree(work, ignore_errors=True)
    print_tables(rows)


if __name__ == "__main__":
    main()
