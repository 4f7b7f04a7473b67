"""DVC stage evaluate: metrics.json (DVC metrics) and plots (DVC plots) on the test split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plantad.config import load_settings
from plantad.data.manifest import read_manifest
from plantad.evaluation.evaluate import evaluate_model, evaluation_settings
from plantad.evaluation.metrics import metrics_to_json
from plantad.evaluation.report import metrics_report, write_plots
from plantad.logs import quiet_library_logs
from plantad.models.checkpoint import load_model
from plantad.training.loop import resolve_device


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plots", required=True)
    args = parser.parse_args(argv)
    model, meta = load_model(Path(args.model))
    settings = evaluation_settings(meta, params=load_settings(args.params))
    model = model.to(resolve_device(settings.train.device))
    metrics, pred = evaluate_model(model, read_manifest(Path(args.manifest)), Path(args.data), settings)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(metrics_to_json(metrics))
    write_plots(pred, metrics, Path(args.plots), root=Path(args.data))
    print(metrics_report(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
