"""Chaos, part (b): SIGKILL Ray Train workers at random steps and while a checkpoint is being written.

Each trial is one tiny training run (2 DDP workers, a checkpoint every 5 steps to local storage,
ray.max_failures 2) with one kill:
- `random step`: after a random checkpoint j, a random fraction of a checkpoint interval later,
  one of the two workers (chosen at random) is SIGKILLed;
- `mid-checkpoint`: both workers are SIGKILLed the moment a new checkpoint folder appears in
  storage, so the checkpoint can be caught half-written.
Recovered: the run finishes all steps, resumed from the newest checkpoint Ray had registered when
the kill landed (or a newer complete one), and the saved model loads. Data lost: it resumed from
an older checkpoint than that, or the run failed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
from chaos_common import Row
from tiny import tiny_settings

STEPS, EVERY = 30, 5


def worker_pids() -> list[int]:
    """Ray titles Ray Train's worker processes `ray::RayTrainWorker...`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith("ray::RayTrainWorker"):
            found.append(proc.info["pid"])
    return sorted(found)


def run_dir(storage: Path) -> Path | None:
    runs = [p for p in storage.iterdir() if p.is_dir()] if storage.exists() else []
    return runs[0] if runs else None


def registered_steps(storage: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its checkpoint manager's snapshot)."""
    run = run_dir(storage)
    snapshot = run / "checkpoint_manager_snapshot.json" if run else None
    if snapshot is None or not snapshot.exists():
        return []
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (json.JSONDecodeError, KeyError):  # being rewritten
        return []
    return sorted(int(r["metrics"]["step"]) for r in results)


def checkpoint_dirs(storage: Path) -> list[Path]:
    run = run_dir(storage)
    return sorted(run.glob("checkpoint_*")) if run else []


def _wait(condition, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False


def kill_at_random_step(storage: Path, rng: random.Random) -> dict:
    """Wait for checkpoint j (random), then a random fraction of an interval, then kill one worker."""
    j = rng.randint(1, STEPS // EVERY - 1)
    start = time.monotonic()
    if not _wait(lambda: len(worker_pids()) == 2, 300):
        return {"error": "the two workers never started"}
    if not _wait(lambda: len(registered_steps(storage)) >= 1, 300):
        return {"error": "no checkpoint was registered"}
    first = time.monotonic() - start  # start-up and one interval: bounds the interval from above
    _wait(lambda: max(registered_steps(storage), default=0) >= j * EVERY, 300)
    time.sleep(rng.uniform(0.0, 1.0) * min(first, 10.0) / max(1, j))
    victim = rng.choice(worker_pids() or [0])
    registered = registered_steps(storage)
    if victim:
        os.kill(victim, signal.SIGKILL)
    return {"registered": max(registered, default=0), "partial": None}


def kill_mid_checkpoint(storage: Path, rng: random.Random) -> dict:
    """After the first registered checkpoint, kill both workers as soon as a new checkpoint folder appears."""
    if not _wait(lambda: len(registered_steps(storage)) >= 1 and len(worker_pids()) == 2, 300):
        return {"error": "no checkpoint was registered"}
    seen, pids = set(checkpoint_dirs(storage)), worker_pids()
    if not _wait(lambda: bool(set(checkpoint_dirs(storage)) - seen), 300, poll=0.002):
        return {"error": "no second checkpoint appeared"}
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    registered = registered_steps(storage)
    newest = max(set(checkpoint_dirs(storage)) - seen, default=None) or checkpoint_dirs(storage)[-1]
    size = sum(f.stat().st_size for f in newest.glob("*")) if newest.exists() else 0
    return {"registered": max(registered, default=0), "partial": size}


def local_shards(manifest, root: Path, work: Path):
    """The dataset as Parquet shards in a local folder: what Ray Train workers read."""
    from plantad.config import S3Config
    from plantad.data.shards import write_shards

    return write_shards(manifest, root, str(work / "shards"), S3Config(), 256_000_000)


def one_trial(work: Path, manifest, root: Path, killer, rng: random.Random, steps: int = STEPS
              ) -> tuple[bool, bool, str]:
    """(recovered, data lost, note) of one training run of `steps` steps with one kill."""
    from plantad.models.checkpoint import load_model
    from plantad.training.ray_train import run_ray_training

    storage = work / "storage"
    settings = tiny_settings("ray.num_workers=2", "ray.cpus_per_worker=0.5", f"ray.steps_per_epoch={EVERY}",
                             "ray.max_failures=2", "ray.keep_checkpoints=2", f"train.steps={steps}",
                             f"ray.storage_path={storage}")
    out: dict = {}

    def train() -> None:
        try:
            out["result"] = run_ray_training(settings, manifest, local_shards(manifest, root, work), work / "model")
        except Exception as exc:  # reported in the row's note
            out["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    kill = killer(storage, rng)
    thread.join(900)
    if "error" in kill or "error" in out or thread.is_alive():
        return False, "error" in out, f"{kill.get('error') or out.get('error') or 'timed out'}"
    result = out["result"]
    resumed = max(int(r.get("resumed_from", 0)) for r in result.history)
    load_model(result.model_path)  # sha256-checked
    ok = result.steps == steps and resumed >= kill["registered"]
    partial = "" if kill["partial"] is None else f", newest checkpoint {kill['partial'] / 1e6:.1f} MB at the kill"
    return ok, resumed < kill["registered"], f"registered step {kill['registered']}, resumed {resumed}{partial}"


def worker_kill_rows(work: Path, k: int, rng: random.Random) -> list[Row]:
    from plantad.config import DemoConfig
    from plantad.data.demo import generate_demo
    from plantad.data.manifest import scan_dataset

    root = work / "data"
    generate_demo(root, DemoConfig(seed=0, image_size=64, n_train=24, n_test_good=2, n_test_defect=1))
    manifest = scan_dataset(root)
    rows = []
    for fault, killer in (("SIGKILL a Ray Train worker at a random step", kill_at_random_step),
                          ("SIGKILL both workers as a checkpoint is written", kill_mid_checkpoint)):
        results = [one_trial(work / f"{killer.__name__}-{i}", manifest, root, killer, rng) for i in range(k)]
        rows.append(Row(fault, k, sum(r[0] for r in results), sum(r[1] for r in results),
                        "; ".join(r[2] for r in results)[:300]))
    return rows
