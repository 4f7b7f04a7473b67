"""`plantad` command line: thin wrappers over the package's functions (the stable interface)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from plantad.config import ConfigError, Settings, load_settings, settings_to_dict
from plantad.logs import quiet_library_logs, skip_driver_lines

log = logging.getLogger("plantad")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, args.set)


def _manifest(args: argparse.Namespace, settings: Settings):
    from plantad.data.manifest import read_manifest, scan_dataset

    if getattr(args, "manifest", None):
        return read_manifest(Path(args.manifest))
    return scan_dataset(Path(args.data), settings.data.categories, on_error="raise", progress=True)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from plantad.data.demo import add_normal, generate_demo

    settings = _settings(args)
    out = Path(args.out)
    if args.add_normal and args.semantic:
        raise ValueError("--add-normal extends the MVTec-layout demo only; it cannot be combined with --semantic")
    if args.add_normal:
        paths = add_normal(out, args.add_normal, seed=args.seed, image_size=settings.demo.image_size)
        print(f"added {len(paths)} normal training images under {out}")
        return 0
    if args.semantic:
        from plantad.data.demo import generate_semantic_demo

        generate_semantic_demo(out, settings.semantic_demo, seed=args.seed)
        print(f"image-level semantic demo dataset (no masks) written to {out}")
        return 0
    demo = settings.demo.model_copy(update={"seed": args.seed})
    generate_demo(out, demo)
    print(f"demo dataset written to {out}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from plantad.data.manifest import scan_dataset, write_manifest

    settings = _settings(args)
    df = scan_dataset(Path(args.data), settings.data.categories, on_error=args.on_error, progress=True)
    write_manifest(df, Path(args.out))
    print(f"manifest of {len(df)} images written to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from plantad.training.trainer import train_model

    settings = _settings(args)
    result = train_model(settings, _manifest(args, settings), Path(args.data), Path(args.out))
    fa = result.calibration["false_alarm"]
    print(f"model saved to {result.model_path} (threshold {result.calibration['threshold']:.4f}, false-alarm rate "
          f"promised at most {fa['bound']:.3g} by the {fa['threshold_images']} held-out normal images that set it)")
    if fa["shortfall"]:
        print(f"warning: {fa['shortfall']}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from plantad.evaluation.evaluate import evaluate_model, evaluation_settings, with_scored_with
    from plantad.evaluation.metrics import metrics_to_json
    from plantad.models.checkpoint import load_model
    from plantad.models.device import resolve_device

    model, meta = load_model(Path(args.model))
    settings = evaluation_settings(meta, overrides=args.set)  # refuses what a saved model cannot take
    model = model.to(resolve_device(settings.train.device))
    metrics, pred = evaluate_model(model, _manifest(args, settings), Path(args.data), settings)
    metrics = with_scored_with(metrics, meta, args.set)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(metrics_to_json(metrics))
    if args.plots:
        from plantad.evaluation.report import write_plots

        write_plots(pred, metrics, Path(args.plots), root=Path(args.data))
    from plantad.evaluation.report import metrics_report

    print(metrics_report(metrics))
    scored = metrics["scored_with"]
    if scored["overrides"]:
        print("scored with " + ", ".join(f"{k}={v}" for k, v in scored["overrides"].items())
              + (f"; threshold metrics {scored['at_threshold']}" if "at_threshold" in scored else ""))
    print(f"metrics written to {out}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from plantad.dvc_lock import check_lock

    report = check_lock(Path(args.project), repair=args.repair)
    if report.problem is None:
        if not args.quiet:
            print(f"{report.path}: DVC can read it" if report.path.exists() else f"{report.path}: none yet")
        return 0
    if report.repaired_from is None:
        print(f"error: {report.path} is damaged: {report.problem}. `plantad lock --repair` restores it "
              "(git's committed copy, else its valid stage entries) and keeps the damaged file", file=sys.stderr)
        return 1
    print(f"{report.path} was damaged ({report.problem}); restored from {report.repaired_from}, the damaged "
          f"file kept as {report.kept}. `dvc repro` reruns the stages whose outputs no longer match.")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from plantad.evaluation.report import metrics_report

    path = Path(args.file)
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read metrics file {path}: {exc}") from exc
    try:
        print(metrics_report(metrics))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from plantad.serving.bulk import run_bulk

    settings = _settings(args)
    model = args.model or f"models:/{settings.mlflow.registered_model}@champion"
    bar = sys.stderr.isatty()  # asked before the filter turns stderr into a pipe
    with skip_driver_lines():
        summary = run_bulk(settings, args.input, args.output, model, args.maps, progress=bar)
    print(summary.text())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    value = settings_to_dict(_settings(args))
    for i, part in enumerate(args.get.split(".") if args.get else []):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"no setting '{'.'.join(args.get.split('.')[:i + 1])}' (from --get {args.get})")
        value = value[part]
    print(value if isinstance(value, str) else json.dumps(value, indent=2))
    return 0


def _command_path(name: str) -> str:
    """`name` as a path that works when pasted into a new shell here (a venv's bin is not on its PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        return name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from plantad.serving import launch

    settings = _settings(args)
    if args.stop:
        print(launch.stop(settings.ray, settings.serve))
        return 0
    serve_cfg = settings.serve
    if serve_cfg.tracking_uri is None and serve_cfg.model_dir is None:  # the store the pipeline registers in
        import os

        from plantad.tracking.s3 import storage_env
        from plantad.tracking.store import check_tracking_server, resolve_tracking_uri

        os.environ.update(storage_env(settings.s3))  # an S3 artifact store on the configured endpoint
        uri = resolve_tracking_uri(settings.mlflow, Path.cwd())
        check_tracking_server(uri)
        serve_cfg = serve_cfg.model_copy(update={"tracking_uri": uri})
    where = launch.connect_for_serving(settings.ray, args.detach, serve_cfg.direct_ingress)
    url = launch.deploy(serve_cfg)
    print(f"serving {serve_cfg.model_uri} at {url} on {where}")
    print(f"  API docs {url}/docs, model {url}/model")
    if serve_cfg.direct_ingress:  # a replica that restarts takes the next free port
        print(f"  each replica on its own port (serve.direct_ingress): {' '.join(launch.direct_urls(serve_cfg))}")
    if args.detach:
        plantad, ray = (_command_path(name) for name in ("plantad", "ray"))
        print(f"  stop the app: {plantad} serve --stop; stop a local cluster: {ray} stop")
        return 0
    import time

    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(settings.serve.app_name)  # only our app: a shared cluster may serve others
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from plantad.tracking.registry import move_alias
    from plantad.tracking.store import check_tracking_server, resolve_tracking_uri

    settings = _settings(args)
    uri = resolve_tracking_uri(settings.mlflow, Path.cwd())
    check_tracking_server(uri)
    name = settings.mlflow.registered_model
    before = move_alias(MlflowClient(uri, registry_uri=uri), name, args.alias, args.version)
    print(f"{name} v{args.version} holds @{args.alias}" + (f" (it was v{before}; roll back with `plantad promote "
                                                              f"{before} --alias {args.alias}`)" if before else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import os

    from plantad.cluster.status import cluster_status

    print("\n".join(cluster_status(_settings(args), os.environ.get(args.api_key_env) or None)))
    return 0


def cmd_score_online(args: argparse.Namespace) -> int:
    import os

    from plantad.client import ScoringClient, save_heatmap

    key = os.environ.get(args.api_key_env, "").strip() or None if args.api_key_env else None
    with ScoringClient(args.url, api_key=key) as client:
        answer = client.score(args.images, threshold=args.threshold, heatmap=args.heatmap is not None, line=args.line)
    failed = 0
    for path, entry in zip(args.images, answer["results"]):
        if args.heatmap is not None:
            written = save_heatmap(entry, Path(args.heatmap), path)
            entry = {**{k: v for k, v in entry.items() if k != "heatmap_png"}, "heatmap": str(written)}
        failed += entry["status"] != 200
        print(json.dumps({"image": path, **entry}))
    return 1 if failed else 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """`status`: the declared versions and each replica's; `report`: write the shadow comparison now."""
    import os

    from plantad.client import ScoringClient
    from plantad.serving.rollout import markdown_table

    key = os.environ.get(args.api_key_env, "").strip() or None if args.api_key_env else None
    with ScoringClient(args.url, api_key=key) as client:
        if args.action == "report":
            table = client.rollout_report()
            print(markdown_table(table), end="")
            print(f"written to v{table['shadow']} (tags shadow.*, artifact rollout/shadow-v{table['shadow']}/)")
            return 0
        state = client.rollout()
    d = state["declared"]

    def v(key: str) -> str:
        return "none" if d[key] is None else f"v{d[key]}"
    canary = f"{v('canary')} on {', '.join(d['canary_lines']) or 'no named line'}" if d["canary"] else "none"
    print(f"declared: champion {v('champion')}, last-known-good {v('last_known_good')}, previous {v('previous')}, "
          f"shadow {v('shadow')}, canary {canary}")
    for replica, r in sorted(state["replicas"].items()):
        err = (r.get("last_error") or {}).get("error")
        print(f"replica {replica} on {r['node']}: serving v{r['serving']}, loaded {r['loaded']}"
              + (" (last-known-good)" if r["serving_last_known_good"] else "") + (f"; last error: {err}" if err else ""))
    for version, ended in state["canary_ended"].items():
        print(f"canary v{version} rolled back: {ended['reason']}")
    return 0


def cmd_drift_report(args: argparse.Namespace) -> int:
    from datetime import datetime

    from plantad.evaluation.drift_report import drift_report

    settings = _settings(args)
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError as exc:
        raise ValueError(f"--since {args.since!r} is not an ISO 8601 time such as 2026-03-01T06:00") from exc
    if args.records:  # the version the rows name decides the model
        from plantad.evaluation.drift_records import load_selection, records_model_uri, records_report

        loc, selection = load_selection(args.records, settings.serve, since, args.version)
        model = records_model_uri(selection.version, args.model, settings.serve)
    elif args.version:
        raise ValueError("--version picks the records' rows: give it with --records (with --images, give --model)")
    else:
        model = args.model or settings.serve.model_uri
    tracking_uri = settings.serve.tracking_uri
    if tracking_uri is None and model.startswith("models:/"):
        import os

        from plantad.tracking.s3 import storage_env
        from plantad.tracking.store import check_tracking_server, resolve_tracking_uri

        os.environ.update(storage_env(settings.s3))
        tracking_uri = resolve_tracking_uri(settings.mlflow, Path.cwd())
        check_tracking_server(tracking_uri)
    if args.records:
        path, logged = records_report(loc, selection, model, tracking_uri, settings.serve, Path(args.out), since,
                                      log_to_mlflow=not args.no_log)
        print(selection.describe(loc.uri, since))
    else:
        path, logged = drift_report(Path(args.images), model, tracking_uri, settings.serve.drift,
                                    settings.bulk.extensions, Path(args.out), since, log_to_mlflow=not args.no_log)
    print(f"drift report written to {path}" + (f"; logged to MLflow as {logged}" if logged else ""))
    return 0


def cmd_teacher_publish(args: argparse.Namespace) -> int:
    from plantad.tracking import teacher_publish as tp

    settings = _settings(args)
    path = Path(args.file)
    digest = tp.checked_checkpoint(path)
    if args.to.startswith("s3://"):
        weights = tp.publish_to_s3(path, args.to, settings.s3, digest)
    elif args.to == "mlflow":
        import os

        from plantad.tracking.s3 import storage_env
        from plantad.tracking.store import check_tracking_server, resolve_tracking_uri

        os.environ.update(storage_env(settings.s3))  # an S3 artifact store on the configured endpoint
        uri = resolve_tracking_uri(settings.mlflow, Path.cwd())
        check_tracking_server(uri)
        section = settings.model.snl.cnn_teacher if args.teacher == "cnn" else settings.model.teacher
        weights = tp.publish_to_mlflow(path, uri, settings.mlflow, args.name or f"teacher-{section.name}", digest)
    else:
        raise ValueError(f"--to {args.to!r}: give s3://bucket/prefix or mlflow")
    print(f"published {path} (sha256 {digest}) as {weights}; paste into params.yaml:\n")
    print(tp.params_lines(args.teacher, weights, digest), end="")
    return 0


def cmd_review_export(args: argparse.Namespace) -> int:
    from datetime import datetime

    from plantad.serving.review import export_reviewed
    from plantad.storage import open_location

    settings = _settings(args)
    store = args.store or settings.serve.store
    if store is None:
        raise ValueError("no store: set serve.store in params.yaml or give --store (where the serving app keeps "
                         "reviews)")
    try:
        since = datetime.fromisoformat(args.since).timestamp() if args.since else None
    except ValueError as exc:
        raise ValueError(f"--since {args.since!r} is not an ISO 8601 time such as 2026-03-01T06:00") from exc
    result = export_reviewed(open_location(store, settings.serve.store_s3), Path(args.data),
                             settings.serve.line_categories, since)
    print(f"wrote {len(result.written)} reviewed image(s) into {args.data}, skipped {result.skipped_present} "
          "already there")
    for rel in result.written:
        print(f"  {rel}")
    if result.written:
        print(f"next: dvc add {args.data} (or commit its .dvc change) and dvc repro")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted params key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plantad", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the procedural MVTec-layout demo dataset")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--add-normal", type=int, default=0, metavar="N", help="append N normal train images per category")
    p.add_argument("--semantic", action="store_true",
                   help="image-level demo instead (semantic_demo section): object families, no masks")
    _common(p)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("scan", help="scan an MVTec-layout folder into a manifest Parquet")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--on-error", choices=["raise", "record"], default="raise")
    _common(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("train", help="train, calibrate and save a model on one machine")
    p.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    p.add_argument("--manifest", help="use this manifest instead of scanning --data")
    p.add_argument("--out", required=True, help="model directory to write")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score the test split and write metrics.json")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--plots", help="folder for ROC/PR/per-category/overlay plots")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="bulk-score every image under a folder or s3:// prefix into Parquet (Ray Data)")
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix, searched recursively")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix; rows go to <output>/<model id>/ "
                                               "(one input per output: give each folder or shift its own)")
    p.add_argument("--model", help="models:/<name>@<alias>, models:/<name>/<version> or a model directory "
                                   "(default: models:/<mlflow.registered_model>@champion)")
    p.add_argument("--maps", help="folder or s3:// prefix for heatmap PNGs (<maps>/<model id>/<path>.heatmap.png)")
    _common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("config", help="print the resolved settings")
    p.add_argument("--get", metavar="KEY", help="print one dotted key only (strings unquoted), e.g. mlflow.ui_host")
    _common(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("serve", help="deploy the Ray Serve scoring app (settings: params.yaml serve section)")
    p.add_argument("--detach", action="store_true", help="return once ready; the app keeps running")
    p.add_argument("--stop", action="store_true", help="delete the app from the cluster")
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("promote", help="move an alias (default champion) of mlflow.registered_model to a version, "
                                       "as the MLflow UI does; the endpoint follows it")
    p.add_argument("version", help="the registered version, e.g. 3")
    p.add_argument("--alias", default="champion")
    _common(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("status", help="the Ray cluster's free resources, what holds the rest, the scoring app "
                                      "and the version it serves")
    p.add_argument("--api-key-env", default="PLANTAD_API_KEY", metavar="VAR",
                   help="environment variable holding the API key for GET /model (default PLANTAD_API_KEY)")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("score-online", help="score images with a running scoring service (one JSON line each)")
    p.add_argument("images", nargs="+")
    p.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--threshold", type=float, help="decision threshold instead of the model's stored one")
    p.add_argument("--heatmap", metavar="DIR", help="write <image>_heatmap.png overlays into DIR")
    p.add_argument("--line", help="the production line the images come from (the service counts metrics per line)")
    p.add_argument("--api-key-env", default="PLANTAD_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default PLANTAD_API_KEY)")
    p.set_defaults(func=cmd_score_online)

    p = sub.add_parser("rollout", help="the scoring service's rollout: declared and served versions, or the "
                                       "shadow comparison written to the registry now")
    p.add_argument("action", choices=["status", "report"])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (default http://127.0.0.1:8000)")
    p.add_argument("--api-key-env", default="PLANTAD_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default PLANTAD_API_KEY)")
    p.set_defaults(func=cmd_rollout)

    drift = sub.add_parser("drift", help="line health: drift of each line's images from the version's reference"
                           ).add_subparsers(dest="drift_command", required=True)
    p = drift.add_parser("report", help="test a folder of images (a sub-folder per line) or the scored-part "
                         "records for drift; HTML + MLflow")
    _common(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images, one top-level sub-folder per line")
    source.add_argument("--records", metavar="STORE", help="the serving app's store (folder or s3://bucket/prefix): "
                        "its scored-part records, by line")
    p.add_argument("--since", help="only images modified (records scored) at or after this ISO 8601 time")
    p.add_argument("--version", help="with --records: the model version whose rows are tested (default: the "
                   "version of the newest row)")
    p.add_argument("--model", help="model URI or folder (default: what the serve settings serve; with --records, "
                   "models:/<serve.model_name>/<the rows' version>)")
    p.add_argument("--out", default="drift-report", help="folder for report.html and its figures")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the version's MLflow run")
    p.set_defaults(func=cmd_drift_report)

    review = sub.add_parser("review", help="the line's review queue back into the versioned dataset"
                            ).add_subparsers(dest="review_command", required=True)
    p = review.add_parser("export", help="write reviewed images into a DVC-tracked MVTec-layout dataset")
    _common(p)
    p.add_argument("--data", required=True, help="the dataset folder: normal -> <category>/train/good/, "
                   "defective -> <category>/test/<defect>/ (category from serve.line_categories)")
    p.add_argument("--store", help="the serving app's store (default: serve.store)")
    p.add_argument("--since", help="only verdicts given at or after this ISO 8601 time")
    p.set_defaults(func=cmd_review_export)

    teacher = sub.add_parser("teacher", help="teacher checkpoints for air-gapped clusters").add_subparsers(
        dest="teacher_command", required=True)
    p = teacher.add_parser("publish", help="upload a checkpoint to S3 or MLflow and print the params.yaml lines")
    p.add_argument("file", help="the checkpoint (.safetensors, or a torch weights file)")
    p.add_argument("--to", required=True, help="s3://bucket/prefix (the object is <prefix>/<file name>) or mlflow")
    p.add_argument("--teacher", choices=["vit", "cnn"], default="vit",
                   help="which teacher the lines configure: vit (model.teacher) or cnn (model.snl.cnn_teacher)")
    p.add_argument("--name", help="registered model name with --to mlflow (default: teacher-<architecture>)")
    _common(p)
    p.set_defaults(func=cmd_teacher_publish)

    p = sub.add_parser("lock", help="check the project's dvc.lock (a crash during DVC's write can damage it)")
    p.add_argument("--project", default=".", help="the DVC project folder")
    p.add_argument("--repair", action="store_true",
                   help="replace a damaged dvc.lock by git's committed one, else by its valid stage entries")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when DVC can read it")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("metrics", help="print a metrics.json of `plantad evaluate` as a table")
    p.add_argument("file")
    p.set_defaults(func=cmd_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError, ConnectionError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
