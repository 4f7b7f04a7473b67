"""A fixed worker count that outlives a lost node: the driver, not Ray Train, restarts the run.

Ray Train 2.60 restarting a fixed-size worker group in place did not resume when a replacement node
joined while its placement group was pending (docs/benchmarks/faults.md). So for a fixed count
(`ray.min_workers` unset) Ray Train makes no retry of its own; after a failed attempt the driver
waits, up to `ray.stall_timeout_s`, until the cluster's live nodes have room for all
`ray.num_workers` workers, creating nothing on the cluster meanwhile, then starts a new TorchTrainer
on the same run name and storage, whose workers resume from the newest training state there. At
most `ray.max_failures` such restarts.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from plantad.cluster.watch import StallError

log = logging.getLogger(__name__)
T = TypeVar("T")


class NoRoomError(StallError):
    """The cluster had no room for the run's workers within the bound; the message names both."""


def free_per_node() -> dict[str, dict[str, float]]:
    """{node id: free resources} of the live nodes (a lost node's last report is not room)."""
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    return {node: dict(free) for node, free in ray._private.state.available_resources_per_node().items()
            if node in alive}


def workers_that_fit(free: dict[str, dict[str, float]], per_worker: dict[str, float]) -> int:
    """How many workers of `per_worker` resources the nodes' free resources hold (one worker never
    spans two nodes)."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    return sum(min((math.floor(room.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=0)
               for room in free.values())


def _cluster_text(free: dict[str, dict[str, float]]) -> str:
    if not free:
        return "no live node"
    return "; ".join(f"node {node[:8]}: {room.get('CPU', 0.0):g} CPU"
                     + (f", {room['GPU']:g} GPU" if "GPU" in room else "") + " free"
                     for node, room in sorted(free.items()))


def wait_for_room(num_workers: int, per_worker: dict[str, float], timeout_s: float, poll_s: float = 1.0,
                  settle_s: float = 2.0) -> float:
    """Seconds waited until the live nodes had room for `num_workers` workers for `settle_s` on end
    (a node just lost can still look alive for a moment); NoRoomError after `timeout_s`."""
    started = time.monotonic()
    since: float | None = None
    while True:
        free = free_per_node()
        now = time.monotonic()
        if workers_that_fit(free, per_worker) >= num_workers:
            since = now if since is None else since
            if now - since >= settle_s:
                return now - started
        else:
            since = None
        if now - started >= timeout_s:
            what = " + ".join(f"{v:g} {k}" for k, v in per_worker.items() if v > 0)
            raise NoRoomError(
                f"waited {timeout_s:g} s (ray.stall_timeout_s) for room for ray.num_workers={num_workers} workers "
                f"of {what} each (a fixed worker count: ray.min_workers is unset); the cluster's live nodes have "
                f"{_cluster_text(free)}: add a node, free those resources, or set ray.min_workers to go on with fewer")
        time.sleep(poll_s)


# Ray Train reads it when it creates a run's controller (and passes it on to the controller's actor)
PLACEMENT_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextmanager
def elastic_placement_timeout(seconds: float | None) -> Iterator[None]:
    """While a TorchTrainer is created and runs: an elastic run's bound on a worker group's wait
    for its resources (ray.elastic_placement_timeout_s); None (a fixed count) leaves Ray's. After a
    lost node Ray Train first asks for the old size on a stale view of the cluster and only re-reads
    it when that wait ends, so Ray's 60 s default is the time an elastic run idles after every loss."""
    if seconds is None:
        yield
        return
    before = os.environ.get(PLACEMENT_TIMEOUT_ENV)
    os.environ[PLACEMENT_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PLACEMENT_TIMEOUT_ENV, None)
        else:
            os.environ[PLACEMENT_TIMEOUT_ENV] = before


def run_with_restarts(attempt: Callable[[int], T], max_failures: int, num_workers: int,
                      per_worker: dict[str, float], timeout_s: float) -> T:
    """attempt(0), and after each Ray Train failure (TrainingFailedError) a wait for room and
    attempt(n), at most `max_failures` times; a stall or any other error ends the run at once."""
    from ray.train import TrainingFailedError

    for n in range(max_failures + 1):
        if n:
            waited = wait_for_room(num_workers, per_worker, timeout_s)
            log.warning("restart %d of %d (ray.max_failures): room for %d workers after %.0f s", n, max_failures,
                        num_workers, waited)
        try:
            return attempt(n)
        except StallError:
            raise
        except TrainingFailedError as exc:
            if n == max_failures:
                raise
            log.warning("Ray Train attempt %d failed (%s): the driver restarts it from the newest checkpoint once "
                        "the cluster has room for %d workers", n, " ".join(str(exc).split())[:300], num_workers)
    raise AssertionError("unreachable")
