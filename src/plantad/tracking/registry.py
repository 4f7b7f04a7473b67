"""Model Registry: versions, aliases and the promotion gate.

Every new version gets alias `challenger`. `champion` is what serving loads
(`models:/<name>@champion`); it moves only by the gate in `auto` mode, or by a person in the
MLflow UI in `manual` mode. Aliases, not stages: stages are deprecated since MLflow 2.9.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
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


def set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> None:
    """Point `name@alias` at `version` (moves it if it pointed elsewhere)."""
    client.set_registered_model_alias(name, alias, str(version))


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


def _run_metric(client: MlflowClient, version: ModelVersion, metric: str, required: bool) -> float | None:
    """Latest value of `metric` in the run that produced `version`."""
    if not version.run_id:
        if required:
            raise RegistryError(f"{version.name} v{version.version} has no source run to read '{metric}' from")
        return None
    metrics = client.get_run(version.run_id).data.metrics
    value = metrics.get(metric)
    if value is None or not math.isfinite(value):
        if required:
            raise RegistryError(
                f"{version.name} v{version.version} (run {version.run_id}) has no finite metric '{metric}' "
                f"(got {value!r}; metrics: {sorted(metrics)}); check mlflow.promotion_metric"
            )
        return None
    return float(value)


def promotion_decision(
    client: MlflowClient,
    name: str,
    candidate_version: str | int,
    metric: str,
    mode: Literal["manual", "auto"],
    higher_is_better: bool = True,
) -> Decision:
    """Should `candidate_version` become `champion`? Reads both runs' `metric`; changes nothing.

    auto: yes when there is no champion or the candidate strictly beats it. manual: never.
    """
    if mode not in ("manual", "auto"):
        raise RegistryError(f"mlflow.promote must be 'manual' or 'auto', got {mode!r}")
    candidate = client.get_model_version(name, str(candidate_version))
    champion = get_alias_version(client, name, CHAMPION)
    auto = mode == "auto"
    cand_value = _run_metric(client, candidate, metric, required=auto)
    champ_value = None
    if champion is not None and champion.version != candidate.version:
        champ_value = _run_metric(client, champion, metric, required=auto)
    champ_text = "none" if champion is None else f"v{champion.version} {metric}={champ_value}"
    cand_text = f"v{candidate.version} {metric}={cand_value}"

    if not auto:
        promote, why = False, f"manual mode: set alias '{CHAMPION}' in the MLflow UI to promote"
    elif champion is None:
        promote, why = True, f"no '{CHAMPION}' yet"
    elif champion.version == candidate.version:
        promote, why = False, f"v{candidate.version} is already '{CHAMPION}'"
    else:
        better = cand_value > champ_value if higher_is_better else cand_value < champ_value
        promote = better
        side = "higher" if higher_is_better else "lower"
        why = (f"candidate is {side} than the champion" if better
               else f"candidate is not strictly {side} than the champion")
    decision = Decision(promote, f"{why} (candidate {cand_text}; champion {champ_text})", cand_value, champ_value,
                        str(candidate.version), None if champion is None else str(champion.version), metric, mode)
    log.info("promotion of %s v%s: %s: %s", name, candidate.version,
             "promote" if decision.promote else "keep", decision.reason)
    return decision


def apply_decision(client: MlflowClient, name: str, decision: Decision) -> None:
    """Record the decision as version tags; move `champion` to the candidate when it says so."""
    version = decision.candidate_version
    client.set_model_version_tag(name, version, "promotion.decision", "promoted" if decision.promote else "kept")
    client.set_model_version_tag(name, version, "promotion.reason", decision.reason[:5000])
    if decision.promote:
        set_alias(client, name, CHAMPION, version)
        log.info("%s@%s -> v%s", name, CHAMPION, version)
