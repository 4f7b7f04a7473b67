"""A node lost under Ray Train, in a process of its own (the test session's shared Ray cluster stays
untouched): a three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head with no
CPU for workers, two workers of 1 CPU), two training workers of 0.75 CPU (so one per worker node),
the shards read from moto's S3 (the tests give an s3:// location) and a checkpoint written there
every epoch, and the node of one worker removed (raylet and workers killed) once a checkpoint is
written. The run is elastic (`ray.min_workers=1`): it resumes from the newest
checkpoint in S3 with the one worker the remaining node holds. With `--add-back` a node of 1 CPU
joins 3 s after the loss (`--add-back=SECONDS`: that many), as an autoscaler would add one; with
`--fixed` the run keeps its 2 workers (no `ray.min_workers`) and must wait for that node.
Writes a JSON report: the nodes, the times, and the run's steps and reported epochs (or its error).

    python tests/cluster/multinode_train.py <shards> <manifest.parquet> <s3 endpoint> <bucket> <out> \
        [--add-back[=SECONDS]] [--fixed] <report.json>
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

STEPS, SPE = 15, 5  # the node goes once the first checkpoint (step 5) is in S3: two epochs are left


def train_worker_nodes() -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if "TrainWorker" in (a.class_name or "")}


def placement(seconds: float) -> dict:
    """What holds the cluster now: every placement group in any state, with its bundles' nodes, and
    each node's free CPU (for a report on a run that did not resume)."""
    import ray
    from ray.util.state import list_placement_groups

    groups = [{"id": g.placement_group_id[:8], "state": g.state,
               "bundles": [{"node": (b.get("node_id") or "")[:8], "cpu": b.get("unit_resources", {}).get("CPU")}
                           for b in (g.bundles or [])]}
              for g in list_placement_groups(detail=True, limit=1000)]
    free = {n["NodeID"][:8]: ray._private.state.available_resources_per_node().get(n["NodeID"], {}).get("CPU")
            for n in ray.nodes() if n["Alive"]}
    return {"at_s": round(seconds, 1), "groups": groups, "free_cpu": free}


def startup_timeouts() -> list[float]:
    """The waits for a worker group's resources that Ray Train's controller gave up, in seconds
    (its log under this cluster's RAY_TMPDIR): an elastic run after a lost node first asks for the
    old size on a stale view of the cluster."""
    import os
    import re

    logs = Path(os.environ["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs" / "train"
    found = re.compile(r"^Error in control loop iteration: The worker group startup timed out after ([0-9.]+) seconds")
    timeouts = []
    for f in sorted(logs.glob("ray-train-sys-controller-*.log")):  # JSON lines: one per record
        for line in f.read_text(errors="replace").splitlines():
            try:
                match = found.match(json.loads(line).get("message", ""))
            except (ValueError, AttributeError):
                continue
            if match:
                timeouts.append(float(match.group(1)))
    return timeouts


def checkpoints(client, bucket: str, prefix: str) -> int:
    """How many checkpoints the run has written under s3://bucket/prefix."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(1 for page in pages for o in page.get("Contents", []) if o["Key"].endswith("/train_state.pt"))


def main(shards_dir: str, manifest_file: str, endpoint: str, bucket: str, out_dir: str, report: str,
         add_back: float | None = None, fixed: bool = False) -> int:
    import pandas as pd
    import ray

    from cluster_helpers import start_multinode

    from plantad.config import S3Config
    from plantad.data.shards import open_shards
    from plantad.tracking.s3 import s3_client
    from tiny import tiny_settings

    cluster, workers = start_multinode(head_cpus=0, worker_cpus=1)
    prefix = f"fit-{uuid.uuid4().hex[:8]}"
    settings = tiny_settings(f"train.steps={STEPS}", f"ray.steps_per_epoch={SPE}", "ray.num_workers=2",
                             "ray.cpus_per_worker=0.75", "ray.min_cpus_per_worker=0.75", "ray.data_cpus=0.25",
                             "ray.max_failures=2", f"ray.min_workers={'null' if fixed else 1}", "ray.elastic_placement_timeout_s=10",
                             "ray.stall_timeout_s=120", f"ray.address={cluster.address}",
                             f"ray.storage_path=s3://{bucket}/{prefix}", f"s3.endpoint_url={endpoint}",
                             f"s3.bucket={bucket}")
    manifest = pd.read_parquet(manifest_file)
    shards = open_shards(shards_dir, manifest, settings.s3)
    client = s3_client(S3Config(endpoint_url=endpoint, bucket=bucket))
    from plantad.training.ray_train import run_ray_training

    outcome: dict = {}

    def train() -> None:
        try:
            result = run_ray_training(settings, manifest, shards, Path(out_dir))
            outcome.update(steps=result.steps, history=result.history)
        except Exception as exc:  # reported, then asserted on by the test
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    started = time.monotonic()
    job = threading.Thread(target=train, daemon=True)
    job.start()
    nodes: set[str] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.is_alive() and (len(nodes) < 2 or not checkpoints(client, bucket,
                                                                                                prefix)):
        nodes = train_worker_nodes()
        time.sleep(0.2)
    result: dict = {"worker_nodes": len(nodes), "removed_at_s": None}
    if job.is_alive() and len(nodes) == 2:
        result["checkpoints_before_removal"] = checkpoints(client, bucket, prefix)
        result["nodes"] = {"lost": workers[1].node_id[:8], "kept": workers[0].node_id[:8]}
        cluster.remove_node(workers[1], allow_graceful=False)
        removed = time.monotonic()
        result["removed_at_s"] = removed - started
        if add_back is not None:
            time.sleep(add_back)
            result["nodes"]["added"] = cluster.add_node(num_cpus=1).node_id[:8]
            result["added_at_s"] = time.monotonic() - started
    snapshots: list[dict] = []
    while job.is_alive() and time.monotonic() - started < 600:
        job.join(timeout=15)
        try:
            snapshots = [*snapshots[-3:], placement(time.monotonic() - started)]
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            snapshots = [*snapshots[-3:], {"error": str(exc)[:200]}]
    result["placement_snapshots"] = snapshots
    result.update(seconds=time.monotonic() - started, job_alive=job.is_alive(), planned_steps=STEPS,
                  startup_timeouts=startup_timeouts(), **outcome)
    Path(report).write_text(json.dumps(result, indent=2, default=str))
    ray.shutdown()
    cluster.shutdown()
    return 0


def _add_back(argv: list[str]) -> float | None:
    given = [a for a in argv if a.startswith("--add-back")]
    return None if not given else float(given[-1].partition("=")[2] or 3)


if __name__ == "__main__":
    sys.exit(main(*[a for a in sys.argv[1:] if not a.startswith("--")][:6], add_back=_add_back(sys.argv),
                  fixed="--fixed" in sys.argv))
