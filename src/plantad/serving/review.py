"""The review queue and its way back into the versioned dataset.

Verdicts are immutable JSON objects under `<store>/reviews/` (as band changes: any replica, no
overwrite, the log is the audit trail; a later verdict on the same image wins). `export_reviewed`
writes confirmed-normal images into `<category>/train/good/` and confirmed defects into
`<category>/test/<defect>/` of an MVTec-layout dataset, skipping images already there (by pixel
sha256), so `dvc add` + `dvc repro` train and validate on what the line saw.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from plantad.data.layout import NORMAL, find_categories, is_image_file
from plantad.serving.bands import event_name
from plantad.serving.inputs import ApiError
from plantad.serving.records import image_path, pixel_sha256, read_records
from plantad.storage import Location, exists, list_names, read_bytes, write_atomic

REVIEWS_DIR = "reviews"
VERDICTS = ("normal", "defective")
DEFECT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
SHA = re.compile(r"[0-9a-f]{64}")
EXPORT_PREFIX = "review-"  # exported file names: the register stage counts them


class ExportError(ValueError):
    """An export that cannot be done as asked: the message names the folder, line or setting."""


def parse_verdict(doc: Any) -> tuple[str, str, str | None]:
    """(sha256, verdict, defect) of {"sha256", "verdict": normal|defective, "defect": name}; 400 otherwise."""
    if not isinstance(doc, dict) or not set(doc) <= {"sha256", "verdict", "defect"}:
        raise ApiError(400, "a review is {\"sha256\": hex, \"verdict\": \"normal\" | \"defective\", \"defect\": name}")
    sha, verdict, defect = doc.get("sha256"), doc.get("verdict"), doc.get("defect")
    if not isinstance(sha, str) or not SHA.fullmatch(sha):
        raise ApiError(400, f"sha256 {sha!r} is not 64 lowercase hex digits")
    if verdict not in VERDICTS:
        raise ApiError(400, f"verdict {verdict!r} is not one of {list(VERDICTS)}")
    named = isinstance(defect, str) and DEFECT_NAME.fullmatch(defect) is not None and defect != NORMAL
    if verdict == "defective" and not named:
        raise ApiError(400, f"defect {defect!r}: a defective part needs a defect name (lowercase letters, digits, "
                            "'_' or '-', not 'good'); it becomes the folder test/<defect>/")
    return sha, verdict, defect if verdict == "defective" else None


def save_verdict(loc: Location, sha: str, verdict: str, defect: str | None, who: str) -> dict[str, Any]:
    if not exists(loc, image_path(sha)):
        raise ApiError(404, f"no stored image {sha} in the review store (serve.store); only recorded REVIEW, NG "
                            "and sampled OK images can be reviewed")
    now = time.time()
    doc = {"at": now, "who": who, "sha256": sha, "verdict": verdict, "defect": defect}
    name = event_name(now)
    write_atomic(loc, f"{REVIEWS_DIR}/{name}", json.dumps(doc).encode())
    return {**doc, "id": name.removesuffix(".json")}


def read_verdicts(loc: Location, cache: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Every verdict, oldest first (objects are immutable, so `cache` keeps those read)."""
    cache = {} if cache is None else cache
    for name in list_names(loc, REVIEWS_DIR):
        if name.endswith(".json") and not name.startswith(".") and name not in cache:  # not a write in flight
            cache[name] = dict(json.loads(read_bytes(loc, f"{REVIEWS_DIR}/{name}")), id=name.removesuffix(".json"))
    return [cache[n] for n in sorted(cache)]


def latest_by_sha(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:  # oldest first: the newest wins
        out[r["sha256"]] = r
    return out


def review_queue(records: list[dict], verdicts: list[dict], line: str | None, limit: int) -> list[dict[str, Any]]:
    """Stored images not yet reviewed, newest first (an image scored twice is listed once, as last scored)."""
    reviewed = latest_by_sha(verdicts)
    stored = latest_by_sha([r for r in records if r.get("image_stored")])
    items = [r for sha, r in stored.items() if sha not in reviewed and (line is None or r["line"] == line)]
    items.sort(key=lambda r: r["time"], reverse=True)
    return items[:limit]


@dataclass
class ExportResult:
    written: list[str] = field(default_factory=list)  # paths relative to the dataset
    skipped_present: int = 0  # already in the dataset (same pixels)


def check_dataset(data: Path) -> list[str]:
    """The categories of an MVTec-layout dataset folder; ExportError when `data` is not one."""
    if not data.is_dir():
        raise ExportError(f"--data {data} is not a folder: give the DVC-tracked dataset (e.g. data/plant)")
    found = [c for c in find_categories(data) if (data / c / "train" / NORMAL).is_dir()]
    if not found:
        raise ExportError(f"--data {data} is not a dataset: no <category>/train/good/ folder in it")
    return found


def _present(folder: Path) -> set[str]:
    return {pixel_sha256(Image.open(p)) for p in folder.rglob("*") if is_image_file(p)}


def export_reviewed(loc: Location, data: Path, line_categories: dict[str, str], since: float | None = None
                    ) -> ExportResult:
    """Write every reviewed image (verdict at or after `since`) into the dataset; see the module doc."""
    categories = check_dataset(data)
    line_of = {sha: r["line"] for sha, r in latest_by_sha(read_records(loc)).items()}
    verdicts = [v for v in latest_by_sha(read_verdicts(loc)).values() if since is None or v["at"] >= since]
    result, present = ExportResult(), {}
    for v in sorted(verdicts, key=lambda v: v["at"]):
        line = line_of.get(v["sha256"])
        category = line_categories.get(line or "")
        if category is None:
            raise ExportError(f"reviewed image {v['sha256'][:12]} comes from line {line!r}, which has no category in "
                              f"serve.line_categories ({line_categories or 'empty'}): add '{line}: <category>'")
        if category not in categories:
            raise ExportError(f"serve.line_categories maps line {line!r} to {category!r}, which is not a category "
                              f"of {data} ({categories})")
        if category not in present:
            present[category] = _present(data / category)
        if v["sha256"] in present[category]:
            result.skipped_present += 1
            continue
        folder = Path(category, "train", NORMAL) if v["verdict"] == "normal" else Path(category, "test", v["defect"])
        rel = folder / f"{EXPORT_PREFIX}{v['sha256'][:16]}.png"
        (data / folder).mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(read_bytes(loc, image_path(v["sha256"])))
        present[category].add(v["sha256"])
        result.written.append(str(rel))
    return result


def reviewed_images(manifest) -> int:
    """How many images of a dataset manifest came from the line's review (the registered version's tag)."""
    return int(manifest["path"].astype(str).str.rsplit("/", n=1).str[-1].str.startswith(EXPORT_PREFIX).sum())
