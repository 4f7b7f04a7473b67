"""Chaos, part (d): a worker node lost under bulk scoring, online scoring and Ray Train, each on a
three-node Ray cluster on this machine.

Each trial runs a tests/cluster/multinode_*.py script in a process of its own (its own Ray cluster,
ports and temp dir), the same scripts as tests/cluster/test_cluster_nodes.py:
- bulk: a head of 1 CPU and two workers of 2 CPUs, one scoring actor per worker, the worker of one
  actor removed once a part is committed; the images come from and the table goes to the bucket,
  and the actors download the model from the MLflow server. Recovered: exactly one row per image;
  data lost: a missing or duplicated row.
- serving: one replica per worker (each version downloaded from the MLflow server), 4 clients
  that retry a failed request, the node of the replica
  that made the rollout controller removed, the champion moved, a node added back. Recovered: no
  request left unanswered and two replicas on the new champion again; data lost: a request never
  answered.
- training: two Ray Train workers, one per worker node, elastic down to one (or, with `fixed`, kept
  at two), the node of one removed once a checkpoint is written (and, with `add_back`, a node of
  1 CPU added that many seconds later). Recovered: the run finished its steps from a checkpoint
  after step 0; data lost: a run that restarted from step 0 or did not finish.
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
from infra.fixtures import two_versions

from plantad.cluster import with_serve_env
from plantad.config import S3Config
from plantad.data.manifest import scan_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "cluster"


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


def node_loss_trial(script: str, args: list[str], report: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        proc = subprocess.run([sys.executable, str(SCRIPTS / script), *args, str(report)],
                              env=with_serve_env({**env, "RAY_TMPDIR": ray_tmp}), capture_output=True, text=True,
                              timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0 or not report.exists():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    return json.loads(report.read_text())


def bulk_row(work: Path, model_dir: Path, images: Path, k: int, s3, tracking_uri: str) -> Row:
    """From and to the bucket, the model from the MLflow server: the nodes share no folder."""
    from plantad.tracking.s3 import s3_client

    n = len(list(images.iterdir()))
    client = s3_client(s3)
    for image in sorted(images.iterdir()):
        client.put_object(Bucket=s3.bucket, Key=f"{work.name}-bulk/in/{image.name}", Body=image.read_bytes())
    (work / "registry-bulk").mkdir()
    _, name, versions = two_versions(model_dir, next(images.iterdir()).read_bytes(), work / "registry-bulk",
                                     f"{work.name}-bulk-{os.getpid()}", tracking_uri)
    trials = [node_loss_trial("multinode_bulk.py", [f"models:/{name}/{versions[0]}", tracking_uri, s3.endpoint_url,
                                                    s3.bucket, f"s3://{s3.bucket}/{work.name}-bulk/in",
                                                    f"s3://{s3.bucket}/{work.name}-bulk/out-{i}"],
                              work / f"bulk-{i}.json") for i in range(k)]
    lost = [t for t in trials if t.get("removed_at_s") is not None]
    ok = sum("error" not in t and t.get("rows") == t.get("unique_relpaths") == n for t in lost)
    bad = sum("rows" in t and (t["rows"] != n or t["unique_relpaths"] != n) for t in lost)
    timing = ", ".join(f"{t['seconds'] - t['removed_at_s']:.0f}" for t in lost if "seconds" in t)
    again = ", ".join(str(t["scorings"] - n) for t in lost if "scorings" in t)  # scored again after the loss
    errors = "; ".join(t["error"][:120] for t in trials if "error" in t)
    return Row("worker node lost under bulk scoring (3 nodes, 1 actor per worker)", len(lost), ok, bad,
               f"{n} images; job finished {timing} s after the node was removed; images scored again: {again}"
               + (f"; {errors}" if errors else "")
               + (f"; {k - len(lost)} trials ended before the removal" if len(lost) < k else ""))


def serving_row(work: Path, model_dir: Path, images: Path, k: int, tracking_uri: str) -> Row:
    """The replicas download each version from the MLflow server: the nodes share no folder."""
    png = sorted(images.iterdir())[0]
    trials = []
    for i in range(k):
        root = work / f"registry-{i}"
        root.mkdir()
        uri, name, versions = two_versions(model_dir, png.read_bytes(), root, f"{work.name}-serve-{os.getpid()}-{i}",
                                           tracking_uri)
        trials.append(node_loss_trial("multinode_serve.py", [uri, name, *versions, str(png)], work / f"serve-{i}.json"))
    done = [t for t in trials if "attempts" in t]
    ok = sum(not t["lost"] for t in done)
    def counts(t: dict) -> str:
        codes = [a["status"] for a in t["attempts"]]
        return f"{codes.count(500)}/{codes.count(503)}/{len(codes)}"

    failed = ", ".join(counts(t) for t in done)
    back = ", ".join(f"{t['survivor_follows_s']:.1f}/{t['capacity_back_s']:.1f}" for t in done)
    errors = "; ".join(t["error"][:160] for t in trials if "error" in t)
    return Row("worker node lost under online scoring (3 nodes, 1 replica per worker, 4 retrying clients)",
               len(trials), ok, sum(bool(t["lost"]) for t in done),
               f"requests 500/503/all: {failed}; survivor on the new champion / two replicas again after the node "
               f"was added (s): {back}" + (f"; {errors}" if errors else ""))


def training_row(work: Path, s3, k: int, add_back: float | None = None, fixed: bool = False) -> Row:
    from plantad.data.shards import write_shards

    root = work / "demo"
    manifest = scan_dataset(root)
    # in the bucket, as the nodes share no folder
    shards = write_shards(manifest, root, f"s3://{s3.bucket}/shards-{work.name}", S3Config(
        endpoint_url=s3.endpoint_url, bucket=s3.bucket), 256_000_000)
    manifest.to_parquet(work / "manifest.parquet")
    options = ([f"--add-back={add_back}"] if add_back is not None else []) + (["--fixed"] if fixed else [])
    trials = [node_loss_trial("multinode_train.py", [shards.location, str(work / "manifest.parquet"), s3.endpoint_url,
                                                     s3.bucket, str(work / f"model-{i}"), *options],
                              work / f"train-{i}.json") for i in range(k)]
    lost = [t for t in trials if t.get("removed_at_s") is not None]
    done = [t for t in lost if t.get("steps") == t.get("planned_steps")]
    resumed = [int(t["history"][-1]["resumed_from"]) for t in done]  # the step the last worker group began at
    timing = ", ".join(f"{t['seconds'] - t['removed_at_s']:.0f}" for t in done)
    errors = "; ".join(t["error"][:160] for t in trials if "error" in t)
    count = "fixed: 2 workers" if fixed else "elastic: min 1 worker"
    back = f", a node added {add_back:g} s after the loss" if add_back is not None else ""
    workers = ", ".join(str(t["history"][-1].get("world_size", "?")) for t in done)
    planned = done[0]["planned_steps"] if done else "?"
    # Ray Train's tries to place the old size on its stale view of the cluster, each given up after
    # ray.elastic_placement_timeout_s
    stale = ", ".join(str(len(t.get("startup_timeouts", []))) for t in done)
    return Row(f"worker node lost under Ray Train (3 nodes, 1 worker per worker node, {count}{back})", len(lost),
               sum(r > 0 for r in resumed), len(lost) - sum(r > 0 for r in resumed),
               (f"resumed from step {', '.join(map(str, resumed))} of {planned} with {workers} workers; finished "
                f"{timing} s after the loss; worker groups given up waiting for room: {stale}" if resumed
                else "did not resume") + (f"; {errors}" if errors else ""))


NODE_ROWS = ("bulk", "serving", "training")


def node_loss_rows(work: Path, k: int, s3, tracking_uri: str, which: tuple[str, ...] = NODE_ROWS,
                   add_back: float | None = None, fixed: bool = False) -> list[Row]:
    work.mkdir(parents=True, exist_ok=True)
    model_dir, images = tiny_model_and_images(work)
    rows = [bulk_row(work, model_dir, images, k, s3, tracking_uri)] if "bulk" in which else []
    rows += [serving_row(work, model_dir, images, k, tracking_uri)] if "serving" in which else []
    return rows + ([training_row(work, s3, k, add_back, fixed)] if "training" in which else [])
