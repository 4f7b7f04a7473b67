"""Check, and repair, a project's dvc.lock before `dvc repro` reads it.

DVC rewrites dvc.lock in place (no temporary file and rename), so a crash or SIGKILL during that
write leaves a file DVC refuses ("validation failed"), and every later `dvc repro` and `dvc status`
stops there (found by bench/chaos.py). Repair never deletes anything: the damaged file is kept
beside the project as dvc.lock.damaged-<time>, and the new dvc.lock is written to a temporary file
and renamed. It is git's committed dvc.lock when there is one; otherwise the stage entries that
still pass DVC's schema, so DVC reruns only the others.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plantad.config import S3Config
from plantad.storage import open_location, write_atomic

LOCK_FILE = "dvc.lock"


@dataclass(frozen=True)
class LockReport:
    path: Path
    problem: str | None  # None: DVC will read it
    repaired_from: str | None = None  # "git HEAD" or "the valid stage entries"
    kept: Path | None = None  # where the damaged file went


def lock_problem(text: str) -> str | None:
    """What DVC would refuse in this dvc.lock text, in words; None when it reads it."""
    import voluptuous as vol
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return f"it is not valid YAML ({str(exc).splitlines()[0]})"
    if data is None:
        return "it is empty"
    try:
        COMPILED_LOCKFILE_SCHEMA(data)
    except vol.Invalid as exc:
        return f"it fails DVC's lock-file schema ({exc})"
    return None


def _committed_lock(project: Path) -> str | None:
    """dvc.lock as git's HEAD has it, when the project is a git work tree that commits one."""
    try:
        proc = subprocess.run(["git", "show", f"HEAD:./{LOCK_FILE}"], cwd=project, capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _valid_entries(text: str) -> str:
    """The stage entries of a damaged dvc.lock that pass DVC's per-stage schema, as a lock file."""
    import voluptuous as vol
    from dvc.schema import COMPILED_LOCK_FILE_STAGE_SCHEMA

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    stages = data.get("stages") if isinstance(data, dict) else None
    kept: dict[str, Any] = {}
    for name, entry in (stages if isinstance(stages, dict) else {}).items():
        try:
            COMPILED_LOCK_FILE_STAGE_SCHEMA(entry)
        except vol.Invalid:
            continue
        kept[name] = entry
    return yaml.safe_dump({"schema": "2.0", "stages": kept}, sort_keys=False)


def check_lock(project: Path, repair: bool = False) -> LockReport:
    """Report on <project>/dvc.lock; with `repair`, replace a damaged one (see the module doc)."""
    path = project / LOCK_FILE
    if not path.exists():
        return LockReport(path, None)
    text = path.read_text(encoding="utf-8", errors="replace")
    problem = lock_problem(text)
    if problem is None or not repair:
        return LockReport(path, problem)
    committed = _committed_lock(project)
    if committed is not None and lock_problem(committed) is None:
        new, source = committed, "git HEAD"
    else:
        new, source = _valid_entries(text), "the valid stage entries"
    kept = path.with_name(f"{LOCK_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    kept.write_text(text, encoding="utf-8")
    write_atomic(open_location(str(project), S3Config()), LOCK_FILE, new.encode("utf-8"))
    return LockReport(path, problem, source, kept)
