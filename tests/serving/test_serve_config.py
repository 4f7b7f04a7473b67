"""Serve settings (one typed section, the same defaults in params.yaml and deploy/serve_config.yaml),
API keys and MLflow webhook signatures, without a cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from plantad.config import ConfigError, ServeConfig, load_settings, serve_config_from_dict
from plantad.serving.inputs import ApiError
from plantad.serving.security import check_bearer, key_digest, load_api_keys, verify_webhook, webhook_signature

REPO = Path(__file__).resolve().parents[2]


def test_serve_config_file_params_and_defaults_agree():
    args = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())["applications"][0]["args"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())["serve"]
    defaults = ServeConfig().model_dump(mode="json")
    assert args == params == defaults
    doc = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    # what `plantad serve` starts Serve's proxy with (host, port, request deadline) is what `serve run` gets
    from plantad.serving.launch import http_options

    assert doc["http_options"] == http_options(ServeConfig()) == {
        "host": args["host"], "port": args["port"], "request_timeout_s": args["request_timeout_s"]}
    assert doc["applications"][0]["import_path"] == "plantad.serving.app:build_app"
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(doc)  # what `serve run` / `serve deploy` parse
    assert schema.applications[0].args == args and schema.http_options.host == "127.0.0.1"
    assert load_settings(REPO / "params.yaml").serve.model_uri == "models:/plantad-anomaly@champion"


def test_the_ray_cluster_manifest_gives_every_container_plantads_serve_env():
    """A cluster from deploy/raycluster.yaml runs Serve as the clusters plantad starts (SERVE_ENV)."""
    from plantad.cluster import SERVE_ENV

    spec = yaml.safe_load((REPO / "deploy" / "raycluster.yaml").read_text())["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, container["name"]


def test_serve_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'serve.max_batch'"):
        serve_config_from_dict({"max_batch": 4}, "args")
    with pytest.raises(ConfigError, match=r"serve.max_batch_size \(64\) x serve.max_concurrent_batches \(1\) "
                                          r"is above serve.max_ongoing_requests \(8\)"):
        serve_config_from_dict({"max_batch_size": 64, "max_ongoing_requests": 8}, "args")
    with pytest.raises(ConfigError, match=r"max_concurrent_batches \(3\) is above serve.max_ongoing_requests \(32\)"):
        serve_config_from_dict({"max_batch_size": 16, "max_concurrent_batches": 3}, "args")
    with pytest.raises(ConfigError, match="max_concurrent_batches"):
        serve_config_from_dict({"max_concurrent_batches": 0}, "args")
    with pytest.raises(ConfigError, match="min_replicas"):
        serve_config_from_dict({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "args")


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfile-key\n\n")
    monkeypatch.setenv("TEST_KEYS", "env-a, env-b")
    cfg = ServeConfig(api_keys_env="TEST_KEYS", api_keys_file=str(keys_file))
    keys = load_api_keys(cfg)
    assert keys == {key_digest(k) for k in ("env-a", "env-b", "file-key")}  # a replica holds digests only
    check_bearer("Bearer env-b", keys)
    check_bearer("Bearer file-key", keys)
    for header in (None, "env-a", "Basic env-a", "Bearer nope", "Bearer ", f"Bearer {key_digest('env-a')}"):
        with pytest.raises(ApiError) as err:
            check_bearer(header, keys)
        assert err.value.status == 401
    check_bearer(None, frozenset())  # no keys configured: open
    with pytest.raises(Exception, match="serve.api_keys_file"):
        load_api_keys(ServeConfig(api_keys_file=str(tmp_path / "absent")))


def test_webhook_signature_matches_mlflow_and_is_verified():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload, stamp = b'{"data": {"name": "m", "alias": "champion", "version": "3"}}', str(int(time.time()))
    ours = webhook_signature("s3cret", "delivery-1", stamp, payload)
    assert ours == _generate_hmac_signature("s3cret", "delivery-1", stamp, payload.decode())
    headers = {"x-mlflow-signature": ours, "x-mlflow-delivery-id": "delivery-1", "x-mlflow-timestamp": stamp}
    verify_webhook("s3cret", headers, payload)
    bad = [("other", headers, payload), ("s3cret", headers, payload + b" "),
           ("s3cret", {**headers, "x-mlflow-timestamp": str(int(stamp) - 3600)}, payload),
           ("s3cret", {k: v for k, v in headers.items() if k != "x-mlflow-signature"}, payload)]
    for secret, hdrs, body in bad:
        with pytest.raises(ApiError) as err:
            verify_webhook(secret, hdrs, body)
        assert err.value.status == 401
    with pytest.raises(ApiError, match="receiver is off"):
        verify_webhook(None, headers, payload)


def test_line_labels_stop_growing_at_max_lines(caplog):
    from plantad.serving.metrics import LineLabels

    labels = LineLabels(max_lines=2)
    assert [labels.label(x) for x in (None, "L1", "L2", "L1", "L3", "L4", "L2")] == [
        "unspecified", "L1", "L2", "L1", "other", "other", "L2"]
    assert [r.getMessage() for r in caplog.records if "serve.max_lines" in r.getMessage()] == [
        "more than serve.max_lines (2) lines: line 'L3' and later new lines are counted as 'other'"]
