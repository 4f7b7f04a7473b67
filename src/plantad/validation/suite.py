"""Validate the dataset manifest with Great Expectations 1.x before anything trains on it.

One ephemeral GX context per call (cheap once GX is imported): a pandas data source over the
manifest (plus helper columns), the suite from `rules.py`, a validation definition run by a
checkpoint whose UpdateDataDocsAction renders data docs into `out_dir/data_docs`. Nothing is sent
over the network; the data docs HTML links CSS/JS from public CDNs, so it renders unstyled offline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from plantad.config import ValidationConfig
from plantad.validation.derived import with_derived_columns
from plantad.validation.gx_loader import load_gx
from plantad.validation.report import ValidationReport, report_from_gx
from plantad.validation.rules import INDEX_COLUMNS, Rule, manifest_rules

log = logging.getLogger(__name__)

SUITE_NAME = "manifest"
DOCS_SITE = "plantad_validation"
REPORT_FILE = "validation.json"
DOCS_DIR = "data_docs"


def _context(docs_dir: Path) -> Any:
    """An in-memory GX context with progress bars off and one filesystem data docs site."""
    gx = load_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in context.get_site_names():  # the default site points at a throwaway temp folder
        context.delete_data_docs_site(site)
    context.add_data_docs_site(
        site_name=DOCS_SITE,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def run_suite(df: pd.DataFrame, rules: list[Rule], example_rows: int, docs_dir: Path) -> dict[str, Any]:
    """Run the rules over `df` through a GX checkpoint; return GX's suite result as a JSON dict."""
    gx = load_gx()
    context = _context(docs_dir)
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("whole manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for rule in rules:
        suite.add_expectation(rule.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate manifest", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="manifest checkpoint",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data docs", site_names=[DOCS_SITE])],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": [c for c in INDEX_COLUMNS if c in df.columns],
                "partial_unexpected_count": example_rows,
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    (suite_result,) = result.run_results.values()
    return suite_result.to_json_dict()


def validate_manifest(df: pd.DataFrame, cfg: ValidationConfig, out_dir: Path) -> ValidationReport:
    """Check the manifest; write `validation.json` and `data_docs/index.html` under out_dir.

    Never raises on bad data: call `report.raise_for_failures()` to stop on failures.
    """
    out_dir = Path(out_dir).resolve()  # GX's docs store needs an absolute base directory
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / DOCS_DIR
    if docs_dir.exists():  # data docs pages are named by run time: keep only this run's
        shutil.rmtree(docs_dir)
    data = with_derived_columns(df)
    rules = manifest_rules(cfg)
    gx_result = run_suite(data, rules, cfg.example_rows, docs_dir)
    report = report_from_gx(gx_result, rules, data, cfg.example_rows)
    payload = {"report": report.to_dict(), "data_docs": str((docs_dir / "index.html").relative_to(out_dir)), "gx_result": gx_result}
    (out_dir / REPORT_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    log.info("validation written to %s", out_dir / REPORT_FILE)
    return report
