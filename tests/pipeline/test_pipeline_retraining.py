"""The retraining story, as a user lives it: `dvc repro` registers a challenger with its lineage and
golden record, and an evaluate-only change re-evaluates and nothing else re-runs. Retraining on new
data is the daily-loop test's (tests/pipeline/test_daily_loop.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from pipeline_project import DATA, Project, registry_state

from plantad.data.manifest import read_manifest
from plantad.tracking.lineage import manifest_fingerprint

HEADLINE = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_aupro")


def next_version(client: MlflowClient, name: str) -> str:
    return str(max(map(int, registry_state(client, name)["versions"])) + 1)


@pytest.mark.e2e
def test_first_repro_registers_a_challenger_with_metrics_artifacts_and_lineage(
    baseline: Project, mlflow_server: str, registry_names: dict[str, str], tmp_path: Path
) -> None:
    reg, name = baseline.registration(), registry_names["registered_model"]
    # manual mode, but no champion yet: the first version takes it (the demo params.yaml allows its
    # random-weight teacher to be promoted: mlflow.allow_random_teacher_promotion)
    assert (reg["registered_model"], reg["version"], reg["aliases"]) == (name, "1", ["challenger", "champion"])
    client = MlflowClient(mlflow_server)
    assert client.get_registered_model(name).aliases == {"challenger": "1", "champion": "1"}
    assert reg["decision"]["promote"] and "no 'champion' yet" in reg["decision"]["reason"]
    version = client.get_model_version(name, "1")
    assert version.run_id == reg["run_id"]

    run = client.get_run(reg["run_id"])
    assert run.info.status == "FINISHED"
    metrics = json.loads((baseline.root / "outputs" / "metrics.json").read_text())
    for key in HEADLINE:
        assert run.data.metrics[key] == pytest.approx(metrics[key]), key
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert sorted(metrics["per_category"]) == ["metal", "nut", "weave"]
    for cat, values in metrics["per_category"].items():
        assert run.data.metrics[f"{cat}/image_auroc"] == pytest.approx(values["image_auroc"])
        assert run.data.metrics[f"{cat}/pixel_aupro"] == pytest.approx(values["pixel_aupro"])
    assert any(k.startswith("train/") for k in run.data.metrics), "no per-step metrics from the Ray workers"
    epoch_losses = client.get_metric_history(reg["run_id"], "epoch/loss")
    assert [m.step for m in epoch_losses] == list(range(1, len(epoch_losses) + 1)) and epoch_losses, epoch_losses
    assert client.get_metric_history(reg["run_id"], "epoch/images_per_second")[-1].value > 0

    plots = {f.path for f in client.list_artifacts(reg["run_id"], "plots")}
    assert {"plots/per_category.png", "plots/overlays.png", "plots/roc.png", "plots/pr.png"} <= plots
    report = download_artifacts(run_id=reg["run_id"], artifact_path="validation/validation.json",
                                dst_path=str(tmp_path), tracking_uri=mlflow_server)
    assert json.loads(Path(report).read_text())["report"]["success"] is True

    tags = run.data.tags
    manifest = read_manifest(baseline.root / "outputs" / "manifest.parquet")
    assert tags["data_manifest_sha256"] == manifest_fingerprint(manifest)
    assert tags["data_dvc_md5"] == baseline.dvc_md5(DATA)
    # the code commit named by the run is one whose data/plant.dvc is the data it trained on
    dvc_file = (baseline.root / f"{DATA}.dvc").read_text()
    assert baseline.run("git", "show", f"{tags['git_commit']}:{DATA}.dvc").stdout == dvc_file
    for key in ("git_commit", "data_dvc_md5", "data_manifest_sha256"):
        assert version.tags[key] == tags[key], key
    # the golden outputs the endpoint checks every load against, and the serving graph's verdict
    assert version.tags["golden_outputs"] == f"golden/v{version.version}"
    assert version.tags["golden_graph"].startswith("agrees"), version.tags["golden_graph"]
    golden = download_artifacts(run_id=reg["run_id"], artifact_path=f"golden/v{version.version}/expected.json",
                                dst_path=str(tmp_path), tracking_uri=mlflow_server)
    assert 0.0 <= json.loads(Path(golden).read_text())["images"]["golden.png"]["probability"] <= 1.0

    shown = baseline.run("dvc", "metrics", "show")
    assert "image_auroc" in shown.stdout
    as_json = json.loads(baseline.run("dvc", "metrics", "show", "--json").stdout)
    assert as_json[""]["data"]["outputs/metrics.json"]["data"]["image_auroc"] == pytest.approx(metrics["image_auroc"])


@pytest.mark.e2e
def test_evaluate_param_reruns_only_evaluate_and_register(
    project: Project, mlflow_server: str, registry_names: dict[str, str]
) -> None:
    client, name = MlflowClient(mlflow_server), registry_names["registered_model"]
    before, lock_before = project.registration(), project.lock()
    expected = next_version(client, name)

    project.set_params({"evaluate": {"aupro_fpr_limit": 0.1}})
    status = project.status()
    assert list(status) == ["evaluate", "register"], status  # register re-scores a champion with `evaluate`
    repro = project.repro(timeout=180)
    assert repro.ran == ["evaluate", "register", "score"], repro.tail()  # score: off, writes its record
    assert set(repro.skipped) == {"demo_data", "prepare", "validate", "train"}, repro.tail()
    lock = project.lock()
    for stage in ("demo_data", "prepare", "validate", "train"):
        assert lock[stage] == lock_before[stage], stage
    assert lock["evaluate"]["params"]["params.yaml"]["evaluate"]["aupro_fpr_limit"] == 0.1

    reg = project.registration()
    assert (reg["version"], reg["aliases"]) == (expected, ["challenger"])
    assert reg["run_id"] == before["run_id"]  # the same training run, evaluated again
    metrics = json.loads((project.root / "outputs" / "metrics.json").read_text())
    assert client.get_run(reg["run_id"]).data.metrics["pixel_aupro"] == pytest.approx(metrics["pixel_aupro"])
    assert project.status() == {}
