"""Where a model came from: the git commit of the code and the DVC version of the data."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import yaml

from plantad.data.manifest import manifest_fingerprint


def git_commit(project_root: Path) -> dict[str, str]:
    """{'git_commit': sha, 'git_dirty': 'true'|'false'}, empty outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {}
    return {"git_commit": sha, "git_dirty": str(dirty).lower()}


def _dvc_file_md5(data_root: Path) -> str | None:
    dvc_file = data_root.with_name(data_root.name + ".dvc")
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def _dvc_lock_md5(project_root: Path, data_root: Path) -> str | None:
    lock = project_root / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    target = str(data_root.resolve())
    for stage in stages.values():
        for entry in list(stage.get("deps", [])) + list(stage.get("outs", [])):
            if str((project_root / entry.get("path", "")).resolve()) == target and entry.get("md5"):
                return entry["md5"]
    return None


def data_version(project_root: Path, data_root: Path, manifest: pd.DataFrame) -> dict[str, str]:
    """Tags naming the data a model was trained on (DVC hash where DVC tracks it)."""
    tags = {"data_root": str(data_root), "data_manifest_sha256": manifest_fingerprint(manifest)}
    md5 = _dvc_file_md5(data_root) or _dvc_lock_md5(project_root, data_root)
    if md5:
        tags["data_dvc_md5"] = md5
    return tags
