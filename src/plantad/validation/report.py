"""What a validation run found, in our own terms: failed expectations by name, with example rows.

Built from GX's result dict (the JSON form of ExpectationSuiteValidationResult), so the report and
GX's data docs always describe the same run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from plantad.validation.derived import DERIVED_FROM, ROW
from plantad.validation.rules import INDEX_COLUMNS, Rule


class DataValidationError(ValueError):
    """The manifest broke at least one expectation; the message is the report's summary."""


@dataclass
class Failure:
    expectation: str  # the rule's stable name
    column: str | None  # checked column(s), comma-joined for pair expectations; None for table checks
    unexpected_count: int | None  # None where GX counts no rows (table checks, errors)
    examples: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None  # missing columns, or why GX could not evaluate the expectation


@dataclass
class ValidationReport:
    success: bool
    failures: list[Failure]
    evaluated_expectations: int
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.success:
            return f"manifest valid: {self.evaluated_expectations} expectations passed on {self.rows} rows"
        lines = [
            f"manifest validation failed: {len(self.failures)} of {self.evaluated_expectations} "
            f"expectations on {self.rows} rows"
        ]
        for f in self.failures:
            where = f" [{f.column}]" if f.column else ""
            count = "" if f.unexpected_count is None else f": {f.unexpected_count} unexpected row(s)"
            lines.append(f"- {f.expectation}{where}{count}")
            if f.message:
                lines.append(f"    {f.message}")
            for ex in f.examples:
                rest = " ".join(f"{k}={v}" for k, v in ex.items() if k not in (ROW, "path"))
                lines.append(f"    row {ex.get(ROW)}: {ex.get('path')}  {rest}")
            if f.unexpected_count is not None and f.unexpected_count > len(f.examples):
                lines.append(f"    ... and {f.unexpected_count - len(f.examples)} more")
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        if not self.success:
            raise DataValidationError(self.summary())


def plain(value: Any) -> Any:
    """A JSON-ready Python value: numpy scalars unwrapped, NA/NaN as None."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _checked_columns(kwargs: dict[str, Any]) -> list[str]:
    return [kwargs[k] for k in ("column", "column_A", "column_B") if kwargs.get(k)]


def _error_message(exception_info: dict[str, Any], checked: list[str], df: pd.DataFrame) -> str | None:
    """Why GX could not evaluate an expectation, naming the manifest columns a helper needed."""
    # GX nests exception info per metric for metric errors and keeps it flat otherwise
    infos = [exception_info] if "raised_exception" in exception_info else exception_info.values()
    raised = [i.get("exception_message") or "" for i in infos if i.get("raised_exception")]
    if not raised:
        return None
    for col in checked:
        if col in DERIVED_FROM and col not in df.columns:
            needs = ", ".join(DERIVED_FROM[col])
            return f"could not be evaluated: helper column {col} needs manifest column(s) {needs}"
    return "could not be evaluated: " + "; ".join(dict.fromkeys(raised))


def _examples(result: dict[str, Any], df: pd.DataFrame, columns: list[str], limit: int) -> list[dict]:
    rows = [entry[ROW] for entry in result.get("partial_unexpected_index_list") or [] if ROW in entry]
    cols = list(dict.fromkeys(c for c in [*INDEX_COLUMNS, *columns] if c in df.columns))
    return [{c: plain(df.at[r, c]) for c in cols} for r in rows[:limit]]


def failure_from_result(res: dict[str, Any], rule: Rule, df: pd.DataFrame, example_rows: int) -> Failure:
    kwargs = res["expectation_config"]["kwargs"]
    checked = _checked_columns(kwargs)
    result = res.get("result") or {}
    message = _error_message(res.get("exception_info") or {}, checked, df)
    missing = (result.get("details") or {}).get("mismatched", {}).get("missing")
    if missing:
        message = "missing columns: " + ", ".join(missing)
    return Failure(
        expectation=rule.name,
        column=", ".join(checked) or None,
        unexpected_count=result.get("unexpected_count"),
        examples=_examples(result, df, [*checked, *rule.show], example_rows),
        message=message,
    )


def report_from_gx(
    gx_result: dict[str, Any], rules: list[Rule], df: pd.DataFrame, example_rows: int
) -> ValidationReport:
    """Our report from GX's result dict; failures in suite order."""
    by_name = {r.name: r for r in rules}
    results = {r["expectation_config"]["meta"]["name"]: r for r in gx_result["results"]}
    if set(results) != set(by_name):
        raise RuntimeError(f"GX returned results for {sorted(results)}, expected {sorted(by_name)}")
    failures = [
        failure_from_result(results[name], by_name[name], df, example_rows)
        for name in by_name
        if not results[name]["success"]
    ]
    return ValidationReport(
        success=bool(gx_result["success"]) and not failures,
        failures=failures,
        evaluated_expectations=len(results),
        rows=len(df),
    )
