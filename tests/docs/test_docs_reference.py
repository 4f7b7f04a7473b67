"""The reference pages against the code: every command and flag of the CLI parser, every setting of the
typed config (with its default and the params.yaml value), every route of the app, every metric."""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"
ABSENT = "—"  # the params.yaml column of a key the file does not set


def sections(page: Path) -> dict[str, str]:
    """`## heading` -> the text under it."""
    parts = re.split(r"^## (.+)$", page.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def cells(row: str) -> list[str]:
    """A table row's cells; `\\|` inside a cell is a literal pipe."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]


def first_cells(text: str) -> list[str]:
    return [cells(row)[0] for row in text.splitlines() if row.startswith("| `")]


# --- command line -------------------------------------------------------------------------------

def commands(parser: argparse.ArgumentParser, path: str = "plantad") -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something, by its full name ('plantad teacher publish'), and the top level."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = {path: parser} if path == "plantad" or not subs else {}
    for action in subs:
        for name, sub in action.choices.items():
            found.update(commands(sub, f"{path} {name}"))
    return found


def parser_arguments(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names.update(action.option_strings or [action.dest])
    return names


def documented_arguments(section: str) -> set[str]:
    names = set()
    for cell in first_cells(section):
        for code in re.findall(r"`([^`]+)`", cell):
            names.add(code.split()[0])
    return names


def test_every_cli_command_and_flag_has_a_reference_entry():
    from plantad.cli import build_parser

    documented = sections(REFERENCE / "cli.md")
    parsed = commands(build_parser())
    assert not set(parsed) - set(documented), f"commands without a section in cli.md: {set(parsed) - set(documented)}"
    stale = {h for h in documented if h.startswith("plantad")} - set(parsed)
    assert not stale, f"cli.md documents commands the parser does not have: {stale}"
    for name, parser in parsed.items():
        have, wrote = parser_arguments(parser), documented_arguments(documented[name])
        assert have <= wrote, f"`{name}`: no entry in cli.md for {sorted(have - wrote)}"
        assert wrote <= have, f"`{name}`: cli.md documents {sorted(wrote - have)}, which the parser does not have"


# --- settings -----------------------------------------------------------------------------------

def section_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the settings section a field holds, whether it may be null)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
        return inner[0], True
    return None, False


def setting_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every dotted key of the typed settings with its default (a nullable section is a key too)."""
    defaults = model().model_dump(mode="json")
    keys: dict[str, object] = {}
    for name, field in model.model_fields.items():
        sub, nullable = section_model(field.annotation)
        if sub is None or nullable:
            keys[prefix + name] = defaults[name]
        if sub is not None:
            keys.update(setting_defaults(sub, f"{prefix}{name}."))
    return keys


def params_value(params: dict, key: str) -> object:
    node: object = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def test_every_setting_has_a_reference_row_with_its_default_and_params_value():
    from plantad.config import Settings

    rows = {}
    for row in (REFERENCE / "settings.md").read_text().splitlines():
        row_cells = cells(row)
        if len(row_cells) == 4 and row_cells[0].startswith("`"):
            rows[row_cells[0].strip("`")] = row_cells
    defaults = setting_defaults(Settings)
    assert not set(defaults) - set(rows), f"settings without a row in settings.md: {sorted(set(defaults) - set(rows))}"
    assert not set(rows) - set(defaults), f"settings.md documents unknown keys: {sorted(set(rows) - set(defaults))}"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, (_, default, in_params, meaning) in rows.items():
        assert yaml.safe_load(default.strip("`")) == defaults[key], f"{key}: default {default}, config.py {defaults[key]!r}"
        want = params_value(params, key)
        got = ABSENT if in_params == ABSENT else yaml.safe_load(in_params.strip("`"))
        assert got == want, f"{key}: params.yaml column {in_params}, params.yaml has {want!r}"
        assert meaning, f"{key}: no meaning in settings.md"


# --- HTTP API and metrics -----------------------------------------------------------------------

def test_every_route_of_the_app_is_in_the_http_reference():
    from plantad.serving.app import app

    routes = {re.sub(r"\{(\w+)\}", r"<\1>", path) for path in app.openapi()["paths"]}  # the exported schema
    table = sections(REFERENCE / "http-api.md")["Routes"]
    documented = {code.split()[-1] for cell in first_cells(table) for code in re.findall(r"`([^`]+)`", cell)}
    assert routes <= documented, f"routes without an entry in http-api.md: {sorted(routes - documented)}"
    assert documented <= routes, f"http-api.md documents routes the app does not have: {sorted(documented - routes)}"


def test_every_prometheus_metric_is_in_the_metrics_reference():
    defined = set()
    for source in (ROOT / "src" / "plantad").rglob("*.py"):
        defined |= set(re.findall(r"\b(?:Counter|Gauge|Histogram)\(\s*\"(\w+)\"", source.read_text()))
    assert defined, "no metric definitions found: the pattern no longer matches the code"
    page = (REFERENCE / "metrics.md").read_text()
    documented = set(re.findall(r"`(plantad_\w+)`", page))
    assert defined <= documented, f"metrics without an entry in metrics.md: {sorted(defined - documented)}"
    assert documented <= defined, f"metrics.md documents metrics the code does not define: {sorted(documented - defined)}"
