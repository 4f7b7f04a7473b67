"""The daily loop as a user runs it, on one cluster: the main job's endpoint stays up (its replica
holds a CPU of the cluster) while `dvc repro` retrains on tracked data that grew since the baseline's
run (new normal images, and parts the line scored, an operator marked normal in the review queue and
`plantad review export` wrote into the data), a person moves `champion` to the new version, and the
endpoint answers with it; no probe request fails."""

from __future__ import annotations

import io
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from pipeline_project import DATA, Project

from infra.fixtures import free_port, wait_for
from plantad.data.manifest import read_manifest
from plantad.tracking.lineage import manifest_fingerprint
from plantad.tracking.registry import CHAMPION, logged_model_id, register_version, set_alias

TRAINED = ["prepare", "validate", "train", "evaluate", "register", "score"]


@dataclass
class Prober:
    """Scores one image against the endpoint every `every_s` until stopped; keeps every outcome."""

    url: str
    png: bytes
    every_s: float = 1.0
    answers: list[tuple[float, str]] = field(default_factory=list)  # (time, model_version)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=60.0) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/score", files={"image": ("probe.png", self.png, "image/png")})
                    answer = r.json() if r.status_code == 200 else {}
                    if answer.get("scored") == 1:
                        self.answers.append((time.monotonic(), str(answer["model"]["version"])))
                    else:
                        self.failures.append(f"HTTP {r.status_code}: {r.text[:300]}")
                except (httpx.HTTPError, ValueError) as exc:  # no answer, or not JSON
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self.stop.wait(self.every_s)


def served_version(url: str) -> str:
    return str(httpx.get(f"{url}/model", timeout=30.0).json()["version"])


def retrain_on_new_normals(project: Project, seed: int) -> tuple[str, float]:
    """`plantad demo-data --add-normal`, `dvc add`, commit, `dvc repro`: the version it registered,
    trained on the grown data (the demo is not regenerated) and tagged with its lineage; and how long
    `dvc repro` took."""
    before = read_manifest(project.root / "outputs" / "manifest.parquet")
    project.run("plantad", "demo-data", DATA, "--add-normal", "3", "--seed", str(seed))
    project.run("dvc", "add", DATA)
    head = project.commit(f"3 more normal images per category (seed {seed})")
    started = time.monotonic()
    repro = project.repro(timeout=600)
    assert repro.ran == TRAINED and "demo_data" in repro.skipped, repro.tail()
    manifest = read_manifest(project.root / "outputs" / "manifest.parquet")
    grown = (manifest["split"] == "train").groupby(manifest["category"]).sum() - \
        (before["split"] == "train").groupby(before["category"]).sum()
    assert (grown >= 3).all(), grown.to_dict()
    reg = project.registration()
    tags = MlflowClient(reg["tracking_uri"]).get_model_version(reg["registered_model"], reg["version"]).tags
    assert tags["data_dvc_md5"] == project.dvc_md5(DATA) and tags["data_manifest_sha256"] == manifest_fingerprint(manifest)
    assert MlflowClient(reg["tracking_uri"]).get_run(reg["run_id"]).data.tags["git_commit"] == head
    # the train stage joined the endpoint's cluster and fitted its workers beside the replica
    assert "so the 2 training workers reserve 0.37 CPU each" in repro.output, repro.tail()
    assert "Traceback" not in repro.output, repro.tail()  # no library noise that looks like an error
    assert project.status() == {}
    return str(project.registration()["version"]), time.monotonic() - started


def reviewed_into_the_data(project: Project, url: str) -> list[str]:
    """Three new parts of line press-1 (its band sends every part to REVIEW) scored over HTTP with
    records on, marked normal in the review queue, exported into the tracked data: their sha256s."""
    assert httpx.put(f"{url}/bands/press-1", json={"low": 0.0, "high": 1.0}, timeout=30).status_code == 200
    goods = sorted((project.root / DATA / "weave" / "train" / "good").glob("*.png"))[:3]
    parts = []
    for path in goods:  # mirrored: parts the dataset does not hold yet
        out = io.BytesIO()
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, format="PNG")
        parts.append(out.getvalue())
    answer = httpx.post(f"{url}/score", files=[("files", (f"p{i}.png", b, "image/png")) for i, b in enumerate(parts)],
                        data={"line": "press-1"}, headers={"X-Part-Id": "P-1,P-2,P-3"}, timeout=60).json()
    assert [r["decision"] for r in answer["results"]] == ["REVIEW"] * 3, answer
    shas = [r["sha256"] for r in answer["results"]]
    wait_for(lambda: set(shas) <= {i["sha256"] for i in httpx.get(f"{url}/review/queue", timeout=30).json()["items"]},
             30, "the three parts in the review queue")
    for sha in shas:
        r = httpx.post(f"{url}/review", json={"sha256": sha, "verdict": "normal"}, timeout=30)
        assert r.status_code == 200, r.text
    exported = project.run("plantad", "review", "export", "--data", DATA).stdout
    assert "wrote 3 reviewed image(s)" in exported, exported
    return shas


@pytest.mark.e2e
def test_retrain_and_promote_while_the_endpoint_answers(project: Project, mlflow_server: str,
                                                              registry_names: dict[str, str]) -> None:
    from ray import serve

    client, shared = MlflowClient(mlflow_server), registry_names["registered_model"]
    # a registered model of this test's own, starting from the baseline's champion: the other pipeline
    # tests read the shared one's aliases and versions
    name = f"{shared}-loop"
    baseline_champion = client.get_model_version_by_alias(shared, "champion")
    champion = register_version(client, name, baseline_champion.run_id, "model", tags=baseline_champion.tags,
                                model_id=logged_model_id(baseline_champion)).version
    set_alias(client, name, CHAMPION, champion)
    port = free_port()
    project.set_params({"serve": {"port": port, "model_name": name, "alias_poll_s": 0.5,
                                  "store": str(project.root.parent / "line-store"), "bands_poll_s": 0.5,
                                  "records": {"enabled": True, "flush_s": 0.5},
                                  "line_categories": {"press-1": "weave"}},
                        "mlflow": {"registered_model": name}})
    project.commit("serve on a free port; this test's registered model")
    url = f"http://127.0.0.1:{port}"
    png = next((project.root / DATA).rglob("test/*/*.png")).read_bytes()
    prober = Prober(url, png)
    thread = threading.Thread(target=prober.run, daemon=True)
    try:
        # the main job's last move: the champion served on the cluster, one CPU held by its replica
        started = project.run("plantad", "serve", "--detach", timeout=300)
        assert f"serving models:/{name}@champion at {url}" in started.stdout, started.stdout
        # the stop line names commands that work in a new shell, whose PATH has no venv
        stop = re.search(r"stop the app: (\S+) serve --stop; stop a local cluster: (\S+) stop", started.stdout)
        assert stop and all(os.access(project.root / cmd, os.X_OK) for cmd in stop.groups()), started.stdout
        assert served_version(url) == champion
        thread.start()

        reviewed = reviewed_into_the_data(project, url)  # the line's review loop feeds the retrain
        retrained, repro_s = retrain_on_new_normals(project, seed=1)
        assert int(champion) < int(retrained)
        assert client.get_model_version(name, retrained).tags["reviewed_images"] == "3"
        assert client.get_model_version(name, champion).tags["reviewed_images"] == "0"  # the baseline's data
        manifest = pd.read_parquet(project.root / "outputs" / "manifest.parquet")
        assert sum(any(sha[:16] in p for sha in reviewed) for p in manifest["path"]) == 3
        assert served_version(url) == champion  # a registered challenger changes nothing online

        refused = project.run("plantad", "promote", "999", check=False)  # a typo moves nothing
        assert refused.returncode == 2 and f"registered model '{name}' has no version '999'" in refused.stderr
        promoted = project.run("plantad", "promote", retrained).stdout  # what the MLflow UI's alias edit does
        assert f"it was v{champion}; roll back with `plantad promote {champion} --alias champion`" in promoted
        moved = time.monotonic()
        wait_for(lambda: served_version(url) == retrained, 60, f"the endpoint serving v{retrained} after the alias moved")
        follow_s = time.monotonic() - moved
        wait_for(lambda: any(v == retrained for _, v in prober.answers), 30, f"a probe answered by v{retrained}")
        # the replica reports what the next swap needs against the reservation params.yaml sets
        reserved = project.params["serve"]["ray_actor_options"]["memory"]
        for replica in httpx.get(f"{url}/rollout", timeout=30).json()["replicas"].values():
            room = replica["memory"]
            assert room["reserved_mib"] == reserved // 2**20 and room["swap_fits"] is True, replica
            assert replica["last_error"] is None, replica

        status = project.run("plantad", "status", timeout=120).stdout
        assert f"{url}: {name} v{retrained} (@champion)" in status, status
        assert "Serve replica plantad/" in status and ": 1 CPU" in status, status
    finally:
        prober.stop.set()
        thread.join(timeout=90)
        stopped = project.run("plantad", "serve", "--stop", timeout=120, check=False)
        serve.shutdown()  # the session's cluster: free the HTTP proxy's port for the serving tests
    assert "deleted Serve app 'plantad'" in stopped.stdout, stopped.stdout + stopped.stderr
    assert prober.failures == [], prober.failures[:5]
    versions = [v for _, v in prober.answers]
    assert versions[0] == champion and versions[-1] == retrained and len(versions) >= 20, versions
    print(f"daily loop: repro {repro_s:.0f} s with the endpoint up, alias followed in "
          f"{follow_s:.1f} s, {len(versions)} probes, 0 failed")
