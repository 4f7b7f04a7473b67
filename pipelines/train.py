"""DVC stage train: a Ray Train job on validated data, read from the prepare stage's shard set (the
manifest's data version, refused otherwise), tracked as one MLflow run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mlflow import MlflowClient

from plantad.cluster.capacity import DoesNotFit
from plantad.cluster.watch import StallError
from plantad.config import load_settings
from plantad.data.manifest import read_manifest
from plantad.data.shards import ShardError, open_shards, read_shard_record, require_match
from plantad.logs import quiet_library_logs
from plantad.tracking.experiment import flatten, start_training_run
from plantad.tracking.lineage import data_version, git_commit
from plantad.tracking.s3 import storage_env
from plantad.tracking.store import TrackingStoreError, check_tracking_server, resolve_tracking_uri
from plantad.training.ray_train import connect, run_ray_training


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    # plantad's own lines (which cluster the run joined, how it shares the CPUs) belong in the stage's output
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("plantad").addHandler(handler)
    logging.getLogger("plantad").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="dataset root (for its DVC version only)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--shards", required=True, help="the prepare stage's record of the shard set")
    parser.add_argument("--validation", required=True, help="validation.json of the validate stage")
    parser.add_argument("--out", required=True, help="model directory to write")
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    project = Path.cwd()
    uri = resolve_tracking_uri(settings.mlflow, project)
    try:  # before anything slow: a wrong address should not cost minutes of retries or a training run
        check_tracking_server(uri)
        connect(settings.ray)
    except (TrackingStoreError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = json.loads(Path(args.validation).read_text())
    if not report.get("report", {}).get("success"):
        print(f"error: refusing to train: {args.validation} records failed data validation", file=sys.stderr)
        return 1
    os.environ.update(storage_env(settings.s3))
    manifest = read_manifest(Path(args.manifest))
    try:
        record = read_shard_record(Path(args.shards))
        require_match(record, manifest, args.shards)
        shards = open_shards(record.location, manifest, settings.s3)
    except ShardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tags = {**git_commit(project), **data_version(project, Path(args.data), manifest)}
    client = MlflowClient(uri)
    run_id = start_training_run(client, settings.mlflow, settings, tags)
    try:
        result = run_ray_training(settings, manifest, shards, Path(args.out),
                                  mlflow_run={"tracking_uri": uri, "run_id": run_id, "every": settings.train.log_every},
                                  extra_meta={"mlflow_run_id": run_id, "lineage": tags})
    except (DoesNotFit, StallError) as exc:  # the cluster's state, not a bug: no traceback
        client.set_terminated(run_id, "FAILED")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    for key, value in flatten(result.calibration).items():  # numbers only: the shortfall message is a tag
        if isinstance(value, (int, float)):
            client.log_metric(run_id, f"calibration/{key}", float(value))
    if result.calibration["false_alarm"]["shortfall"]:
        client.set_tag(run_id, "plantad.false_alarm_shortfall", result.calibration["false_alarm"]["shortfall"])
    client.set_terminated(run_id, "FINISHED")
    print(f"model saved to {result.model_path}; MLflow run {run_id} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
