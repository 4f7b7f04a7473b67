"""What a Ray cluster has free for a job, what holds the rest, and fitting a job's workers into it.

One machine runs one cluster whose roles share it: the main job's Serve replicas hold what
`serve.ray_actor_options` asks, and a training or bulk job that joins later takes what is left.
Ray cannot tell a job that waits for CPUs from one that works (its tasks just stay pending), so
every job checks here first and either fits (shrinking its per-worker CPUs down to a floor) or
stops at once, naming what it needs and what holds the rest.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)
KINDS = ("CPU", "GPU")


class DoesNotFit(ValueError):
    """A job cannot run on what the cluster has free; the message names the need and the holders."""


def amount(resources: dict[str, float]) -> str:
    """"1 CPU", "0.5 CPU + 1 GPU"; "nothing" for none."""
    parts = [f"{resources[k]:g} {k}" for k in KINDS if resources.get(k)]
    return " + ".join(parts) or "nothing"


@dataclass(frozen=True)
class Holder:
    what: str  # e.g. "Serve replica plantad/AnomalyScorer"
    resources: dict[str, float]

    def text(self) -> str:
        return f"{self.what}: {amount(self.resources)}"


@dataclass(frozen=True)
class Capacity:
    total: dict[str, float]
    free: dict[str, float]

    def text(self) -> str:
        return ", ".join(f"{self.free.get(k, 0.0):g} of {self.total.get(k, 0.0):g} {k}s free" for k in KINDS
                         if self.total.get(k) or k == "CPU")


def read_capacity(samples: int = 3, every_s: float = 0.5) -> Capacity:
    """The cluster's CPUs and GPUs and the most of them seen free over up to `samples` reads, `every_s`
    apart: a short task of another job may hold one for a moment."""
    import ray

    total = {k: float(ray.cluster_resources().get(k, 0.0)) for k in KINDS}
    free = {k: 0.0 for k in KINDS}
    for attempt in range(samples):
        now = ray.available_resources()
        free = {k: max(v, float(now.get(k, 0.0))) for k, v in free.items()}
        if all(free[k] >= total[k] for k in KINDS) or attempt == samples - 1:
            break
        time.sleep(every_s)
    return Capacity(total, free)


def _held(resources: dict | None) -> dict[str, float]:
    return {k: float(v) for k, v in (resources or {}).items() if k in KINDS and v}


def _actor_name(class_name: str, name: str | None, job_id: str) -> str:
    if class_name.startswith("ServeReplica:"):  # ServeReplica:<app>:<deployment>
        return "Serve replica " + "/".join(class_name.split(":")[1:])
    return f"actor {class_name}" + (f" '{name}'" if name else f" of job {job_id}")


def list_holders(timeout_s: float = 10.0) -> list[Holder]:
    """Actors, placement groups (Ray Train's worker groups) and running tasks that hold CPUs or GPUs,
    from Ray's state API (served by the cluster's dashboard), largest first."""
    import ray
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    # this job's cluster: without an address the state API refuses when the machine runs several
    here = ray.get_runtime_context().gcs_address
    actors = list_actors(here, filters=[("state", "=", "ALIVE")], detail=True, timeout=timeout_s,
                         raise_on_missing_output=False)
    holders, in_group = [], Counter()
    for a in actors:
        if a.placement_group_id:
            in_group[(a.placement_group_id, a.class_name)] += 1
        elif _held(a.required_resources):
            holders.append(Holder(_actor_name(a.class_name, a.name, a.job_id), _held(a.required_resources)))
    for g in list_placement_groups(here, detail=True, timeout=timeout_s, raise_on_missing_output=False):
        if g.state != "CREATED":
            continue
        held: Counter = Counter()
        for bundle in g.bundles or []:
            held.update(_held(bundle.get("unit_resources")))
        members = ", ".join(f"{cls} x{n}" for (gid, cls), n in sorted(in_group.items()) if gid == g.placement_group_id)
        label = f"placement group '{g.name}'" if g.name else f"placement group of job {g.creator_job_id}"
        holders.append(Holder(label + (f" ({members})" if members else ""), dict(held)))
    counts: Counter = Counter()  # running tasks per (function, job), with what they hold together
    summed: dict[tuple[str, str], Counter] = {}
    running = list_tasks(here, filters=[("state", "=", "RUNNING")], detail=True, timeout=timeout_s,
                         raise_on_missing_output=False)
    for t in running:
        if t.type == "NORMAL_TASK" and _held(t.required_resources):
            key = (t.func_or_class_name, t.job_id)
            counts[key] += 1
            summed.setdefault(key, Counter()).update(_held(t.required_resources))
    for (name, job), n in counts.items():
        holders.append(Holder(f"{n} running task(s) {name} of job {job}", dict(summed[(name, job)])))
    return sorted(holders, key=lambda h: (-h.resources.get("GPU", 0.0), -h.resources.get("CPU", 0.0), h.what))


def holders_text() -> str:
    """list_holders as one line, or why it could not be read (the error is never the job's own)."""
    try:
        holders = list_holders()
    except Exception as exc:  # the state API needs the dashboard; without it only the totals are known
        return f"(Ray's state API did not answer: {type(exc).__name__}: {exc})"
    return "; ".join(h.text() for h in holders) if holders else "nothing Ray lists now (work that just ended?)"


def fit_per_worker(workers: int, per_worker: float, reserve: float, free: float, floor: float) -> float | None:
    """CPUs per worker for `workers` workers beside `reserve` within `free`: `per_worker` when that
    fits, else the most that fits (to 0.01 CPU) if at least `floor`, else None."""
    if workers * per_worker + reserve <= free + 1e-9:
        return per_worker
    shrunk = math.floor((free - reserve) / workers * 100 + 1e-9) / 100
    return shrunk if shrunk >= floor else None


@dataclass(frozen=True)
class Request:
    """What a job asks of the cluster: `count` workers of `per_worker` CPUs (shrinkable to `floor`,
    the setting `per_key`) beside `reserve` CPUs for its tasks, and `gpus`; with the words of its messages."""

    job: str  # "this training run"
    workers: str  # "training workers"
    count: int
    per_worker: float
    per_key: str
    floor: float
    reserve: float
    gpus: float
    need: str  # the need as the settings spell it
    remedy: str  # what else the user can do


def fit_request(req: Request, autoscaling: bool, stall_s: float) -> tuple[float, Capacity]:
    """The per-worker CPUs that fit the connected cluster now, and what it had; DoesNotFit naming the
    need and the holders, or a warning and the configured CPUs when the cluster autoscales."""
    cap = read_capacity()
    per = fit_per_worker(req.count, req.per_worker, req.reserve, cap.free["CPU"], req.floor)
    if per is not None and req.gpus <= cap.free["GPU"]:
        if per < req.per_worker:
            log.info("Ray: %s, so the %d %s reserve %g CPU each instead of %s=%g", cap.text(), req.count, req.workers,
                     per, req.per_key, req.per_worker)
        return per, cap
    message = f"{req.job} needs {req.need}; the Ray cluster has {cap.text()}, held by: {holders_text()}"
    if autoscaling:
        log.warning("%s; waiting up to ray.stall_timeout_s=%g s for new nodes (ray.autoscaling)", message, stall_s)
        return req.per_worker, cap
    raise DoesNotFit(f"{message}. Free them (the main job's endpoint: `bash scripts/stop.sh`), {req.remedy}")
