"""`plantad drift report --records`: the drift test of drift_report.py over the scored-part records
a serving app wrote (serving/records.py) instead of a folder of images. Each row carries its image's
drift coordinates as the replica's window held them, so nothing is scored again: the rows of one
model version, by line and oldest first, are cut into the same windows and tested against that
version's reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from plantad.config import ServeConfig
from plantad.evaluation.drift_report import NO_LINE, LineReport, line_report, log_report, write_report
from plantad.serving.predictor import Predictor
from plantad.serving.records import RECORDS_DIR, read_records
from plantad.storage import Location, open_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordSelection:
    version: str | None  # the model version whose rows are tested (None: a model folder served them)
    lines: dict[str, list[dict[str, Any]]]  # line -> its rows with coordinates, oldest first
    other_versions: int  # rows since the cut-off that other versions scored, left out
    without_coordinates: int  # rows of the version without drift coordinates, left out

    def describe(self, where: str, since: datetime | None) -> str:
        who = "a model folder (no version)" if self.version is None else f"model version {self.version}"
        rows = sum(len(r) for r in self.lines.values())
        return (f"{rows} scored-part records in {where}" + (f" since {since.isoformat()}" if since else "")
                + f", scored by {who}; left out: {self.other_versions} rows of other versions, "
                f"{self.without_coordinates} rows without drift coordinates")


def open_records(store: str, serve: ServeConfig) -> Location:
    """The store's location; a local folder that is not there is an error naming it."""
    if "://" not in store and not Path(store).expanduser().is_dir():
        raise FileNotFoundError(f"--records {store} is not a folder: give the serving app's serve.store "
                                "(a folder or s3://bucket/prefix)")
    return open_location(store, serve.store_s3)


def select_records(rows: list[dict[str, Any]], where: str, since: datetime | None = None,
                   version: str | None = None) -> RecordSelection:
    """The rows (oldest first) of `version`, default the version the newest row names, by line."""
    cutoff = since.timestamp() if since is not None else None
    rows = [r for r in rows if cutoff is None or r["time"] >= cutoff]
    if not rows:
        after = f" since {since.isoformat()}" if since else ""
        raise ValueError(f"no scored-part records in {where}/{RECORDS_DIR}{after}: turn on serve.records.enabled "
                         "on the serving app, or give an earlier --since")
    chosen = rows[-1]["model_version"] if version is None else version
    mine = [r for r in rows if r["model_version"] == chosen]
    if not mine:
        named = sorted({str(r["model_version"]) for r in rows})
        raise ValueError(f"no records of model version {chosen} in {where}; the records name versions "
                         f"{', '.join(named)} ('None': a model folder)")
    with_coords = [r for r in mine if r.get("drift") is not None]
    if not with_coords:
        raise ValueError(f"none of the {len(mine)} records of model version {chosen} in {where} carry drift "
                         "coordinates: that version has no drift reference, serve.drift.enabled was false, or an "
                         "older plantad wrote them; test a folder of the images with --images instead")
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in with_coords:
        lines.setdefault(r["line"] or NO_LINE, []).append(r)
    return RecordSelection(chosen, dict(sorted(lines.items())), len(rows) - len(mine), len(mine) - len(with_coords))


def records_model_uri(version: str | None, model: str | None, serve: ServeConfig) -> str:
    """The model the rows' version names: `--model`, else serve.model_dir for rows of a folder, else
    models:/<serve.model_name>/<version>."""
    if model:
        return model
    if version is None:
        if serve.model_dir is None:
            raise ValueError("the records were scored by a model folder (they name no version): give it with --model")
        return serve.model_dir
    return f"models:/{serve.model_name}/{version}"


def records_line(predictor: Predictor, line: str, rows: list[dict[str, Any]], serve: ServeConfig) -> LineReport:
    """Test a line's rows: their coordinates against the version's reference; a row is a reject when its
    probability is at or above the version's threshold (a request's own threshold is not recorded)."""
    reference = predictor.drift_reference
    vectors = np.array([r["drift"] for r in rows], dtype=np.float32)  # (N, D)
    dims = reference.projection.shape[1]
    if vectors.ndim != 2 or vectors.shape[1] != dims:
        raise ValueError(f"the records of line {line!r} hold drift coordinates of shape {vectors.shape}; the "
                         f"reference of {predictor.ref.describe()} projects to {dims} dimensions: another model "
                         "wrote them")
    prob = np.array([r["probability"] for r in rows], dtype=np.float64)
    return line_report(line, reference, vectors, prob, prob >= predictor.threshold, serve.drift)


def records_report(loc: Location, selection: RecordSelection, model_uri: str, tracking_uri: str | None,
                   serve: ServeConfig, out: Path, since: datetime | None = None,
                   log_to_mlflow: bool = True) -> tuple[Path, str | None]:
    """Test the selected rows with the version's reference, write the report into `out`, log it to MLflow."""
    predictor = Predictor.load(model_uri, tracking_uri)
    if predictor.ref.version != selection.version:
        raise ValueError(f"{model_uri} is {predictor.ref.describe()}, but the records were scored by "
                         f"{'a model folder' if selection.version is None else f'version {selection.version}'}: "
                         "give that model with --model, or pick the version with --version")
    if predictor.drift_reference is None:
        raise ValueError(f"{predictor.ref.describe()} has no drift reference to test its records against")
    lines = {line: rows for line, rows in selection.lines.items() if len(rows) >= 2}
    if not lines:
        raise ValueError(f"every line in the records of {loc.uri} has fewer than 2 rows: nothing to test")
    reports = [records_line(predictor, line, rows, serve) for line, rows in lines.items()]
    path = write_report(reports, predictor, serve.drift, out, selection.describe(loc.uri, since))
    logged = log_report(out, predictor, tracking_uri) if log_to_mlflow else None
    return path, logged


def load_selection(store: str, serve: ServeConfig, since: datetime | None,
                   version: str | None) -> tuple[Location, RecordSelection]:
    loc = open_records(store, serve)
    return loc, select_records(read_records(loc), loc.uri, since, version)
