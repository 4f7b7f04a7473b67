"""DVC stage register: log evaluation and the pyfunc model to the training run, register a new
version in the MLflow Model Registry (alias `challenger`), and promote it to `champion` when no
champion exists, or when `mlflow.promote: auto` and it beats the current champion on
`mlflow.promotion_metric`, the champion being re-scored on this run's test set first."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from plantad.config import Settings, load_settings
from plantad.data.manifest import read_manifest
from plantad.logs import quiet_library_logs
from plantad.serving.review import reviewed_images
from plantad.serving.golden import golden_images
from plantad.serving.predictor import Predictor
from plantad.tracking.experiment import log_evaluation
from plantad.tracking.golden import graph_agreement, record_golden
from plantad.tracking.model_source import registration_tags
from plantad.tracking.pyfunc import log_pyfunc_model
from plantad.tracking.promotion import champion_rescorer
from plantad.tracking.registry import GRAPH_TAG, apply_decision, promotion_decision, register_version
from plantad.tracking.s3 import storage_env
from plantad.tracking.store import TrackingStoreError, check_tracking_server, resolve_tracking_uri


def record_golden_outputs(client: MlflowClient, name: str, version: str, run_id: str, model_dir: Path,
                          settings: Settings) -> str:
    """The version's answers on the golden images (torch), then whether the runtime the endpoint
    will use reproduces them; tagged on the version, where the promotion gate reads it."""
    images = golden_images([settings.serve.golden_image] if settings.serve.golden_image else None)
    expected = record_golden(client, name, version, run_id, Predictor.load(str(model_dir), device="cpu",
                                                                           runtime="torch"), images)
    runtime = settings.serve.runtime or settings.scoring.runtime
    graph = graph_agreement(model_dir, runtime, images, expected, settings.serve.rollout.golden_atol)
    client.set_model_version_tag(name, version, GRAPH_TAG, graph)
    return graph


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = argparse.ArgumentParser(description=__doc__)
    for flag in ("--model", "--data", "--manifest", "--metrics", "--plots", "--validation", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    os.environ.update(storage_env(settings.s3))
    meta = json.loads((Path(args.model) / "model.json").read_text())
    run_id, lineage = meta["mlflow_run_id"], meta.get("lineage", {})
    metrics = json.loads(Path(args.metrics).read_text())
    uri = resolve_tracking_uri(settings.mlflow, Path.cwd())
    try:  # before anything slow: a wrong URI should not cost minutes of retries or a training run
        check_tracking_server(uri)
    except TrackingStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    log_evaluation(client, run_id, metrics, Path(args.plots), Path(args.validation))
    manifest = read_manifest(Path(args.manifest))
    example = (Path(args.data) / manifest[manifest["split"] == "test"].iloc[0]["path"]).read_bytes()
    with mlflow.start_run(run_id=run_id):
        info = log_pyfunc_model(Path(args.model), example)
    name = settings.mlflow.registered_model
    tags = {**lineage, "teacher_source": meta["teacher"]["source"], settings.mlflow.promotion_metric:
            str(metrics.get(settings.mlflow.promotion_metric)),
            "reviewed_images": str(reviewed_images(manifest)),  # added by the line's review (plantad review export)
            **registration_tags(Path(args.model))}  # model.pt's and model.json's hashes: node caches key by them
    version = register_version(client, name, run_id, "model", tags=tags, model_id=info.model_id)
    graph = record_golden_outputs(client, name, version.version, run_id, Path(args.model), settings)
    print(f"golden outputs recorded with v{version.version}; serving graph {graph.split(':')[0]}")
    metric = settings.mlflow.promotion_metric
    rescore = champion_rescorer(client, uri, manifest, Path(args.data), settings, metric)
    decision = promotion_decision(client, name, version.version, metric, settings.mlflow.promote,
                                  allow_random_teacher=settings.mlflow.allow_random_teacher_promotion,
                                  score_champion=rescore)
    decision = apply_decision(client, name, decision)
    aliases = client.get_model_version(name, version.version).aliases
    record = {"tracking_uri": uri, "registered_model": name, "version": version.version, "aliases": sorted(aliases),
              "run_id": run_id, "model_uri": f"models:/{name}/{version.version}", "decision": dataclasses.asdict(decision)}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"registered {name} v{version.version} aliases={sorted(aliases)}: {decision.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
