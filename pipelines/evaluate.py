"""DVC stage evaluate: metrics.json (DVC metrics) and plots (DVC plots) on the test split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plantad.config import load_settings, settings_from_dict, settings_to_dict
from plantad.data.manifest import read_manifest
from plantad.evaluation.evaluate import evaluate_model
from plantad.evaluation.metrics import metrics_to_json
from plantad.evaluation.report import write_plots
from plantad.models.checkpoint import load_model
from plantad.training.loop import resolve_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plots", required=True)
    args = parser.parse_args(argv)
    params = load_settings(args.params)
    model, meta = load_model(Path(args.model))
    # the model's own settings, with this run's evaluate/scoring batch knobs from params.yaml
    overrides = {"evaluate": settings_to_dict(params)["evaluate"]}
    settings = settings_from_dict({**meta["settings"], **overrides}, source=args.model)
    settings = settings.model_copy(update={"scoring": settings.scoring.model_copy(update={"batch_size": params.scoring.batch_size})})
    model = model.to(resolve_device(params.train.device))
    metrics, pred = evaluate_model(model, read_manifest(Path(args.manifest)), Path(args.data), settings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(metrics_to_json(metrics))
    write_plots(pred, metrics, Path(args.plots), root=Path(args.data))
    print(" ".join(f"{k}={metrics[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pixel_aupro")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
