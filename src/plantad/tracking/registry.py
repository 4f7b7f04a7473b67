"""Model Registry: versions, aliases and the promotion gate.

Every new version gets alias `challenger`. `champion` is what serving loads
(`models:/<name>@champion`); the first version registered while no `champion` exists becomes
`champion` in either mode; after that it moves only by the gate in `auto` mode, or by a person in
the MLflow UI in `manual` mode. Aliases, not stages: stages are deprecated since MLflow 2.9.
Nothing moves `champion` automatically to a model whose teacher has random weights unless
`mlflow.allow_random_teacher_promotion` allows it, and a move never overwrites a `champion` that
changed while the gate was deciding (see apply_decision).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryError(RuntimeError):
    """A model, version or metric that the registry step cannot use."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_value: float | None
    champion_value: float | None
    candidate_version: str
    champion_version: str | None
    metric: str
    mode: str


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
        log.info("created registered model '%s'", name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _model_source(client: MlflowClient, run_id: str, artifact_path: str) -> tuple[str, str | None]:
    """(source URI, logged model id) of what run `run_id` logged under `artifact_path`.

    MLflow 3 `log_model(name=...)` stores a LoggedModel outside the run's artifacts (source
    `models:/<model_id>`); a plain folder logged with `log_artifacts` is `runs:/<run>/<path>`.
    """
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"name = '{artifact_path}' AND source_run_id = '{run_id}'",
    )
    if len(found) > 1:
        ids = ", ".join(m.model_id for m in found)
        raise RegistryError(f"run {run_id} logged {len(found)} models named '{artifact_path}' ({ids}); "
                            "register one of them by its models:/<model_id> URI")
    if found:
        return f"models:/{found[0].model_id}", found[0].model_id
    if client.list_artifacts(run_id, artifact_path):
        return f"runs:/{run_id}/{artifact_path}", None
    raise RegistryError(f"run {run_id} has no logged model and no artifacts at '{artifact_path}'")


def register_version(
    client: MlflowClient,
    model_name: str,
    run_id: str,
    artifact_path: str,
    tags: dict[str, str] | None = None,
    model_id: str | None = None,
) -> ModelVersion:
    """New version of `model_name` (created if missing) from the run's model; it becomes `challenger`.

    `model_id` names one MLflow 3 logged model exactly (a run may log several over re-runs)."""
    _ensure_registered_model(client, model_name)
    if model_id is not None:
        source = f"models:/{model_id}"
    else:
        source, model_id = _model_source(client, run_id, artifact_path)
    version = client.create_model_version(
        model_name, source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}, model_id=model_id
    )
    if version.status != "READY":
        raise RegistryError(f"model version {model_name} v{version.version} is {version.status}: "
                            f"{version.status_message}")
    set_alias(client, model_name, CHALLENGER, version.version)
    log.info("registered %s v%s from %s (alias %s)", model_name, version.version, source, CHALLENGER)
    return client.get_model_version(model_name, version.version)


def logged_model_id(version: ModelVersion) -> str | None:
    """The MLflow 3 logged model a version was made from; read from its `models:/` source when the
    tracking server's answer leaves `model_id` empty (MLflow 3.17's REST client drops that field)."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    if source.startswith("models:/m-"):
        return source.removeprefix("models:/").split("/", 1)[0]
    return None


ALIAS_SET_AT = "alias_set_at."  # + alias: a version tag, the unix time plantad pointed that alias at it


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> None:
    """Point `name@alias` at `version` (moves it if it pointed elsewhere). MLflow keeps no time of an
    alias move, so the time is written first as the version's tag `alias_set_at.<alias>` (the page's
    promotion time); a move made outside plantad (the MLflow UI) leaves the tag unset or stale."""
    client.set_model_version_tag(name, str(version), f"{ALIAS_SET_AT}{alias}", f"{time.time():.3f}")
    client.set_registered_model_alias(name, alias, str(version))


def move_alias(client: MlflowClient, name: str, alias: str, version: str) -> str | None:
    """What the MLflow UI's alias edit does, refused for a version the registry does not hold (the
    error lists the ones it does); returns the version that held the alias before, if any."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        held = sorted((v.version for v in client.search_model_versions(f"name = '{name}'")), key=int)
        raise ValueError(f"registered model {name!r} has no version {version!r} (it has {held or 'none'})") from exc
    before = get_alias_version(client, name, alias)
    set_alias(client, name, alias, version)
    return None if before is None else str(before.version)


def get_alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `name@alias` points at; None when the alias or the registered model is missing."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise
    version = model.aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def finite(value: object) -> float | None:
    """`value` as a float when it is a finite number; None for None, 'n/a', NaN or inf."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_metric(client: MlflowClient, version: ModelVersion, metric: str) -> tuple[float | None, str]:
    """(latest finite value of `metric` in the run that produced `version`, where it came from)."""
    if not version.run_id:
        return None, f"v{version.version} has no source run to read '{metric}' from"
    metrics = client.get_run(version.run_id).data.metrics
    value = finite(metrics.get(metric))
    if value is None:
        return None, (f"run {version.run_id} of v{version.version} has no finite '{metric}' "
                      f"(got {metrics.get(metric)!r}; metrics: {sorted(metrics)}; check mlflow.promotion_metric)")
    return value, f"logged by run {version.run_id}"


# (champion version) -> (its metric on the candidate's test set or None, how it was obtained)
ChampionScorer = Callable[["ModelVersion"], tuple[float | None, str]]


CANARY_TAG = "rollout.canary"  # "rolled back": the rollout controller ended this version's canary
ROLLED_BACK = "rolled back"
GRAPH_TAG = "golden_graph"  # "agrees" or "disagrees: ..." (the serving runtime's graph against torch)


def pretrained_teacher(version: ModelVersion) -> bool:
    """True when the version's `teacher_source` tag says its teacher has real weights (checkpoint/hub);
    a random or unrecorded teacher is False."""
    return version.tags.get("teacher_source") in ("checkpoint", "hub")


def promotion_decision(
    client: MlflowClient,
    name: str,
    candidate_version: str | int,
    metric: str,
    mode: Literal["manual", "auto"],
    higher_is_better: bool = True,
    allow_random_teacher: bool = False,
    score_champion: ChampionScorer | None = None,
) -> Decision:
    """Should `candidate_version` become `champion`? Reads the registry; changes nothing.

    Both modes: yes when there is no champion (the first version registered, or the alias was
    deleted), so `models:/<name>@champion` resolves after the first `dvc repro`. manual: otherwise
    never. auto: otherwise yes when the candidate strictly beats the champion, the champion's value
    coming from `score_champion` (the register stage re-scores it on the candidate's test set; without
    a scorer the champion's logged metric is used). A missing or non-finite value on either side, or a
    teacher without pretrained weights (unless `allow_random_teacher`), never moves the alias.
    """
    if mode not in ("manual", "auto"):
        raise RegistryError(f"mlflow.promote must be 'manual' or 'auto', got {mode!r}")
    candidate = client.get_model_version(name, str(candidate_version))
    champion = get_alias_version(client, name, CHAMPION)
    cand_value, cand_how = run_metric(client, candidate, metric)
    champ_value, champ_how = None, ""
    if mode == "auto" and champion is not None and champion.version != candidate.version:
        champ_value, champ_how = (score_champion or (lambda v: run_metric(client, v, metric)))(champion)
    promote, why = _decide(candidate, champion, cand_value, champ_value, metric, mode, higher_is_better,
                           allow_random_teacher)
    champ_text = "none" if champion is None else f"v{champion.version} {metric}={_shown(champ_value)}"
    champ_text += f", {champ_how}" if champ_how else ""
    cand_text = f"v{candidate.version} {metric}={_shown(cand_value)}" + (f", {cand_how}" if cand_value is None else "")
    decision = Decision(promote, f"{why} (candidate {cand_text}; champion {champ_text})",
                        cand_value, champ_value, str(candidate.version),
                        None if champion is None else str(champion.version), metric, mode)
    log.info("promotion of %s v%s: %s: %s", name, candidate.version,
             "promote" if decision.promote else "keep", decision.reason)
    return decision


def _decide(candidate: ModelVersion, champion: ModelVersion | None, cand_value: float | None,
            champ_value: float | None, metric: str, mode: str, higher_is_better: bool,
            allow_random_teacher: bool) -> tuple[bool, str]:
    """(promote, why) from what promotion_decision read."""
    if champion is not None and champion.version == candidate.version:
        return False, f"v{candidate.version} is already '{CHAMPION}'"
    if candidate.tags.get(GRAPH_TAG, "").startswith("disagrees"):
        return False, (f"its exported graph does not reproduce its torch forward on the golden images "
                       f"({candidate.tags[GRAPH_TAG]}): never '{CHAMPION}' by the register stage")
    if candidate.tags.get(CANARY_TAG) == ROLLED_BACK:
        return False, (f"its canary was rolled back ({candidate.tags.get('rollout.canary_reason', 'no reason recorded')})"
                       ": never promoted automatically")
    if champion is not None and mode == "manual":
        return False, f"manual mode: set alias '{CHAMPION}' in the MLflow UI to promote"
    if not pretrained_teacher(candidate) and not allow_random_teacher:
        source = candidate.tags.get("teacher_source", "not recorded")
        return False, (f"the candidate's teacher has no pretrained weights (teacher_source={source}): it is never "
                       "promoted automatically unless mlflow.allow_random_teacher_promotion is true; a person "
                       f"may still set '{CHAMPION}'")
    if champion is None:
        return True, f"no '{CHAMPION}' yet: the first version registered without one becomes '{CHAMPION}'"
    if cand_value is None or champ_value is None:
        side = "candidate" if cand_value is None else "champion"
        return False, f"the {side} has no finite '{metric}': a missing metric never wins, a person decides"
    better = cand_value > champ_value if higher_is_better else cand_value < champ_value
    word = "higher" if higher_is_better else "lower"
    return better, (f"candidate is {word} than the champion" if better
                    else f"candidate is not strictly {word} than the champion")


def apply_decision(client: MlflowClient, name: str, decision: Decision) -> Decision:
    """Record the decision as version tags; move `champion` to the candidate when it says so.

    Compare-and-set: `champion` is re-read just before it is moved, and when it no longer points
    where the decision saw it, nothing is overwritten and the returned decision says so. MLflow has
    no atomic alias update, so a move by someone else between that re-read and the set (one registry
    round trip) is still overwritten. Returns the decision as applied."""
    version = decision.candidate_version
    if decision.promote:
        now = get_alias_version(client, name, CHAMPION)
        now_version = None if now is None else str(now.version)
        if now_version != decision.champion_version:
            seen = "none" if decision.champion_version is None else f"v{decision.champion_version}"
            decision = replace(decision, promote=False, reason=(
                f"'{CHAMPION}' moved from {seen} to {'none' if now is None else 'v' + now_version} while v{version} "
                f"was being checked; nothing overwritten, re-run register to compare again. Was: {decision.reason}"))
            log.warning("%s: %s", name, decision.reason)
        else:
            set_alias(client, name, CHAMPION, version)
            log.info("%s@%s -> v%s", name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.decision", "promoted" if decision.promote else "kept")
    client.set_model_version_tag(name, version, "promotion.reason", decision.reason[:5000])
    return decision
