"""Accuracy benchmark: demo data -> train -> evaluate for S_D alone, S_E alone and dual Noisy-OR.

Prints one table (image AUROC / pixel AUROC / AUPRO, and wall time per model) measured in one
run. Usage: python bench/accuracy.py [--config params.yaml] [--set key=value ...] [--work DIR]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--branches", default="local,semantic,dual")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="plantad-bench-"))
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
