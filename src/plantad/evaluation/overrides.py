"""Which `plantad evaluate --set` overrides a saved model can honour, and the record of those it did.

A saved model's weights, Noisy-OR calibration, threshold and drift reference were fitted with its own
settings: an override of those (architecture, training, image size, calibration) could not take
effect, so it is refused by name instead of being ignored. How the model is scored can change: the
map's blur and image-score rule, batch, device and precision, the metrics' own settings, and which of
the model's branches score an image.
"""

from __future__ import annotations

from typing import Any

from plantad.config import METHOD_BRANCHES, ConfigError, parse_override

# what scoring and evaluation read at evaluation time (evaluate.py, scoring.py)
HONOURED = (
    "model.branches",
    "scoring.gaussian_sigma",
    "scoring.top_k_fraction",
    "scoring.batch_size",
    "scoring.cpu_amp",
    "train.device",
    "train.amp",
    "data.loader_workers",
    "evaluate.aupro_fpr_limit",
)
FITTED_AT_CALIBRATION = ("scoring.threshold_quantile", "scoring.drift_", "model.noisy_or.")
# overrides after which the scores are not those the stored threshold was fitted on
SCORE_DEFINING = ("model.branches", "scoring.gaussian_sigma", "scoring.top_k_fraction")
BRANCH_PARTS = {"dual": ("local", "semantic"), "local": ("local",), "semantic": ("semantic",)}


def _leaves(path: list[str], value: Any) -> list[tuple[str, Any]]:
    """`scoring={gaussian_sigma: 2}` is the override scoring.gaussian_sigma=2: one pair per leaf key."""
    if isinstance(value, dict) and value:
        return [pair for k, v in value.items() for pair in _leaves([*path, str(k)], v)]
    return [(".".join(path), value)]


def _why_not(key: str) -> str:
    if key.startswith(FITTED_AT_CALIBRATION):
        return ("the saved model's calibration (lambdas, threshold, drift reference) was fitted with its own value "
                "at training time")
    if key == "scoring.runtime":
        return "plantad evaluate scores with torch; scoring.runtime applies to serving and bulk scoring"
    if key.startswith("model."):
        return "it sets the architecture or training the saved weights were fitted with"
    if key == "data.image_size":
        return "the saved model's input size is fixed by its architecture"
    if key.startswith(("train.", "data.")):
        return "it is a training setting; the saved weights were fitted with the model's own"
    return "plantad evaluate does not use it"


def checked_overrides(overrides: list[str], saved: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of the `--set` overrides for a model saved with settings `saved` (a dict),
    after refusing, by name, every one that could not take effect on it."""
    checked: dict[str, Any] = {}
    for text in overrides:
        for key, value in _leaves(*parse_override(text)):
            if key not in HONOURED:
                raise ConfigError(
                    f"--set {key}: a saved model cannot take it ({_why_not(key)}); retrain with it "
                    f"(`plantad train --set {key}=...`). plantad evaluate --set accepts {', '.join(HONOURED)}"
                )
            if key == "model.branches":
                value = _checked_branches(value, saved["model"])
            checked[key] = value
    return checked


def _checked_branches(value: Any, saved_model: dict[str, Any]) -> str:
    """The branches to score with: the saved model's own, or one of the branches it has."""
    own, method = saved_model["branches"], saved_model["method"]
    wanted = METHOD_BRANCHES[method][0] if value is None else value
    if wanted not in BRANCH_PARTS:
        raise ConfigError(f"--set model.branches={value}: expected one of {', '.join(BRANCH_PARTS)}")
    missing = [b for b in BRANCH_PARTS[wanted] if b not in BRANCH_PARTS[own]]
    if missing:
        raise ConfigError(f"--set model.branches={wanted}: the saved model was trained with model.branches={own} "
                          f"and has no {missing[0]} branch to score")
    return wanted


def _saved_value(saved: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    return saved[section][name]


def scored_with(saved: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json records of the evaluation's settings: the overrides that took effect, the
    branches that scored and, when the scores are not the ones the stored threshold was fitted on
    (another branch selection, blur or image-score rule), why the threshold metrics are absent."""
    own = saved["model"]["branches"]
    record: dict[str, Any] = {"overrides": dict(overrides), "branches": overrides.get("model.branches", own),
                              "model_branches": own}
    changed = [f"{k}={v}" for k, v in overrides.items() if k in SCORE_DEFINING and v != _saved_value(saved, k)]
    if changed:
        record["at_threshold"] = (f"omitted: the stored threshold was fitted on scores made with the model's own "
                                  f"settings; it does not apply to scores made with {', '.join(changed)}")
    return record
