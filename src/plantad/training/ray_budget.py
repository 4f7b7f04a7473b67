"""How a Ray Train run fits the cluster it joins, what it waits for when it stalls, and its abort.

A run needs `ray.num_workers` workers of `ray.cpus_per_worker` CPUs plus `ray.data_cpus` for its
Ray Data tasks. On a cluster whose other roles (the endpoint's replicas) hold part of the CPUs,
the workers shrink to what is free, down to `ray.min_cpus_per_worker`; below that the run stops
before it starts, naming what it needs and what holds the rest (`ray.autoscaling: true` waits for
new nodes instead, within `ray.stall_timeout_s`).
"""

from __future__ import annotations

from dataclasses import dataclass

from plantad.cluster.capacity import Capacity, Request, amount, fit_request, holders_text, read_capacity
from plantad.config import RayConfig


@dataclass(frozen=True)
class TrainPlan:
    cpus_per_worker: float  # what the workers reserve: ray.cpus_per_worker, or less on a shared cluster
    capacity: Capacity  # as read before the run


def worker_resources(rcfg: RayConfig, cpus_per_worker: float) -> dict[str, float]:
    return {"CPU": cpus_per_worker, **({"GPU": rcfg.gpus_per_worker or 1.0} if rcfg.use_gpu else {})}


def fit_training(rcfg: RayConfig) -> TrainPlan:
    """The run's per-worker CPUs on the connected cluster, or DoesNotFit (a warning with autoscaling)."""
    floor = min(rcfg.min_cpus_per_worker, rcfg.cpus_per_worker)
    gpus = rcfg.num_workers * worker_resources(rcfg, 0.0).get("GPU", 0.0)
    need = (f"ray.num_workers x ray.cpus_per_worker + ray.data_cpus = {rcfg.num_workers} x {rcfg.cpus_per_worker:g} "
            f"+ {rcfg.data_cpus:g} CPUs (at least {rcfg.num_workers} x {floor:g} + {rcfg.data_cpus:g} with "
            "ray.min_cpus_per_worker)" + (f" and {gpus:g} GPUs" if gpus else ""))
    request = Request("this training run", "training workers", rcfg.num_workers, rcfg.cpus_per_worker,
                      "ray.cpus_per_worker", floor, rcfg.data_cpus, gpus, need,
                      "lower ray.num_workers or ray.min_cpus_per_worker, or set ray.address to a cluster with room")
    return TrainPlan(*fit_request(request, rcfg.autoscaling, rcfg.stall_timeout_s))


def stall_reason(plan: TrainPlan, rcfg: RayConfig, beats: dict[str, tuple[float, str]], reading: bool = False) -> str:
    """What a stalled run waited for, from its workers' last beats {who: (age_s, what)}, and the
    cluster's state now."""
    beats = {who: beat for who, beat in beats.items() if who.startswith("rank ")}  # the workers'
    if reading:
        what = f"a chunk of the shards: Ray Data's read tasks need {rcfg.data_cpus:g} CPU each (ray.data_cpus)"
    elif not beats:
        what = (f"Ray Train's worker group to start: {rcfg.num_workers} workers of "
                f"{amount(worker_resources(rcfg, plan.cpus_per_worker))}")
    elif starving := sorted(who for who, (_, said) in beats.items() if said == "started"):
        what = (f"a dataset block on {', '.join(starving)}: Ray Data's decoding tasks need {rcfg.data_cpus:g} CPU "
                "each (ray.data_cpus)")
    else:
        who, (age, said) = min(beats.items(), key=lambda kv: kv[1][0])
        what = f"the next training step (the last beat: {said} on {who}, {age:.0f} s ago)"
    return f"waited for {what}; the Ray cluster has {read_capacity(samples=1).text()}, held by: {holders_text()}"


def abort_train_runs(job_id: str, timeout_s: float = 30.0, answer_s: float = 5.0) -> None:
    """Abort this job's Ray Train runs as Ctrl-C would: each controller ends its worker group and
    placement group. (TorchTrainer.fit keeps its controller's handle, so it is looked up by id.)
    A controller that does not answer within `answer_s` is killed (one waiting for a placement
    group that cannot be placed blocks its own loop for that wait, Ray Train's 60 s by default);
    its workers go with it (their owner), and this job's placement groups, which live as long as
    the job, are removed."""
    import ray
    from ray.util.state import list_actors

    alive = list_actors(ray.get_runtime_context().gcs_address, filters=[
        ("class_name", "=", "TrainController"), ("job_id", "=", job_id), ("state", "=", "ALIVE")], timeout=timeout_s)
    core = ray._private.worker.global_worker.core_worker
    killed = False
    for actor in alive:
        handle = core.get_actor_handle(ray.ActorID.from_hex(actor.actor_id))
        try:
            ray.get(handle.abort.remote(), timeout=answer_s)
        except ray.exceptions.RayActorError:  # abort() ends the controller: the expected answer
            pass
        except ray.exceptions.GetTimeoutError:
            ray.kill(handle, no_restart=True)
            killed = True
    if killed:
        remove_placement_groups(job_id, timeout_s)


def remove_placement_groups(job_id: str, timeout_s: float) -> None:
    """Remove the placement groups this job created that are still there (a killed Ray Train
    controller leaves its own behind)."""
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_placement_groups

    for group in list_placement_groups(ray.get_runtime_context().gcs_address, filters=[
            ("creator_job_id", "=", job_id)], timeout=timeout_s):
        if group.state != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))
