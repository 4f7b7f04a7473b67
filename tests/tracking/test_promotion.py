"""Fair promotion: the champion is re-scored on the candidate's test set; a missing metric never
wins; a random-weight teacher is promoted automatically only when params allow it; the alias
move is a compare-and-set. Against a real MLflow store (SQLite in tmp)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from plantad.evaluation.evaluate import evaluate_model, evaluation_settings
from plantad.models.checkpoint import load_model
from plantad.tracking.promotion import champion_rescorer
from plantad.tracking.registry import (
    CHAMPION,
    apply_decision,
    get_alias_version,
    promotion_decision,
    register_version,
    set_alias,
)
from plantad.training.trainer import train_model

from tiny import tiny_settings

METRIC = "image_auroc"


@pytest.fixture
def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return client, client.create_experiment("promotion", artifact_location=str(tmp_path / "artifacts")), uri


def register_folder(client: MlflowClient, experiment_id: str, name: str, folder: Path, metrics: dict[str, float],
                    teacher: str = "checkpoint") -> str:
    """One training run with `metrics` whose artifact folder `model` becomes a new version; its number."""
    run_id = client.create_run(experiment_id).info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifacts(run_id, str(folder), "model")
    return str(register_version(client, name, run_id, "model", {"teacher_source": teacher}).version)


def champion(client: MlflowClient, name: str) -> str | None:
    found = get_alias_version(client, name, CHAMPION)
    return None if found is None else str(found.version)


def placeholder(tmp_path: Path, tag: str) -> Path:
    folder = tmp_path / f"folder-{tag}"
    folder.mkdir()
    (folder / "weights.bin").write_text(tag)
    return folder


def test_random_teacher_is_promoted_automatically_only_when_allowed(store, tmp_path):
    client, exp, _ = store
    name = "random-teacher"
    v1 = register_folder(client, exp, name, placeholder(tmp_path, "a"), {METRIC: 0.9}, teacher="random")
    for mode in ("manual", "auto"):  # neither the first-version rule nor the gate promotes it
        blocked = promotion_decision(client, name, v1, METRIC, mode)
        assert not blocked.promote and "mlflow.allow_random_teacher_promotion" in blocked.reason
    apply_decision(client, name, blocked)
    assert champion(client, name) is None
    allowed = apply_decision(client, name, promotion_decision(client, name, v1, METRIC, "auto", allow_random_teacher=True))
    assert allowed.promote and champion(client, name) == v1

    v2 = register_folder(client, exp, name, placeholder(tmp_path, "b"), {METRIC: 0.95}, teacher="random")
    assert not promotion_decision(client, name, v2, METRIC, "auto").promote  # better, but random
    assert promotion_decision(client, name, v2, METRIC, "auto", allow_random_teacher=True).promote
    v3 = register_folder(client, exp, name, placeholder(tmp_path, "c"), {METRIC: 0.97}, teacher="hub")
    assert promotion_decision(client, name, v3, METRIC, "auto").promote  # a pretrained teacher needs no flag


def test_a_missing_metric_never_wins(store, tmp_path):
    client, exp, uri = store
    name = "missing-metric"
    v1 = register_folder(client, exp, name, placeholder(tmp_path, "a"), {"loss": 0.1})  # no image_auroc
    assert apply_decision(client, name, promotion_decision(client, name, v1, METRIC, "auto")).promote  # first
    v2 = register_folder(client, exp, name, placeholder(tmp_path, "b"), {METRIC: 0.99})
    vs_missing = promotion_decision(client, name, v2, METRIC, "auto")
    assert not vs_missing.promote and vs_missing.champion_value is None
    assert "champion has no finite 'image_auroc'" in vs_missing.reason and "a missing metric never wins" in vs_missing.reason
    set_alias(client, name, CHAMPION, v2)
    v3 = register_folder(client, exp, name, placeholder(tmp_path, "c"), {METRIC: math.nan})
    nan = promotion_decision(client, name, v3, METRIC, "auto")
    assert not nan.promote and nan.candidate_value is None and "candidate has no finite" in nan.reason
    v4 = register_folder(client, exp, name, placeholder(tmp_path, "d"), {METRIC: 0.999})
    rescore = champion_rescorer(client, uri, pd.DataFrame(), tmp_path, tiny_settings(), METRIC)
    scored_none = promotion_decision(client, name, v4, METRIC, "auto", score_champion=rescore)
    assert not scored_none.promote and scored_none.champion_value is None  # v2's folder holds no model.pt
    assert "could not be re-scored" in scored_none.reason and "model.pt" in scored_none.reason
    assert champion(client, name) == v2


def test_alias_move_is_compare_and_set(store, tmp_path):
    client, exp, _ = store
    name = "cas"
    v1 = register_folder(client, exp, name, placeholder(tmp_path, "a"), {METRIC: 0.5})
    first = promotion_decision(client, name, v1, METRIC, "auto")
    v2 = register_folder(client, exp, name, placeholder(tmp_path, "b"), {METRIC: 0.4})
    set_alias(client, name, CHAMPION, v2)  # a person promotes v2 while v1's gate is deciding
    applied = apply_decision(client, name, first)
    assert first.promote and not applied.promote
    assert "moved from none to v2" in applied.reason and "nothing overwritten" in applied.reason
    assert champion(client, name) == v2
    assert client.get_model_version(name, v1).tags["promotion.decision"] == "kept"

    v3 = register_folder(client, exp, name, placeholder(tmp_path, "c"), {METRIC: 0.9})
    decision = promotion_decision(client, name, v3, METRIC, "auto")
    assert decision.promote and decision.champion_version == v2
    set_alias(client, name, CHAMPION, v1)  # rolled back meanwhile
    assert "moved from v2 to v1" in apply_decision(client, name, decision).reason
    assert champion(client, name) == v1
    assert apply_decision(client, name, promotion_decision(client, name, v3, METRIC, "auto")).promote  # fresh check
    assert champion(client, name) == v3


def image_auroc(model_dir: Path, demo_manifest, demo_root) -> float:
    """What the evaluate stage measures for a model on the demo test set."""
    model, meta = load_model(model_dir)
    settings = evaluation_settings(meta, params=tiny_settings())
    return evaluate_model(model, demo_manifest, demo_root, settings, progress=False)[0][METRIC]


@pytest.mark.e2e
def test_champion_is_rescored_on_the_candidates_test_set(store, tmp_path, trained_tiny, demo_root, demo_manifest):
    client, exp, uri = store
    strong_dir = trained_tiny[1].model_path.parent
    weak_dir = train_model(tiny_settings("train.steps=2", "train.warmup_steps=1"), demo_manifest, demo_root,
                           tmp_path / "weak", progress=False).model_path.parent
    strong, weak = image_auroc(strong_dir, demo_manifest, demo_root), image_auroc(weak_dir, demo_manifest, demo_root)
    assert strong > weak > 0.1  # 150 training steps against 2, on this test set
    rescore = champion_rescorer(client, uri, demo_manifest, demo_root, tiny_settings(), METRIC)

    # the champion's logged metric came from an older, harder test set; the challenger's from this one
    name = "fair"
    v1 = register_folder(client, exp, name, strong_dir, {METRIC: 0.1}, teacher="random")
    set_alias(client, name, CHAMPION, v1)
    v2 = register_folder(client, exp, name, weak_dir, {METRIC: weak}, teacher="random")
    assert promotion_decision(client, name, v2, METRIC, "auto", allow_random_teacher=True).promote  # unfair
    fair = promotion_decision(client, name, v2, METRIC, "auto", allow_random_teacher=True, score_champion=rescore)
    assert not fair.promote and fair.champion_value == pytest.approx(strong, abs=1e-9)
    assert "re-scored on the candidate's" in fair.reason
    apply_decision(client, name, fair)
    assert champion(client, name) == v1

    # and the other way round: a champion whose logged metric flatters it loses on the same data
    name = "fair-reverse"
    w1 = register_folder(client, exp, name, weak_dir, {METRIC: 0.99}, teacher="random")
    set_alias(client, name, CHAMPION, w1)
    w2 = register_folder(client, exp, name, strong_dir, {METRIC: strong}, teacher="random")
    applied = apply_decision(client, name, promotion_decision(client, name, w2, METRIC, "auto",
                                                              allow_random_teacher=True, score_champion=rescore))
    assert applied.promote and applied.champion_value == pytest.approx(weak, abs=1e-9)
    assert champion(client, name) == w2
