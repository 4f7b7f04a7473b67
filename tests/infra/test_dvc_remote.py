"""DVC push/pull of a tracked folder through an S3 remote on the moto endpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from infra.fixtures import run_checked, tool

from plantad.config import S3Config
from plantad.tracking.s3 import s3_client


def _write_dataset(root: Path) -> dict[str, bytes]:
    files = {
        "weave/train/good/000.png": os.urandom(3000),
        "weave/train/good/001.png": os.urandom(2000),
        "metal/test/scratch/000.png": os.urandom(1500),
        "README.txt": b"tiny tracked folder\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.e2e
def test_dvc_push_pull_roundtrip_through_s3(tmp_git_dvc_repo: Path, moto_s3: S3Config) -> None:
    repo, dvc = tmp_git_dvc_repo, tool("dvc")
    files = _write_dataset(repo / "data")
    run_checked([dvc, "add", "data"], repo)
    run_checked([dvc, "remote", "add", "-d", "storage", f"s3://{moto_s3.bucket}/dvc"], repo)
    run_checked([dvc, "remote", "modify", "storage", "endpointurl", moto_s3.endpoint_url], repo)
    run_checked([dvc, "remote", "modify", "storage", "region", moto_s3.region], repo)
    run_checked(["git", "add", "-A"], repo)
    run_checked(["git", "commit", "-q", "-m", "track data"], repo)
    run_checked([dvc, "push"], repo)

    listed = s3_client(moto_s3).list_objects_v2(Bucket=moto_s3.bucket, Prefix="dvc/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    dir_md5 = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]  # '<md5>.dir'
    assert f"dvc/files/md5/{dir_md5[:2]}/{dir_md5[2:]}" in keys
    assert len([k for k in keys if not k.endswith(".dir")]) == len(files)

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run_checked([dvc, "pull"], repo)
    assert _read_tree(repo / "data") == files
    assert run_checked(["git", "status", "--porcelain"], repo) == ""
