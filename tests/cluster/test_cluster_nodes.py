"""Node loss on a real multi-node Ray cluster (three nodes on this machine, in a process of its own
so the session's shared cluster is untouched): bulk scoring loses a worker node mid-run and still
finishes with exactly one row per image; online scoring loses a replica's node under load, loses
no request of a retrying client, follows a champion declared while the node is gone, and gets its
capacity back when a node returns; elastic training loses a worker's node and finishes on the other
from its newest checkpoint in S3, and a fixed worker count waits for a replacement node to do so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from infra.fixtures import two_versions
from plantad.cluster import with_serve_env
from plantad.models.checkpoint import load_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def cluster_env(ray_tmp: str) -> dict[str, str]:
    """This environment without the session cluster's address and token, with Ray's files (and the
    session_latest link) under `ray_tmp`, so the two clusters never see each other; Serve's data
    plane as plantad's clusters run it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    return with_serve_env({**env, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})


class Trial:
    """A tests/cluster script running on a cluster of its own (Ray's files under a temp dir of its
    own, its output in `root`/log.txt); `result()` waits for its JSON report."""

    def __init__(self, script: str, args: list[str], root: Path, timeout: float) -> None:
        self.root, self.report, self.timeout = root, root / "report.json", timeout
        self.ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
        with open(root / "log.txt", "w") as log:  # a file, not a pipe: trials run side by side
            # a session of its own: stop() ends the script and the Ray processes its cluster started
            self.proc = subprocess.Popen([sys.executable, str(HERE / script), *args, str(self.report)],
                                         env=cluster_env(self.ray_tmp), cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.deadline = time.monotonic() + timeout

    def result(self) -> dict:
        late = ""
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            late = f", stopped: not done after {self.timeout:.0f} s"
        self.stop()
        log = (self.root / "log.txt").read_text(errors="replace")[-6000:]
        assert self.proc.returncode == 0 and self.report.exists(), \
            f"{self.proc.args[1]} exit {self.proc.returncode}{late}\n{log}"
        return json.loads(self.report.read_text())

    def stop(self) -> None:
        """Kill what is left of the script's process group; remove Ray's files."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def run_script(script: str, args: list[str], cwd: Path, timeout: float) -> dict:
    """Run a tests/cluster script on a cluster of its own; its JSON report (cwd/report.json)."""
    return Trial(script, args, cwd, timeout).result()


def bucket_with_shards(kind: str, moto_s3, manifest, root: Path) -> tuple[str, str]:
    """A bucket of its own for a training run, holding the dataset's shards: the nodes share no
    folder, so the workers read the images, and write their checkpoints, only there."""
    import uuid

    from plantad.config import S3Config
    from plantad.data.shards import write_shards
    from plantad.tracking.s3 import s3_client

    bucket = f"{kind}-{uuid.uuid4().hex[:8]}"
    s3_client(moto_s3).create_bucket(Bucket=bucket)
    shards = write_shards(manifest, root, f"s3://{bucket}/shards", S3Config(endpoint_url=moto_s3.endpoint_url,
                                                                           bucket=bucket), 256_000_000)
    return bucket, shards.location


@pytest.mark.e2e
def test_bulk_scoring_that_loses_a_worker_node_finishes_with_one_row_per_image(trained_tiny, demo_root, moto_s3,
                                                                              mlflow_server, tmp_path):
    """From and to S3, the model from the MLflow server: the nodes share no folder."""
    import uuid

    from plantad.tracking.s3 import s3_client

    _, result = trained_tiny
    images = sorted(p for p in demo_root.rglob("*.png") if "ground_truth" not in p.parts)[:40]
    run = uuid.uuid4().hex[:8]
    client = s3_client(moto_s3)
    for i, image in enumerate(images):
        client.put_object(Bucket=moto_s3.bucket, Key=f"node-bulk-{run}/in/{i:03d}.png", Body=image.read_bytes())
    uri, model, versions = two_versions(result.model_path.parent, images[0].read_bytes(), tmp_path,
                                        f"node-bulk-{run}", mlflow_server)
    got = run_script("multinode_bulk.py", [f"models:/{model}/{versions[0]}", uri, moto_s3.endpoint_url, moto_s3.bucket,
                                           f"s3://{moto_s3.bucket}/node-bulk-{run}/in",
                                           f"s3://{moto_s3.bucket}/node-bulk-{run}/out"],
                     tmp_path, 480)
    assert got["actor_nodes"] == 2 and got["removed_at_s"] is not None, got  # an actor on each worker, one lost
    assert got["committed_before_removal"] < got["summary"]["parts"], got  # the loss came mid-run
    assert "error" not in got and got["summary"]["scored"] == len(images), got
    assert got["rows"] == got["unique_relpaths"] == len(images), got
    assert got["scorings"] >= len(images), got  # each image's scoring started at least once
    print(f"node removed at {got['removed_at_s']:.1f} s, job finished at {got['seconds']:.1f} s; "
          f"{got['scorings'] - len(images)} images scored again")


def test_serving_that_loses_a_replica_node_loses_no_retried_request_and_gets_capacity_back(trained_tiny, demo_root,
                                                                                           mlflow_server, tmp_path):
    """The replicas download each version from the MLflow server: the nodes share no folder."""
    import uuid

    _, result = trained_tiny
    png = sorted(p for p in demo_root.rglob("*.png") if "ground_truth" not in p.parts)[0]
    uri, model, versions = two_versions(result.model_path.parent, png.read_bytes(), tmp_path,
                                        f"node-serve-{uuid.uuid4().hex[:8]}", mlflow_server)
    got = run_script("multinode_serve.py", [uri, model, *versions, str(png)], tmp_path, 480)
    attempts = got["attempts"]
    assert got["proxy_nodes"] == [got["head"]], got["proxy_nodes"]  # the one proxy outlives any worker
    assert sorted(got["replica_nodes"]) == sorted(got["workers"]), got  # one replica on each worker
    assert got["lost"] == [], got["lost"]  # every request of a retrying client was answered in the end
    # A request on the lost replica fails with 500 (in flight when it went, or sent to it before the
    # router learnt it was gone): at most its max_ongoing_requests (2). Everything else that fails is
    # a 503 (backpressure on the halved capacity), which says "retry".
    hard = [a for a in attempts if a["status"] not in (200, 503)]
    assert len(hard) <= 2 and all(a["status"] == 500 and a["start"] < 5 for a in hard), hard
    assert any(a["status"] == 200 and 0 < a["start"] < 10 for a in attempts), "nothing answered after the loss"
    owner = got["controller_before"][0]["owner_node"]
    assert owner == got["victim"], got["controller_before"]  # the controller died with the lost node's replica
    assert [c["id"] for c in got["controller_after"]] != [c["id"] for c in got["controller_before"]], got
    assert len(got["replica_nodes_after"]) == 2 and got["victim"] not in got["replica_nodes_after"], got
    # the first answer from the new champion (a request sent before the move can get one once the
    # survivor swapped): every request sent a second after it gets the new champion
    moved = min(a["end"] for a in attempts if a["version"] == versions[1])
    later = {a["version"] for a in attempts if a["version"] and a["start"] > moved + 1}
    assert later == {versions[1]}, f"answers of {later} after the champion moved to v{versions[1]}"
    failed = [a for a in attempts if a["status"] != 200]
    print(f"{len(attempts)} requests, {len(failed)} failed ({len(hard)} with 500, the rest 503); the survivor on "
          f"the new champion {got['survivor_follows_s']:.1f} s after the move, capacity back "
          f"{got['capacity_back_s']:.1f} s after a node was added; {got['seconds']:.1f} s in all")



@pytest.fixture(scope="module")
def training_trials(moto_s3, demo_root, demo_manifest, tmp_path_factory):
    """The elastic and the fixed-count training trial, started together, each on a cluster of its
    own with a bucket of its own: much of each is waiting (for a node to be declared dead, for a
    placement, for the replacement node), so side by side they take little more than one.
    {kind: (bucket, folder, trial)}."""
    trials = {}
    for kind, extra in (("elastic", []), ("fixed", ["--fixed", "--add-back=8"])):
        root = tmp_path_factory.mktemp(f"node-{kind}")
        bucket, shards = bucket_with_shards(f"node-{kind}", moto_s3, demo_manifest, demo_root)
        demo_manifest.to_parquet(root / "manifest.parquet")
        trials[kind] = (bucket, root, Trial("multinode_train.py", [shards, str(root / "manifest.parquet"),
                                                                  moto_s3.endpoint_url, bucket, str(root / "model"),
                                                                  *extra], root, 600))
    yield trials
    for _, _, trial in trials.values():
        trial.stop()


@pytest.mark.e2e
def test_elastic_training_that_loses_a_worker_node_resumes_from_its_newest_checkpoint(training_trials):
    got = training_trials["elastic"][2].result()
    assert got["worker_nodes"] == 2 and got["removed_at_s"] is not None, got  # one worker per node, one node lost
    assert "error" not in got and got["steps"] == got["planned_steps"], got
    # the last worker group began at the checkpoint written before the loss: no step ran twice from 0
    assert got["history"][-1]["resumed_from"] >= 5 and got["history"][-1]["world_size"] == 1, got["history"]
    steps = [h["step"] for h in got["history"]]
    assert steps == sorted(set(steps)), steps  # each reported step once
    # a try at the old size on the stale view of the cluster ended after ray.elastic_placement_timeout_s
    assert set(got["startup_timeouts"]) <= {10.0}, got["startup_timeouts"]
    print(f"resumed from step {got['history'][-1]['resumed_from']}; finished "
          f"{got['seconds'] - got['removed_at_s']:.0f} s after the node was removed")


@pytest.mark.e2e
def test_fixed_count_training_that_loses_a_worker_node_resumes_when_a_replacement_joins(training_trials):
    """ray.min_workers unset: the run keeps its 2 workers, so it waits for a node of 1 CPU added 8 s
    after the loss; the driver restarts it from the newest checkpoint in S3 once there is room."""
    bucket, root, trial = training_trials["fixed"]
    got = trial.result()
    assert got["worker_nodes"] == 2 and got["removed_at_s"] is not None and "added" in got["nodes"], got
    assert "error" not in got and got["steps"] == got["planned_steps"], got
    assert got["startup_timeouts"] == [], got["startup_timeouts"]  # the driver waited for room, Ray Train did not
    last = got["history"][-1]
    assert last["resumed_from"] >= 5 and last["world_size"] == 2, got["history"]  # from a checkpoint, 2 workers
    steps = [h["step"] for h in got["history"]]
    assert steps == sorted(set(steps)), steps  # each reported step once: the restart continued the run's history
    model, meta = load_model(root / "model" / "model.pt")
    assert model.noisy_or.calibrated and meta["training"]["num_workers"] == 2 and meta["training"]["steps"] == 15
    assert meta["training"]["ray_checkpoint"].startswith(f"{bucket}/fit-"), meta["training"]  # from S3
    print(f"resumed from step {last['resumed_from']} with 2 workers; finished "
          f"{got['seconds'] - got['added_at_s']:.0f} s after the node was added, "
          f"{got['seconds'] - got['removed_at_s']:.0f} s after the loss")
