"""Registry against the MLflow server: versions, aliases, the promotion gate, models:/name@alias."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from plantad.config import MlflowConfig
from plantad.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    apply_decision,
    get_alias_version,
    logged_model_id,
    promotion_decision,
    register_version,
    set_alias,
)
from plantad.tracking.store import ensure_experiment

METRIC = "image_auroc"
# MLflow "models from code": the version's marker comes from model_config, so a loaded model says
# which version it is. Nothing is pickled, nothing is inferred (pip_requirements=[]).
MODEL_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Marker(PythonModel):
    def load_context(self, context):
        self.marker = context.model_config["marker"]

    def predict(self, context, model_input, params=None):
        return [self.marker] * len(model_input)


mlflow.models.set_model(Marker())
'''


@pytest.fixture
def tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> tuple[MlflowClient, str]:
    """A client and an experiment on the session server; fluent calls go there too."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert mlflow.get_tracking_uri() == mlflow_server
    client = MlflowClient(mlflow_server)
    return client, ensure_experiment(client, MlflowConfig(tracking_uri=mlflow_server, experiment="registry"))


def log_marker_model(experiment_id: str, marker: str, metrics: dict[str, float], code: Path) -> str:
    """One training run: metrics and a pyfunc model logged as MLflow 3 LoggedModel 'model'."""
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metrics(metrics)
        mlflow.pyfunc.log_model(name="model", python_model=str(code), model_config={"marker": marker},
                                pip_requirements=[])
    return run.info.run_id


def register(client: MlflowClient, name: str, run_id: str, tags: dict[str, str] | None = None,
             teacher: str = "checkpoint"):
    """register_version with the `teacher_source` tag the register stage sets from model.json."""
    return register_version(client, name, run_id, "model", {"teacher_source": teacher, **(tags or {})})


def gate(client: MlflowClient, name: str, version: str, mode: str = "auto") -> bool:
    decision = promotion_decision(client, name, version, METRIC, mode)
    apply_decision(client, name, decision)
    return decision.promote


@pytest.mark.e2e
def test_challenger_moves_and_auto_gate_promotes_only_the_better(tracking, tmp_path: Path) -> None:
    client, experiment_id = tracking
    name = "plantad-gate"
    code = tmp_path / "marker_model.py"
    code.write_text(MODEL_CODE)

    assert get_alias_version(client, name, CHAMPION) is None  # no registered model yet
    v1 = register(client, name, log_marker_model(experiment_id, "v1", {METRIC: 0.80}, code), {"data_dvc_md5": "abc.dir"})
    assert v1.version == "1" and CHALLENGER in v1.aliases and v1.tags["data_dvc_md5"] == "abc.dir"
    assert v1.source.startswith("models:/m-")  # the MLflow 3 LoggedModel, not runs:/<id>/model
    first = promotion_decision(client, name, v1.version, METRIC, "auto")
    assert first.promote and first.champion_value is None and "no 'champion'" in first.reason
    apply_decision(client, name, first)
    assert get_alias_version(client, name, CHAMPION).version == "1"

    v2 = register(client, name, log_marker_model(experiment_id, "v2", {METRIC: 0.90}, code))
    assert get_alias_version(client, name, CHALLENGER).version == "2"
    manual = promotion_decision(client, name, v2.version, METRIC, "manual")
    assert not manual.promote and (manual.candidate_value, manual.champion_version) == (0.90, "1")
    apply_decision(client, name, manual)
    assert get_alias_version(client, name, CHAMPION).version == "1"  # manual never moves it
    assert client.get_model_version(name, "2").tags["promotion.decision"] == "kept"
    assert gate(client, name, v2.version)
    assert get_alias_version(client, name, CHAMPION).version == "2"

    v3 = register(client, name, log_marker_model(experiment_id, "v3", {METRIC: 0.85}, code))
    decision = promotion_decision(client, name, v3.version, METRIC, "auto")
    assert not decision.promote and (decision.candidate_value, decision.champion_value) == (0.85, 0.90)
    assert decision.champion_version == "2" and "not strictly higher" in decision.reason
    apply_decision(client, name, decision)
    assert client.get_model_version(name, "3").tags["promotion.reason"] == decision.reason
    assert get_alias_version(client, name, CHALLENGER).version == "3"
    assert get_alias_version(client, name, CHAMPION).version == "2"
    assert not promotion_decision(client, name, "2", METRIC, "auto").promote  # already champion

    champion = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    assert list(champion.predict(pd.DataFrame({"x": [0, 1]}))) == ["v2", "v2"]
    challenger = mlflow.pyfunc.load_model(f"models:/{name}@{CHALLENGER}")
    assert list(challenger.predict(pd.DataFrame({"x": [0]}))) == ["v3"]


@pytest.mark.e2e
def test_lower_is_better_metrics_and_missing_metrics(tracking, tmp_path: Path) -> None:
    client, experiment_id = tracking
    name = "plantad-loss"
    code = tmp_path / "marker_model.py"
    code.write_text(MODEL_CODE)
    v1 = register(client, name, log_marker_model(experiment_id, "a", {"loss": 0.5}, code))
    set_alias(client, name, CHAMPION, v1.version)
    v2 = register(client, name, log_marker_model(experiment_id, "b", {"loss": 0.4}, code))
    assert promotion_decision(client, name, v2.version, "loss", "auto", higher_is_better=False).promote
    assert not promotion_decision(client, name, v2.version, "loss", "auto").promote
    set_alias(client, name, CHAMPION, v2.version)
    v3 = register(client, name, log_marker_model(experiment_id, "c", {"loss": 0.4}, code))
    assert not promotion_decision(client, name, v3.version, "loss", "auto", higher_is_better=False).promote  # a tie

    missing = promotion_decision(client, name, v3.version, METRIC, "auto")  # v3 logged no image_auroc
    assert not missing.promote and "candidate has no finite 'image_auroc'" in missing.reason
    assert promotion_decision(client, name, v2.version, METRIC, "manual").candidate_value is None
    with pytest.raises(RegistryError, match="'manual' or 'auto'"):
        promotion_decision(client, name, v2.version, METRIC, "always")


@pytest.mark.e2e
def test_plain_artifact_folder_registers_as_runs_uri(tracking, tmp_path: Path) -> None:
    client, experiment_id = tracking
    name = "plantad-folder"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x01\x02\x03")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    version = register_version(client, name, run_id, "model")
    assert version.source == f"runs:/{run_id}/model"
    set_alias(client, name, CHAMPION, version.version)
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=str(tmp_path / "dl"))
    assert (Path(local) / "weights.bin").read_bytes() == b"\x01\x02\x03"
    with pytest.raises(RegistryError, match="no logged model and no artifacts at 'nothing'"):
        register_version(client, name, run_id, "nothing")


@pytest.mark.e2e
def test_a_version_of_a_run_that_logged_its_model_twice_is_copied_by_its_own_logged_model(tracking,
                                                                                          tmp_path: Path) -> None:
    """A re-run register stage logs a second 'model' into the same run: registering by run alone is
    ambiguous and refused, the version read back from the server still names its own logged model."""
    client, experiment_id = tracking
    code = tmp_path / "marker.py"
    code.write_text(MODEL_CODE)
    run_id = log_marker_model(experiment_id, "first", {METRIC: 0.9}, code)
    first = register(client, "plantad-twice", run_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.pyfunc.log_model(name="model", python_model=str(code), model_config={"marker": "second"},
                                pip_requirements=[])
    with pytest.raises(RegistryError, match="logged 2 models named 'model'"):
        register(client, "plantad-twice", run_id)
    served = client.get_model_version("plantad-twice", first.version)
    copy = register_version(client, "plantad-twice-copy", served.run_id, "model", model_id=logged_model_id(served))
    assert copy.source == served.source
    model = mlflow.pyfunc.load_model(f"models:/plantad-twice-copy/{copy.version}")
    assert model.predict(pd.DataFrame({"x": [1]})) == ["first"]


@pytest.mark.e2e
def test_manual_mode_first_version_becomes_champion_later_ones_wait(tracking, tmp_path: Path) -> None:
    client, experiment_id = tracking
    name = "plantad-manual-first"
    code = tmp_path / "marker_model.py"
    code.write_text(MODEL_CODE)
    v1 = register(client, name, log_marker_model(experiment_id, "v1", {METRIC: 0.70}, code))
    first = promotion_decision(client, name, v1.version, METRIC, "manual")
    assert first.promote and first.champion_version is None and "first version" in first.reason
    apply_decision(client, name, first)
    assert get_alias_version(client, name, CHAMPION).version == "1"
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion.decision"] == "promoted" and "no 'champion' yet" in tags["promotion.reason"]

    v2 = register(client, name, log_marker_model(experiment_id, "v2", {METRIC: 0.95}, code))
    later = promotion_decision(client, name, v2.version, METRIC, "manual")
    assert not later.promote and "manual mode" in later.reason  # better, but a person decides
    apply_decision(client, name, later)
    assert get_alias_version(client, name, CHAMPION).version == "1"

    client.delete_registered_model_alias(name, CHAMPION)  # a person withdrew the champion
    v3 = register(client, name, log_marker_model(experiment_id, "v3", {METRIC: 0.60}, code))
    apply_decision(client, name, promotion_decision(client, name, v3.version, METRIC, "manual"))
    assert get_alias_version(client, name, CHAMPION).version == "3"


@pytest.mark.e2e
def test_a_version_whose_serving_graph_disagrees_or_whose_canary_was_rolled_back_is_never_promoted(
        tracking, tmp_path: Path) -> None:
    client, experiment_id = tracking
    code = tmp_path / "marker.py"
    code.write_text(MODEL_CODE)
    name = "plantad-gate-golden"
    first = register(client, name, log_marker_model(experiment_id, "a", {METRIC: 0.5}, code))
    assert gate(client, name, first.version)  # no champion yet
    for tag, value, why in (("golden_graph", "disagrees: golden.png probability 0.9 instead of 0.1", "exported graph"),
                            ("rollout.canary", "rolled back", "canary was rolled back")):
        version = register(client, name, log_marker_model(experiment_id, "b", {METRIC: 0.99}, code))
        client.set_model_version_tag(name, version.version, tag, value)
        decision = promotion_decision(client, name, version.version, METRIC, "auto")
        assert not decision.promote and why in decision.reason
    assert get_alias_version(client, name, CHAMPION).version == first.version
