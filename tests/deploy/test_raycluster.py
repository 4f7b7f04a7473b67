"""deploy/raycluster.yaml is closed: Ray's token auth from a Kubernetes Secret in every container,
and the dashboard (with the Jobs API) neither bound beyond the head pod nor published by a Service."""

from __future__ import annotations

from pathlib import Path

import yaml

from plantad.cluster import is_loopback

REPO = Path(__file__).resolve().parents[2]


def manifest() -> dict:
    return yaml.safe_load((REPO / "deploy" / "raycluster.yaml").read_text())


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_ray_container_takes_the_token_from_one_secret():
    spec = manifest()["spec"]
    refs = set()
    for container in containers(spec):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"].get("value") == "token", container["name"]
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{container['name']}: a literal token in the manifest"
        ref = token["valueFrom"]["secretKeyRef"]
        refs.add((ref["name"], ref["key"]))
    assert refs == {("plantad-ray-token", "auth_token")}
    assert "plantad-ray-token" in (REPO / "deploy" / "raycluster.yaml").read_text().split("apiVersion")[0]


def test_the_dashboard_and_jobs_api_stay_inside_the_cluster():
    doc = manifest()
    head = doc["spec"]["headGroupSpec"]
    assert is_loopback(head["rayStartParams"]["dashboard-host"])
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    for group in [head, *doc["spec"]["workerGroupSpecs"]]:
        assert "dashboard-host" not in group["rayStartParams"] or is_loopback(group["rayStartParams"]["dashboard-host"])
    for container in containers(doc["spec"]):
        assert not [p for p in container.get("ports", []) if "hostPort" in p], container["name"]
