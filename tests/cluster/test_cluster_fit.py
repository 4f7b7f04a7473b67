"""Jobs that join a cluster whose CPUs other work holds (the main job's Serve replica): they fit
into what is free, or stop within seconds naming what they need and what holds the rest."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster_helpers import free_cpus_back_to, hold, tiny_ray_settings
from plantad.cluster.capacity import DoesNotFit, fit_per_worker, list_holders, read_capacity
from plantad.models.checkpoint import load_model
from plantad.training.ray_train import run_ray_training


def test_workers_shrink_to_what_is_free_down_to_their_floor() -> None:
    assert fit_per_worker(2, 0.5, 0.25, free=2.0, floor=0.25) == 0.5  # fits as configured
    assert fit_per_worker(2, 0.5, 0.25, free=1.0, floor=0.25) == 0.37  # beside a 1-CPU replica
    assert fit_per_worker(2, 0.5, 0.25, free=0.75, floor=0.25) == 0.25
    assert fit_per_worker(2, 0.5, 0.25, free=0.74, floor=0.25) is None
    assert fit_per_worker(2, 0.5, 0.25, free=1.0, floor=0.5) is None  # floor = cpus_per_worker: never shrink
    assert fit_per_worker(1, 1.0, 0.25, free=8.0, floor=0.25) == 1.0  # never grows


@pytest.mark.e2e
def test_holders_name_a_replica_and_a_worker_group(ray_local) -> None:
    import ray

    name = f"replica-{uuid.uuid4().hex[:6]}"
    holder = hold(1.0, name)
    group = ray.util.placement_group([{"CPU": 0.25}, {"CPU": 0.25}], name="two-workers")
    try:
        ray.get(group.ready(), timeout=30)
        found = {h.what: h.resources for h in list_holders()}
        assert found[f"actor Replica '{name}'"] == {"CPU": 1.0}, found
        assert found["placement group 'two-workers'"] == {"CPU": 0.5}
        assert read_capacity(samples=1).free["CPU"] == pytest.approx(0.5)
    finally:
        ray.util.remove_placement_group(group)
        ray.kill(holder)


@pytest.mark.e2e
def test_training_fits_its_workers_beside_a_replica_that_holds_a_cpu(ray_local, moto_s3, demo_shards, demo_manifest,
                                                                      tmp_path) -> None:
    """The daily loop's case: 2 CPUs, a replica holds 1; the 2 workers x 0.5 + 0.25 CPU would never start."""
    holder = hold(1.0, f"replica-{uuid.uuid4().hex[:6]}")
    try:
        result = run_ray_training(tiny_ray_settings(moto_s3, "train.steps=10"), demo_manifest, demo_shards, tmp_path / "model")
        _, meta = load_model(result.model_path)
        assert meta["training"]["cpus_per_worker"] == 0.37 and result.steps == 10
    finally:
        import ray

        ray.kill(holder)
    free_cpus_back_to(read_capacity(samples=1).total["CPU"])


@pytest.mark.e2e
def test_training_that_cannot_fit_stops_in_seconds_naming_the_holder(ray_local, moto_s3, demo_shards, demo_manifest,
                                                                      tmp_path) -> None:
    total = read_capacity(samples=1).total["CPU"]
    name = f"replica-{uuid.uuid4().hex[:6]}"
    holder = hold(total - 0.5, name)
    try:
        started = time.monotonic()
        with pytest.raises(DoesNotFit) as caught:
            run_ray_training(tiny_ray_settings(moto_s3), demo_manifest, demo_shards, tmp_path / "model")
        assert time.monotonic() - started < 20
    finally:
        import ray

        ray.kill(holder)
    message = str(caught.value)
    assert "ray.num_workers x ray.cpus_per_worker + ray.data_cpus = 2 x 0.5 + 0.25 CPUs" in message
    assert f"0.5 of {total:g} CPUs free" in message and f"actor Replica '{name}': {total - 0.5:g} CPU" in message
    assert "bash scripts/stop.sh" in message
    assert not (tmp_path / "model").exists()
    # a floor equal to the configured CPUs never shrinks: the whole cluster then is not enough
    with pytest.raises(DoesNotFit, match=rf"{total:g} of {total:g} CPUs free"):
        run_ray_training(tiny_ray_settings(moto_s3, f"ray.cpus_per_worker={total / 2:g}", f"ray.min_cpus_per_worker={total / 2:g}"),
                         demo_manifest, demo_shards, tmp_path / "model")


def test_status_without_a_cluster_says_none_runs(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "RAY_TMPDIR": str(tmp_path)}  # no record of a head here
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    proc = subprocess.run([sys.executable, "-m", "plantad.cli", "status", "--config", str(params)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no Ray cluster to show: none is running on this machine" in proc.stderr
