"""A registry with two good versions and a broken one, and the scoring app on the session's Ray
cluster, started from deploy/serve_config.yaml, with HTTP on 127.0.0.1 and a free port.

Two apps: `main` at / (champion, polled every 0.5 s, tight image limits for the malformed corpus,
two batches at once)
and `strict` at /strict (alias `staging`, polled hourly so only a webhook moves it, API keys, a
one-request queue for the overload test).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from corpus import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from infra.fixtures import free_port
from plantad.tracking.pyfunc import log_pyfunc_model
from plantad.tracking.model_source import registration_tags
from plantad.tracking.registry import CHAMPION, register_version, set_alias

REPO = Path(__file__).resolve().parents[2]
MODEL = "plantad-serve-test"
LINE_CATEGORIES = {"press-1": "weave", "press-2": "weave", "press-3": "weave"}  # main's lines (band and export tests)


@dataclass
class Registry:
    uri: str
    client: MlflowClient
    good: list[str]  # two versions of the same trained model
    broken: str  # a version whose model.pt is garbage


@dataclass
class Served:
    url: str  # main app
    strict_url: str
    api_key: str
    webhook_secret: str
    registry: Registry
    store: Path  # main's serve.store: bands, audit log, part records, reviews (serving/inspection.py)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, trained_tiny, demo_root, demo_manifest) -> Registry:
    _, result = trained_tiny
    root = tmp_path_factory.mktemp("serve-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve", artifact_location=str(root / "artifacts"))
    png = (demo_root / demo_manifest.iloc[0]["path"]).read_bytes()
    broken_dir = root / "broken" / "model"
    broken_dir.mkdir(parents=True)
    (broken_dir / "model.pt").write_bytes(b"not a torch file")
    mlflow.set_tracking_uri(uri)
    try:
        good = []
        for _ in range(2):
            with mlflow.start_run(experiment_id=exp) as run:
                info = log_pyfunc_model(result.model_path.parent, png)
                mlflow.log_metric("image_auroc", 0.9)
            tags = {"data_dvc_md5": f"md5-{len(good)}", "git_commit": "c0ffee",  # as the register stage tags
                    **registration_tags(result.model_path.parent)}
            good.append(str(register_version(client, MODEL, run.info.run_id, "model", tags=tags,
                                             model_id=info.model_id).version))
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(str(broken_dir), "model")
        broken = str(register_version(client, MODEL, run.info.run_id, "model").version)
    finally:
        mlflow.set_tracking_uri(None)
    set_alias(client, MODEL, CHAMPION, good[0])
    set_alias(client, MODEL, "staging", good[0])
    return Registry(uri, client, good, broken)


def config_file_args() -> dict:
    """applications[0].args of deploy/serve_config.yaml: what `serve run` would pass to build_app."""
    doc = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    return dict(doc["applications"][0]["args"])


@pytest.fixture(scope="module")
def served(ray_local, registry, tmp_path_factory) -> Served:
    from ray import serve

    from plantad.serving.app import build_app

    secrets_dir = tmp_path_factory.mktemp("secrets")
    api_key, webhook_secret = secrets.token_hex(16), secrets.token_hex(16)
    (secrets_dir / "keys").write_text(f"# line PCs\n{api_key}\n")
    (secrets_dir / "webhook").write_text(webhook_secret)
    port = free_port()
    store = tmp_path_factory.mktemp("line-store")
    common = {"model_name": MODEL, "tracking_uri": registry.uri, "ray_actor_options": {"num_cpus": 0.5}}
    main = {**config_file_args(), **common, "alias_poll_s": 0.5, "max_image_bytes": MAX_IMAGE_BYTES,
            "max_image_pixels": MAX_IMAGE_PIXELS, "max_request_bytes": 2_000_000, "max_concurrent_batches": 2,
            "port": port, "store": str(store), "bands_poll_s": 0.5, "recent_traffic": 500,
            "records": {"enabled": True, "flush_s": 0.5}, "line_categories": LINE_CATEGORIES}
    strict = {**config_file_args(), **common, "app_name": "strict", "route_prefix": "/strict",
              "model_alias": "staging", "alias_poll_s": 3600.0, "api_keys_file": str(secrets_dir / "keys"),
              "webhook_secret_file": str(secrets_dir / "webhook"), "max_ongoing_requests": 1,
              "max_queued_requests": 1, "max_batch_size": 1, "port": port}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(main), name="main", route_prefix="/", blocking=False)
        serve.run(build_app(strict), name="strict", route_prefix="/strict", blocking=False)
        yield Served(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/strict", api_key, webhook_secret,
                     registry, store)
    finally:
        serve.shutdown()
