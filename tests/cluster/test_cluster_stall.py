"""Every wait for the cluster has a bound: a training run or a bulk job that makes no progress for
ray.stall_timeout_s fails, naming what it waited for, and leaves the cluster as it found it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from plantad.cluster.capacity import read_capacity
from plantad.cluster.watch import StallError, WorkStopped, stop_thread, watched_iter
from plantad.training.ray_restarts import NoRoomError, run_with_restarts
from plantad.training.ray_train import run_ray_training
from cluster_helpers import free_cpus_back_to, hold, tiny_ray_settings

REPO = Path(__file__).resolve().parents[2]
STALL_S = 40  # a loaded 2-core CI machine takes up to tens of seconds to start and import task workers
# where nothing of the job can start at all, the bound is all the test waits for
NOTHING_STARTS_S = 15


def slow(items: list[int], pause_s: float):
    for item in items:
        time.sleep(pause_s)
        yield item


def test_watched_iter_passes_items_and_errors_and_bounds_the_wait() -> None:
    assert list(watched_iter(lambda: slow([1, 2, 3], 0.01), 5.0, lambda: "never", "item")) == [1, 2, 3]

    def broken():
        yield 1
        raise KeyError("a producer error")

    with pytest.raises(KeyError, match="a producer error"):
        list(watched_iter(broken, 5.0, lambda: "never", "item"))
    got, started = [], time.monotonic()
    with pytest.raises(StallError, match=r"no item for 0.5 s \(ray.stall_timeout_s\) after 1: the cluster's CPUs"):
        for item in watched_iter(iter_then_wait, 0.5, lambda: "the cluster's CPUs", "item"):
            got.append(item)
    assert got == [1] and time.monotonic() - started < 5
    assert producers() == [], "the stalled producer still runs after the stall was raised"


def producers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("watched ")]


def iter_then_wait():
    """A producer that waits as Ray Data's iterators do: in Python, polling every 10 ms."""
    yield 1
    while True:
        time.sleep(0.01)


def test_a_consumer_that_stops_early_stops_the_producer_and_a_blocked_one_is_named() -> None:
    items = watched_iter(lambda: slow(list(range(1000)), 0.01), 5.0, lambda: "never", "item")
    with closing(items):
        assert next(items) == 0  # the producer blocks on the full queue from here on
    assert producers() == [], "closing the iterator left its producer running"
    # a thread inside one long C call cannot be stopped: the caller learns so, within the bound
    landed: list[str] = []
    blocked = threading.Thread(target=sleep_in_c, args=(landed,), name="watched sleeper", daemon=True)
    blocked.start()
    started = time.monotonic()
    assert stop_thread(blocked, bound_s=0.5) is False
    assert 0.5 <= time.monotonic() - started < 2
    blocked.join(10)
    assert landed == ["stopped"]  # the exception landed once the call returned


def sleep_in_c(landed: list[str]) -> None:
    try:
        time.sleep(3)
        for _ in range(100):
            time.sleep(0.01)  # Python code again: the exception lands here
        landed.append("never stopped")
    except WorkStopped:
        landed.append("stopped")


def stalled_training(moto_s3, demo_shards, demo_manifest, tmp_path, holder_cpus: float, stall_s: float,
                     *extra: str) -> tuple[str, float]:
    """A run on a cluster that looks autoscaling (so it starts although it does not fit); its error
    and how long it took. The holder stays until the cluster has all but its CPUs free again."""
    import ray

    total = read_capacity(samples=1).total["CPU"]
    name = f"replica-{uuid.uuid4().hex[:6]}"
    holder = hold(holder_cpus, name)
    try:
        started = time.monotonic()
        with pytest.raises(StallError) as caught:
            run_ray_training(tiny_ray_settings(moto_s3, "ray.autoscaling=true", f"ray.stall_timeout_s={stall_s}", *extra),
                             demo_manifest, demo_shards, tmp_path / "model")
        took = time.monotonic() - started
        free_cpus_back_to(total - holder_cpus)
        print("FREE", time.monotonic())  # the aborted run's workers and placement group are gone
    finally:
        ray.kill(holder)
    message = str(caught.value)
    assert f"actor Replica '{name}'" in message, message
    assert not (tmp_path / "model").exists()
    return message, took


@pytest.mark.e2e
def test_a_worker_group_that_cannot_start_fails_after_the_bound(ray_local, moto_s3, demo_shards, demo_manifest,
                                                               tmp_path) -> None:
    total = read_capacity(samples=1).total["CPU"]
    message, took = stalled_training(moto_s3, demo_shards, demo_manifest, tmp_path, total - 0.5, NOTHING_STARTS_S)
    assert f"(ray.stall_timeout_s={NOTHING_STARTS_S})" in message
    assert "waited for Ray Train's worker group to start: 2 workers of 0.5 CPU" in message, message
    assert f"0.5 of {total:g} CPUs free" in message
    assert took < NOTHING_STARTS_S + 45


@pytest.mark.e2e
def test_workers_that_get_no_dataset_block_fail_after_the_bound(ray_local, moto_s3, demo_shards, demo_manifest,
                                                               tmp_path) -> None:
    """The hang of the daily loop: the workers hold the CPUs that Ray Data's decoding tasks need."""
    total = read_capacity(samples=1).total["CPU"]
    message, took = stalled_training(moto_s3, demo_shards, demo_manifest, tmp_path, total - 1.0, STALL_S,
                                     "ray.min_cpus_per_worker=0.5")  # 2 x 0.5: every CPU the holder leaves
    assert "waited for a dataset block on rank 0, rank 1: Ray Data's decoding tasks need 0.25 CPU each" in message
    assert took < STALL_S + 60


@pytest.mark.e2e
def test_bulk_scoring_that_gets_no_actor_fails_after_the_bound(ray_local, trained_tiny, demo_root, tmp_path) -> None:
    """`plantad score` as a user runs it, joined to the session's cluster, whose CPUs a holder keeps."""
    import ray

    _, result = trained_tiny
    images = sorted(demo_root.rglob("*.png"))[:3]
    (tmp_path / "in").mkdir()
    for i, image in enumerate(images):
        (tmp_path / "in" / f"{i}.png").write_bytes(image.read_bytes())
    total = read_capacity(samples=1).total["CPU"]
    holder = hold(total - 0.4, "main-job-replica")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [sys.executable, "-m", "plantad.cli", "score", "--config", str(REPO / "params.yaml"),
            "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(result.model_path.parent),
            "--set", "ray.autoscaling=true", "--set", f"ray.stall_timeout_s={NOTHING_STARTS_S}"]
    try:
        started = time.monotonic()
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
        took = time.monotonic() - started
    finally:
        ray.kill(holder)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert f"error: no scored batch for {NOTHING_STARTS_S} s (ray.stall_timeout_s) after 0" in proc.stderr, \
        proc.stderr[-3000:]
    assert "waited for 1 scoring actor(s) of 1 CPU and read tasks of 0.25 CPU" in proc.stderr
    assert "actor Replica 'main-job-replica'" in proc.stderr
    # the error is the last word: nothing of the stopped stream calls into Ray while the process exits
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: no scored batch"), proc.stderr[-3000:]
    assert "core_worker.cc" not in proc.stderr, proc.stderr[-3000:]  # Ray Data's actor pool line, dropped
    assert took < 120
    free_cpus_back_to(total)  # the job ended with its process: nothing of it waits on in the cluster


def test_a_fixed_count_restart_that_never_gets_room_fails_naming_what_it_waited_for(ray_local) -> None:
    """The driver's restart of a fixed worker count (ray_restarts.py) waits for room for every worker,
    bounded: here a worker needs a CPU more than the whole cluster has, so room never comes."""
    from ray.train import WorkerGroupError

    total = read_capacity(samples=1).total["CPU"]
    calls: list[int] = []

    def attempt(n: int) -> str:
        calls.append(n)
        if n == 0:
            raise WorkerGroupError("rank 1 was lost with its node", {1: RuntimeError("node lost")})
        return "resumed"

    started = time.monotonic()
    with pytest.raises(NoRoomError) as caught:
        run_with_restarts(attempt, max_failures=2, num_workers=2, per_worker={"CPU": total + 1}, timeout_s=1.5)
    message = str(caught.value)
    assert calls == [0] and time.monotonic() - started < 15, calls  # no second attempt without room
    assert f"waited 1.5 s (ray.stall_timeout_s) for room for ray.num_workers=2 workers of {total + 1:g} CPU each" \
        in message, message
    assert re.search(r"the cluster's live nodes have node [0-9a-f]{8}: [0-9.]+ CPU free", message), message
    # with room, the same failure is followed by a second attempt
    calls.clear()
    assert run_with_restarts(attempt, 2, 2, {"CPU": 0.01}, timeout_s=10) == "resumed" and calls == [0, 1]
