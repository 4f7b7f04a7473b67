"""Helpers for the cluster tests: another job's CPU holder, waiting for CPUs to come free, tiny Ray
Train settings, and a registry of two versions for the node-loss serving script."""

from __future__ import annotations

import time
import uuid

from plantad.cluster.capacity import list_holders, read_capacity
from tiny import tiny_settings


def hold(cpus: float, name: str):
    """An actor of another job's kind holding `cpus` CPUs (as a Serve replica does)."""
    import ray

    holder = ray.remote(num_cpus=cpus)(type("Replica", (), {"ping": lambda self: True})).options(name=name).remote()
    ray.get(holder.ping.remote())
    return holder


def free_cpus_back_to(expected: float, timeout_s: float = 60.0) -> float:
    """Wait until the cluster has `expected` CPUs free again (a run's workers have let go)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = read_capacity(samples=1).free["CPU"]
        if abs(free - expected) < 1e-6:
            return free
        time.sleep(0.5)
    raise AssertionError(f"not after {timeout_s:.0f} s: {expected} CPUs free again (now {free}; {list_holders()})")


def start_multinode(head_cpus: float, worker_cpus: float, workers: int = 2):
    """A Ray cluster of a head and `workers` worker nodes in this process (ray.cluster_utils), on ports
    of its own (the test session's cluster holds Ray's defaults), a lost node declared dead after 3
    missed health checks 1 s apart (Ray's default: 5 x 3 s), this process joined to it and its
    state API pointed at it: (cluster, worker nodes)."""
    import os

    import ray
    from ray.cluster_utils import Cluster

    from infra.fixtures import free_port

    # One authentication mode for every node: plantad.cluster.connect (a training run in this process)
    # sets RAY_AUTH_MODE=token in this process's environment when a token is at hand, so a node added
    # later (cluster.add_node) would start in token mode and refuse the GCS's calls (placing a bundle
    # on it fails, and the CPU it prepared stays reserved). The cluster is this process's own.
    os.environ["RAY_AUTH_MODE"] = "disabled"

    health = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
              "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "include_dashboard": True, "dashboard_port": free_port(),
        "gcs_server_port": free_port(), "_system_config": health})
    nodes = [cluster.add_node(num_cpus=worker_cpus) for _ in range(workers)]
    cluster.wait_for_nodes()
    # Ray's state API (list_actors, ...) called without an address, here or in a job's actors (Ray
    # Train's placement-group cleaner), looks for a cluster and takes the newest on this machine: the
    # session's, or a trial's running beside this one. plantad's jobs name theirs the same way.
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    return cluster, nodes


def tiny_ray_settings(moto_s3, *extra: str):
    """Tiny settings for a 2-worker Ray Train run checkpointing to moto's S3."""
    return tiny_settings("ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.steps_per_epoch=5", "ray.max_failures=0",
                         f"ray.storage_path=s3://{moto_s3.bucket}/fit-{uuid.uuid4().hex[:8]}",
                         f"s3.endpoint_url={moto_s3.endpoint_url}", f"s3.bucket={moto_s3.bucket}", *extra)
