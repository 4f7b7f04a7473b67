"""Chaos, part (a): SIGKILL `dvc repro` at random points of each stage, re-run it, check what is left.

A trial is one SIGKILL of the whole process group of `dvc repro` (DVC and the stage's command, as a
crash or an OOM kill would end them) at a uniform random moment inside a stage, the moment drawn
from that stage's duration in an uninterrupted run. After each kill: dvc.lock parses, no stage that
had finished is out of date, and every registered model version downloads and loads (sha256 checked).
At the end the pipeline must complete, `dvc status` be clean, and dvc.lock match the uninterrupted
run for the deterministic stages.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import yaml
from chaos_common import Row
from pipeline_project import DATA, STAGES, TINY_PARAMS, Project, Repro, create_project, merged

DETERMINISTIC = ["demo_data", "prepare"]  # validate records its time; score depends on registration.json


def version_problems(tracking_uri: str, name: str, scratch: Path) -> list[str]:
    """What is wrong with each registered version of `name`: not READY, not downloadable, not loadable."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from plantad.models.checkpoint import load_model
    from plantad.tracking.model_source import download_model, find_model_dir, resolve_model

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    problems = []
    for v in versions:
        if v.status != "READY":
            problems.append(f"v{v.version} is {v.status}")
            continue
        try:
            ref = resolve_model(f"models:/{name}/{v.version}", client)
            root = download_model(ref, tracking_uri, cache_dir=Path(tempfile.mkdtemp(dir=scratch)))
            load_model(find_model_dir(root))
        except Exception as exc:  # any failure here is what the check reports
            problems.append(f"v{v.version}: {type(exc).__name__}: {exc}")
    return problems


def stale_stages(project: Project) -> set[str] | str:
    """The stages `dvc status` calls out of date, or its error."""
    status = project.run("dvc", "status", "--json", check=False)
    if status.returncode != 0:
        return f"dvc status failed: {status.stdout[-500:]}{status.stderr[-500:]}"
    return set(json.loads(status.stdout or "{}"))


def after_kill_problems(project: Project, run: Repro, tracking_uri: str, name: str, scratch: Path,
                        stale_before: set[str] = frozenset()) -> list[str]:
    """Damage a kill left: an unreadable dvc.lock, a stage that was up to date and finished before
    the kill now out of date, a broken version."""
    from plantad.dvc_lock import check_lock

    problems = []
    # DVC rewrites dvc.lock in place: a kill during that write damages it. Counted as damage, then
    # repaired as `plantad lock --repair` would, so that the next trials and the final run go on
    report = check_lock(project.root, repair=True)
    if report.problem:
        problems.append(f"dvc.lock damaged ({report.problem[:120]}); repaired from {report.repaired_from}")
    hit = STAGES.index(run.killed_in) if run.killed_in in STAGES else 0
    stale = stale_stages(project)
    finished = set(STAGES[:hit]) - stale_before  # (a stage no target needs, e.g. demo_data on the user's data)
    if isinstance(stale, str):
        problems.append(stale)
    else:
        problems += [f"stage {s} finished before the kill but is now out of date" for s in sorted(finished & stale)]
    return problems + version_problems(tracking_uri, name, scratch)


def new_project(root: Path, env: dict[str, str], tracking_uri: str, names: dict[str, str]) -> Project:
    """The baseline project of tests/pipeline: tiny params, the user's dataset tracked with `dvc add`."""
    # the score stage enabled (off in params.yaml), so that kills in it hit a running bulk job: the
    # first registered version becomes champion, small parts so that a kill lands between commits
    score = {"part_size": 4, "batch_size": 4, "stage": {
        "enabled": True, "input": DATA, "output": "outputs/scores",
        "model": f"models:/{names['registered_model']}@champion"}}
    params = merged(TINY_PARAMS, {"data": {"source": "path", "root": DATA}, "bulk": score,
                                  "mlflow": {"tracking_uri": tracking_uri, "promote": "manual", **names}})
    project = create_project(root, env, params)
    project.run("plantad", "demo-data", DATA, "--seed", "1")
    project.run("dvc", "add", DATA)
    project.commit("track the plant dataset")
    return project


def lock_entries(project: Project, stages: list[str]) -> dict[str, object]:
    locked = yaml.safe_load((project.root / "dvc.lock").read_text())["stages"]
    return {s: locked.get(s) for s in stages}


def kill_sequence(project: Project, targets: list[str], seconds: dict[str, float], k: int, rng: random.Random,
                  tracking_uri: str, name: str, scratch: Path) -> tuple[dict[str, list[tuple[bool, float]]], list[str]]:
    """K kills per target stage, each at U(0, 0.9 x its duration) after it starts.

    A trial is `dvc repro --force --single-item <stage>` once every stage before it is complete, so
    that each of the K kills lands in that stage even after an earlier trial let it finish (a plain
    `dvc repro` would skip a finished stage, or carry the kill into the next one). A trial whose stage
    ended before its kill moment is drawn again (within the duration that run took), up to 3 times.
    Each attempt in `score` starts without the previous table (so the job has every image to score)
    and, after the kill, the stage runs again: its table must then hold exactly one row per image.
    Returns per stage: (no damage after the kill, seconds into the stage), and the damage found."""
    hits: dict[str, list[tuple[bool, float]]] = {s: [] for s in targets}
    damage: list[str] = []
    for stage in targets:
        before = STAGES[:STAGES.index(stage)]
        if before:
            done = project.repro(timeout=900, check=False, args=(before[-1],))
            if done.proc.returncode != 0:
                damage.append(f"`dvc repro {before[-1]}` before the kills in {stage} failed: {done.tail()[-300:]}")
                continue
        if stage == "score":  # its kill moments come from an uninterrupted run here, with Ray warm
            timed = project.repro(timeout=900, check=False, args=("--force", "--single-item", stage))
            seconds[stage] = timed.durations().get(stage, seconds[stage])  # (the row reports this duration)
        stale_before = stale_stages(project)
        stale_before = set() if isinstance(stale_before, str) else stale_before
        for _ in range(k):
            window = seconds[stage]
            for _attempt in range(3):
                if stage == "score":  # each attempt scores the whole input again, so that a kill lands mid-job
                    for leftover in ("outputs/scores", "outputs/score.json"):
                        shutil.rmtree(project.root / leftover, ignore_errors=True)
                        (project.root / leftover).unlink(missing_ok=True)
                run = project.repro(timeout=900, check=False, kill_stage=stage,
                                    kill_after=rng.uniform(0.0, 0.9 * window), args=("--force", "--single-item", stage))
                if run.killed_in is not None:
                    break
                if run.proc.returncode != 0:  # it ended before the kill moment, but failed on its own
                    damage.append(f"{stage} failed before the kill: {run.tail()[-300:]}")
                window = run.durations().get(stage, window)  # drawn again within the duration just seen
            else:
                damage.append(f"{stage} ended before each of 3 kill moments")
                continue
            found = after_kill_problems(project, run, tracking_uri, name, scratch, stale_before)
            if stage == "score":  # the re-run resumes the killed job's table: exactly one row per image
                again = project.repro(timeout=900, check=False, args=("--force", "--single-item", stage))
                found += ([f"the re-run after the kill failed: {again.tail()[-300:]}"] if again.proc.returncode
                          else score_table_problems(project))
            hits[stage].append((not found, run.ended - run.started[stage]))
            damage += [f"kill in {stage}: {p}" for p in found]
    return hits, damage


def kill_rows(project: Project, reference: Project, targets: list[str], k: int, rng: random.Random,
              tracking_uri: str, scratch: Path) -> list[Row]:
    """Kill `targets` K times each, then complete the pipeline and compare it with `reference`."""
    name = project.params["mlflow"]["registered_model"]
    seconds = reference.stage_seconds
    hits, damage = kill_sequence(project, targets, seconds, k, rng, tracking_uri, name, scratch)
    final = project.repro(timeout=900, check=False)
    end = final_problems(project, final, reference, tracking_uri, name, scratch)
    rows = [Row(f"SIGKILL `dvc repro` in {s}", len(v), 0 if end else sum(ok for ok, _ in v),
                sum(not ok for ok, _ in v), f"killed at {', '.join(f'{t:.1f}' for _, t in v)} s of a "
                f"{seconds.get(s, 0):.0f} s stage") for s, v in hits.items()]
    versions = registered_versions(tracking_uri, name)
    rows.append(Row("`dvc repro` after all kills", 1, int(not end and not damage), int(bool(end)),
                    "; ".join(end + damage)[:300] or f"complete; {versions} registered versions, all loadable"))
    return rows


def dvc_kill_rows(work: Path, env: dict[str, str], tracking_uri: str, k: int, rng: random.Random,
                  stages: list[str] | None = None) -> list[Row]:
    """K SIGKILLs in every stage (or in `stages`) of one pipeline run from scratch, against an uninterrupted run."""
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ValueError(f"--stages: no stage {', '.join(unknown)} in dvc.yaml (its stages: {', '.join(STAGES)})")
    suffix = f"{rng.getrandbits(32):08x}"
    ref = new_project(work / "reference", env, tracking_uri,
                      {"experiment": f"chaos-ref-{suffix}", "registered_model": f"chaos-ref-{suffix}"})
    reference = ref.repro(timeout=900, check=False)
    if reference.proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted `dvc repro` failed:\n{reference.tail()}")
    ref.stage_seconds = reference.durations()
    project = new_project(work / "chaos", env, tracking_uri,
                          {"experiment": f"chaos-{suffix}", "registered_model": f"chaos-{suffix}"})
    return kill_rows(project, ref, [s for s in STAGES if s in stages] if stages else STAGES, k, rng, tracking_uri, work)


def registered_versions(tracking_uri: str, name: str) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(tracking_uri, registry_uri=tracking_uri).search_model_versions(f"name = '{name}'"))


def final_problems(project: Project, final: Repro, ref: Project, tracking_uri: str, name: str,
                   scratch: Path) -> list[str]:
    if final.proc.returncode != 0:
        return [f"the last `dvc repro` failed: {final.tail()[-1500:]}"]
    problems = [f"dvc status not clean: {project.status()}"] if project.status() else []
    want, got = lock_entries(ref, DETERMINISTIC), lock_entries(project, DETERMINISTIC)
    problems += [f"dvc.lock of {s} differs from the uninterrupted run" for s in DETERMINISTIC if want[s] != got[s]]
    return problems + score_table_problems(project) + version_problems(tracking_uri, name, scratch)


def score_table_problems(project: Project) -> list[str]:
    """When the score stage ran: its table must hold exactly one row per image it counted."""
    from plantad.config import S3Config
    from plantad.serving.bulk import read_results
    from plantad.storage import open_location

    path = project.root / "outputs" / "score.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if not record.get("enabled"):
        return []
    table = read_results(open_location(record["output"], S3Config()))
    if len(table) != record["images"] or not table["relpath"].is_unique:
        return [f"score table {record['output']}: {len(table)} rows, {table['relpath'].nunique()} images, "
                f"{record['images']} listed"]
    return []
