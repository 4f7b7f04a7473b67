"""Accuracy benchmark: demo data -> train -> evaluate for S_D alone, S_E alone and dual Noisy-OR.

Prints one table (image AUROC / pixel AUROC / AUPRO, and wall time per model) measured in one
run. Usage: python bench/accuracy.py [--config params.yaml] [--set key=value ...] [--work DIR]
`--methods` instead trains every model.method and SNL's ablations (SNL_ROWS) on the demo data.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from plantad.config import load_settings
from plantad.data.demo import generate_demo
from plantad.data.manifest import scan_dataset
from plantad.evaluation.evaluate import evaluate_model
from plantad.models.checkpoint import load_model
from plantad.training.trainer import train_model

KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


def run(config: str, overrides: list[str], work: Path, branches: list[str]) -> list[dict]:
    base = load_settings(config, overrides)
    data = work / "demo"
    t0 = time.perf_counter()
    if not data.exists():
        generate_demo(data, base.demo)
    manifest = scan_dataset(data, base.data.categories)
    t_data = time.perf_counter() - t0
    rows = []
    for branch in branches:
        settings = load_settings(config, [*overrides, f"model.branches={branch}"])
        t1 = time.perf_counter()
        result = train_model(settings, manifest, data, work / f"model-{branch}", progress=False)
        t2 = time.perf_counter()
        model, _ = load_model(result.model_path)
        metrics, _ = evaluate_model(model, manifest, data, settings, progress=False)
        t3 = time.perf_counter()
        rows.append({"branches": branch, **{k: metrics[k] for k in KEYS}, "train_s": t2 - t1, "eval_s": t3 - t2,
                     "per_category": {c: {k: v[k] for k in KEYS} for c, v in metrics["per_category"].items()}})
    print(f"demo data + manifest: {t_data:.1f} s ({len(manifest)} images)")
    return rows


# (row name, overrides): every model.method, and SNL's ablations on the RD student. "No structural
# losses" keeps only the channel-wise distillation (the RD/FD baselines' loss).
SNL_ROWS = [
    ("snl_rd", ["model.method=snl_rd"]),
    ("snl_rd-no-structural", ["model.method=snl_rd", "model.snl.weight_spatial=0", "model.snl.weight_intra=0",
                              "model.snl.weight_inter=0", "model.snl.map_intra_weight=0"]),
    ("snl_rd-no-CRAM", ["model.method=snl_rd", "model.snl.cram=false"]),
    ("snl_fd", ["model.method=snl_fd"]),
    ("dual_snl", ["model.method=dual_snl"]),
    ("dual", ["model.method=dual"]),
]


def run_methods(config: str, overrides: list[str], work: Path, only: list[str] | None = None) -> list[dict]:
    """Train and evaluate each SNL_ROWS entry (all, or the named ones) on the demo data, in one run."""
    base = load_settings(config, overrides)
    data = work / "demo"
    if not data.exists():
        generate_demo(data, base.demo)
    manifest = scan_dataset(data, base.data.categories)
    rows = []
    for i, (name, extra) in enumerate(SNL_ROWS):
        if only and name not in only:
            continue
        settings = load_settings(config, [*overrides, *extra])
        t1 = time.perf_counter()
        result = train_model(settings, manifest, data, work / f"method-{i}", progress=False)
        t2 = time.perf_counter()
        model, _ = load_model(result.model_path)
        metrics, _ = evaluate_model(model, manifest, data, settings, progress=False)
        rows.append({"model": name, **{k: metrics[k] for k in KEYS}, "train_s": t2 - t1,
                     "eval_s": time.perf_counter() - t2})
        print(json.dumps(rows[-1]), flush=True)  # each row as soon as it is measured
    return rows


def print_method_rows(rows: list[dict]) -> None:
    print(f"\n| model.method | {' | '.join(KEYS)} | train s | eval s |")
    print("|---" * (len(KEYS) + 3) + "|")
    for r in rows:
        vals = " | ".join(f"{r[k]:.3f}" for k in KEYS)
        print(f"| {r['model']} | {vals} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--branches", default="local,semantic,dual")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--methods", action="store_true", help="rows for every model.method and SNL's ablations")
    parser.add_argument("--only", help="with --methods: comma-separated row names of SNL_ROWS")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="plantad-bench-"))
    if args.methods:
        rows = run_methods(args.config, args.set, work, args.only.split(",") if args.only else None)
        print_method_rows(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    rows = run(args.config, args.set, work, args.branches.split(","))
    print(f"\n| model | {' | '.join(KEYS)} | train s | eval s |")
    print("|---" * (len(KEYS) + 3) + "|")
    names = {"local": "encoder-decoder (S_D) alone", "semantic": "encoder-encoder (S_E) alone", "dual": "dual Noisy-OR"}
    for r in rows:
        vals = " | ".join(f"{r[k]:.3f}" for k in KEYS)
        print(f"| {names[r['branches']]} | {vals} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
