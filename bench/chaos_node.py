"""Chaos, part (d): a worker node lost under bulk scoring on a three-node Ray cluster on this machine.

Each trial runs tests/cluster/multinode_bulk.py in a process of its own (its own Ray cluster, ports
and temp dir): a head of 1 CPU and two workers of 2 CPUs, one scoring actor per worker, and the
worker of one actor removed (raylet and workers killed) once a part is committed. Recovered: the job
finished with exactly one row per image; data lost: a missing or duplicated row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from chaos_common import Row

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "cluster" / "multinode_bulk.py"


def tiny_model_and_images(work: Path, n_images: int = 40) -> tuple[Path, Path]:
    """A tiny model trained on the demo data (as tests/conftest.py's trained_tiny) and a folder of images."""
    from tiny import tiny_settings

    from plantad.config import DemoConfig
    from plantad.data.demo import generate_demo
    from plantad.data.manifest import scan_dataset
    from plantad.training.trainer import train_model

    root = work / "demo"
    generate_demo(root, DemoConfig(seed=0, image_size=64, n_train=24, n_test_good=6, n_test_defect=3))
    settings = tiny_settings("train.steps=150", "train.hard_mining.ramp_steps=75")
    result = train_model(settings, scan_dataset(root), root, work / "model", progress=False)
    images = work / "in"
    images.mkdir()
    for i, path in enumerate(sorted(p for p in root.rglob("*.png") if "ground_truth" not in p.parts)[:n_images]):
        shutil.copy2(path, images / f"{i:03d}.png")
    return result.model_path.parent, images


def node_loss_trial(model_dir: Path, images: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
    report = out.with_suffix(".json")
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), str(images), str(out), str(report)],
                              env={**env, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0 or not report.exists():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    return json.loads(report.read_text())


def node_loss_rows(work: Path, k: int) -> list[Row]:
    work.mkdir(parents=True, exist_ok=True)
    model_dir, images = tiny_model_and_images(work)
    n = len(list(images.iterdir()))
    trials = [node_loss_trial(model_dir, images, work / f"out-{i}") for i in range(k)]
    lost = [t for t in trials if t.get("removed_at_s") is not None]
    ok = sum("error" not in t and t.get("rows") == t.get("unique_relpaths") == n for t in lost)
    bad = sum("rows" in t and (t["rows"] != n or t["unique_relpaths"] != n) for t in lost)
    timing = ", ".join(f"{t['seconds'] - t['removed_at_s']:.0f}" for t in lost if "seconds" in t)
    errors = "; ".join(t["error"][:120] for t in trials if "error" in t)
    return [Row("worker node lost under bulk scoring (3 nodes, 1 actor per worker)", len(lost), ok, bad,
                f"{n} images; job finished {timing} s after the node was removed" + (f"; {errors}" if errors else "")
                + (f"; {k - len(lost)} trials ended before the removal" if len(lost) < k else ""))]
