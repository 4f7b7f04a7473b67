"""Node loss on a real multi-node Ray cluster (three nodes on this machine, in a process of its own
so the session's shared cluster is untouched): bulk scoring loses a worker node mid-run and still
finishes with exactly one row per image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def cluster_env(ray_tmp: str) -> dict[str, str]:
    """This environment without the session cluster's address and token, with Ray's files (and the
    session_latest link) under `ray_tmp`, so the two clusters never see each other."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    return {**env, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


@pytest.mark.e2e
def test_bulk_scoring_that_loses_a_worker_node_finishes_with_one_row_per_image(trained_tiny, demo_root, tmp_path):
    _, result = trained_tiny
    images = sorted(p for p in demo_root.rglob("*.png") if "ground_truth" not in p.parts)[:40]
    (tmp_path / "in").mkdir()
    for i, image in enumerate(images):
        shutil.copy2(image, tmp_path / "in" / f"{i:03d}.png")
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
    report = tmp_path / "report.json"
    try:
        proc = subprocess.run([sys.executable, str(HERE / "multinode_bulk.py"), str(result.model_path.parent),
                               str(tmp_path / "in"), str(tmp_path / "out"), str(report)],
                              env=cluster_env(ray_tmp), cwd=tmp_path, capture_output=True, text=True, timeout=480)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0 and report.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(report.read_text())
    assert got["actor_nodes"] == 2 and got["removed_at_s"] is not None, got  # an actor on each worker, one lost
    assert got["committed_before_removal"] < got["summary"]["parts"], got  # the loss came mid-run
    assert "error" not in got and got["summary"]["scored"] == len(images), got
    assert got["rows"] == got["unique_relpaths"] == len(images), got
    print(f"node removed at {got['removed_at_s']:.1f} s, job finished at {got['seconds']:.1f} s")
