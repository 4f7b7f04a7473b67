"""A node lost under bulk scoring, in a process of its own (the test session's shared Ray cluster stays
untouched): a three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head of 1 CPU,
two workers of 2 CPUs), one scoring actor per worker (2 CPUs each, so none fits on the head), and
the worker of one actor removed (its raylet and workers killed, as a pre-empted VM) once both
actors are up and a part is committed. The images come from and the table goes to moto's S3, and
the actors download the model from an MLflow server (`models:/...`): the nodes share no folder.
Writes a JSON report: the summary, the table's row counts, how many images' scoring started in
all (more than the images: some were scored again after the loss) and the timings.

    python tests/cluster/multinode_bulk.py <models:/name/version> <tracking uri> <s3 endpoint> <bucket> \
        <s3://input> <s3://output> <report.json> [--replace]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def scoring_actor_nodes() -> dict[str, str]:
    """Alive map actors of Ray Data (the scoring pool) -> the node each runs on."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if "MapWorker" in (a.class_name or "")}


ACTORS = 2  # bulk.actors below


def counting_scorer():
    """Make the job's scorer tell a counter actor on this (the head) node how many images each batch
    it starts holds, so that images scored again after the loss show (a lost node's counts were
    sent as its batches started), and hold its first batch until all ACTORS scorers exist (at most
    120 s), so the loss comes mid-run: otherwise the first actor can score every image before the
    second has downloaded the model. Defined here, it reaches the actors by value; the job's own
    scorer does the scoring. Returns the counter."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from plantad.serving.bulk import job
    from plantad.serving.bulk.scorer import BulkScorer

    @ray.remote(num_cpus=0)
    class ScoringCounter:
        def __init__(self) -> None:
            self.images = self.scorers = 0

        def add(self, n: int) -> None:
            self.images += n

        def arrive(self) -> int:
            self.scorers += 1
            return self.scorers

        def arrived(self) -> int:
            return self.scorers

        def total(self) -> int:
            return self.images

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = ScoringCounter.options(name="bulk-scoring-counter", scheduling_strategy=here).remote()

    class CountingScorer(BulkScorer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.counter = ray.get_actor("bulk-scoring-counter")
            ray.get(self.counter.arrive.remote())
            self.all_there = False

        def __call__(self, batch):
            deadline = time.monotonic() + 120
            while not self.all_there and time.monotonic() < deadline:
                self.all_there = ray.get(self.counter.arrived.remote()) >= ACTORS
                time.sleep(0 if self.all_there else 0.2)
            self.counter.add.remote(len(batch))
            return super().__call__(batch)

    job.BulkScorer = CountingScorer
    return counter


def main(model_uri: str, tracking_uri: str, endpoint: str, bucket: str, input_uri: str, output_uri: str, report: str,
         replace: bool) -> int:
    import ray

    from cluster_helpers import start_multinode

    from plantad.serving.bulk import read_results, run_bulk
    from plantad.storage import open_location
    from tiny import tiny_settings

    cluster, workers = start_multinode(head_cpus=1, worker_cpus=2)
    settings = tiny_settings("bulk.part_size=4", "bulk.batch_size=2", f"bulk.actors={ACTORS}", "bulk.cpus_per_actor=2",
                             "bulk.min_cpus_per_actor=2", "bulk.read_cpus=0.25", "ray.stall_timeout_s=120",
                             f"s3.endpoint_url={endpoint}", f"s3.bucket={bucket}", f"mlflow.tracking_uri={tracking_uri}")
    out = open_location(output_uri, settings.s3)
    outcome: dict = {}
    counter = counting_scorer()

    def score() -> None:
        try:
            outcome["summary"] = run_bulk(settings, input_uri, output_uri, model_uri, progress=False).as_dict()
        except Exception as exc:  # reported, then asserted on by the test
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    def committed() -> int:
        from pyarrow import fs as pafs

        found = out.fs.get_file_info(pafs.FileSelector(out.base, recursive=True, allow_not_found=True))
        return sum(1 for f in found if "/parts/part-" in f.path and f.path.endswith(".parquet"))

    started = time.monotonic()
    job = threading.Thread(target=score, daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    nodes: dict[str, str] = {}
    while time.monotonic() < deadline and job.is_alive() and (len(set(nodes.values())) < 2 or not committed()):
        nodes = scoring_actor_nodes()
        time.sleep(0.2)
    on_two = sorted(set(nodes.values()))
    victim = next((w for w in workers if w.node_id in on_two), None)
    removed_at = None
    if job.is_alive() and len(on_two) == 2 and victim is not None:
        committed_before = committed()
        cluster.remove_node(victim, allow_graceful=False)
        removed_at = time.monotonic() - started
        if replace:
            time.sleep(2)
            cluster.add_node(num_cpus=2)
    job.join(timeout=300)
    result = {"actor_nodes": len(on_two), "removed_at_s": removed_at, "seconds": time.monotonic() - started,
              "job_alive": job.is_alive(), **outcome}
    if removed_at is not None:
        result["committed_before_removal"] = committed_before
    result["scorings"] = ray.get(counter.total.remote())  # images whose scoring started, repeats included
    if "summary" in outcome:
        table = read_results(open_location(outcome["summary"]["output"], settings.s3))
        result["rows"] = len(table)
        result["unique_relpaths"] = int(table["relpath"].nunique())
    Path(report).write_text(json.dumps(result, indent=2, default=str))
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:8], replace="--replace" in sys.argv[8:]))
