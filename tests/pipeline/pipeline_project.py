"""A throwaway plantad project (git + DVC, tiny params) and the commands a user runs in it.

The project is a copy of this checkout's dvc.yaml, params.yaml, pipelines/ and src/ (the stages'
deps hash src/, and PYTHONPATH points the stages at it), with params rewritten to the tiny
settings of tests/conftest.py's TINY list.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DATA = "data/plant"  # the user's dataset in the baseline project, tracked with `dvc add`
STAGES = ["demo_data", "prepare", "validate", "train", "evaluate", "register", "score"]  # dvc.yaml's, in order
TAIL = 6000  # characters of command output quoted in a failure message
RUNNING = re.compile(r"^Running stage '([\w-]+)':", flags=re.M)

# tests/conftest.py's TINY list as params.yaml keys, plus the pipeline's own tiny knobs
TINY_PARAMS: dict[str, Any] = {
    "data": {"image_size": 56, "holdout_fraction": 0.15},
    "demo": {"seed": 0, "image_size": 64, "n_train": 12, "n_test_good": 3, "n_test_defect": 1},
    "model": {
        "teacher": {
            "weights": "random",
            "timm_kwargs": {"depth": 4, "embed_dim": 64, "num_heads": 2, "patch_size": 8, "init_values": 1.0},
            "layers": [0, 1, 2, 3],
            "groups": [[0, 1], [2, 3]],
        },
        "encoder": {"depth": 2},
    },
    "train": {"batch_size": 8, "steps": 10, "warmup_steps": 2, "hard_mining": {"ramp_steps": 5}, "log_every": 5},
    "scoring": {"gaussian_sigma": 1.0, "batch_size": 16},
    "validation": {"min_train_normal_per_category": 10},
    "ray": {"address": None, "num_workers": 2, "cpus_per_worker": 0.5, "steps_per_epoch": 5,
            "storage_path": "runs/ray", "max_failures": 0},
}


def stage_env(home: Path) -> dict[str, str]:
    """os.environ for the stage subprocesses: venv first on PATH, git/DVC config and caches in tmp."""
    (home / "gitconfig").write_text("[user]\n\tname = plantad e2e\n\temail = e2e@plantad.invalid\n")
    # bytecode on, as for a user: __pycache__ in src/ must not make DVC see changed code
    dropped = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        GX_ANALYTICS_ENABLED="false",
        MLFLOW_ENABLE_ASYNC_LOGGING="false",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env



def joined_stage_env(home: Path) -> dict[str, str]:
    """stage_env joined to this process's Ray cluster: RAY_ADDRESS and the cluster's auth token."""
    import ray

    env = stage_env(home)
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    # the local cluster's RAY_AUTH_TOKEN is in os.environ and ray.init() set RAY_AUTH_MODE=token;
    # a driver joining the cluster needs both (without them it is refused)
    if env.get("RAY_AUTH_MODE") == "token" and not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")):
        raise RuntimeError("the Ray cluster uses token auth but no RAY_AUTH_TOKEN is set for its drivers")
    return env


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `update`'s keys set (nested dicts merged, other values replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tail(proc: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(map(str, proc.args))}  -> exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-TAIL:]}"


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    stage_seconds: dict[str, float] = field(default_factory=dict)  # of the run that made it (baseline)

    def run(self, *args: str | Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in the project; with check, a non-zero exit fails with the output's tail."""
        proc = subprocess.run([str(a) for a in args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"command failed:\n{tail(proc)}")
        return proc

    def repro(self, timeout: float = 300, check: bool = True, kill_stage: str | None = None,
              kill_after: float = 0.0, args: tuple[str, ...] = ()) -> Repro:
        """`dvc repro [args]`, timing each stage; with kill_stage, SIGKILLed (the whole process group,
        as a crash ends it) `kill_after` seconds after that stage starts, if it is still running then."""
        proc = subprocess.Popen(["dvc", "repro", *args], cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        started: dict[str, float] = {}
        killed: list[str] = []

        def kill() -> None:
            if proc.poll() is None:
                killed.append(list(started)[-1])
                os.killpg(proc.pid, signal.SIGKILL)

        assert proc.stdout is not None
        lines, kill_timer = [], None
        for line in proc.stdout:
            lines.append(line)
            match = RUNNING.match(line)
            if match:
                started[match.group(1)] = time.monotonic()
                if match.group(1) == kill_stage and kill_timer is None:
                    kill_timer = threading.Timer(kill_after, kill)
                    kill_timer.start()
        returncode = proc.wait()
        for t in (timer, kill_timer):
            if t is not None:
                t.cancel()
        result = Repro(subprocess.CompletedProcess(["dvc", "repro", *args], returncode, "".join(lines), ""), started,
                       time.monotonic(), killed[0] if killed else None)
        if check and returncode != 0:
            raise AssertionError(f"command failed:\n{result.tail()}")
        return result

    def status(self) -> dict[str, Any]:
        """`dvc status --json`: changed stages and .dvc files; {} when everything is up to date."""
        return json.loads(self.run("dvc", "status", "--json").stdout or "{}")

    def commit(self, message: str) -> str:
        """`git add -A && git commit`; returns the new HEAD."""
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)
        return self.run("git", "rev-parse", "HEAD").stdout.strip()

    @property
    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, update: dict[str, Any]) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(merged(self.params, update), sort_keys=False))

    def lock(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "dvc.lock").read_text())["stages"]

    def registration(self) -> dict[str, Any]:
        return json.loads((self.root / "outputs" / "registration.json").read_text())

    def dvc_md5(self, tracked: str) -> str:
        """The md5 that `<tracked>.dvc` records for a `dvc add`ed folder."""
        return yaml.safe_load((self.root / f"{tracked}.dvc").read_text())["outs"][0]["md5"]


@dataclass
class Repro:
    """One `dvc repro`: its process, the stages DVC says it ran or skipped, when each started."""

    proc: subprocess.CompletedProcess[str]
    started: dict[str, float] = field(default_factory=dict)  # time.monotonic() at "Running stage"
    ended: float = 0.0
    killed_in: str | None = None  # the stage running when kill_stage's timer fired

    def durations(self) -> dict[str, float]:
        """Seconds from each stage's start to the next one's (or the end), DVC's commit included."""
        order = list(self.started)
        ends = [self.started[s] for s in order[1:]] + [self.ended]
        return {s: end - self.started[s] for s, end in zip(order, ends)}

    @property
    def output(self) -> str:
        return self.proc.stdout + self.proc.stderr

    @property
    def ran(self) -> list[str]:
        return RUNNING.findall(self.output)

    @property
    def skipped(self) -> list[str]:
        return re.findall(r"^Stage '([\w-]+)' didn't change, skipping", self.output, flags=re.M)

    def tail(self) -> str:
        return tail(self.proc)


def copy_sources(dest: Path) -> None:
    """The files a clone of the repo has that `dvc repro` needs (no caches, no outputs)."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy2(REPO / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pipelines", "src"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)


def create_project(root: Path, env: dict[str, str], params: dict[str, Any]) -> Project:
    """git init + dvc init in `root` with this checkout's pipeline; params.yaml = repo's + `params`."""
    copy_sources(root)
    project = Project(root, {**env, "PYTHONPATH": str(root / "src")})
    repo_params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merged(repo_params, params), sort_keys=False))
    project.run("git", "init", "-q")
    project.run("dvc", "init", "-q")
    project.run("dvc", "config", "core.analytics", "false")
    project.commit("plantad pipeline on tiny settings")
    return project


def copy_project(src: Project, dest: Path) -> Project:
    """An independent copy of a project (work tree, git, DVC cache, outputs); same registry.

    Without bytecode, like another checkout of the same commit: Python's __pycache__ is per machine
    (and git-ignored), so DVC must not count it in the src/ deps.
    """
    shutil.copytree(src.root, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return Project(dest, {**src.env, "PYTHONPATH": str(dest / "src")}, dict(src.stage_seconds))


def registry_state(client: Any, name: str) -> dict[str, Any]:
    """What a registered model holds: {version: (run id, aliases)} and the alias map; {} if absent."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    versions = client.search_model_versions(f"name = '{name}'")
    return {"aliases": dict(model.aliases),
            "versions": {v.version: (v.run_id, sorted(v.aliases)) for v in versions}}


def run_ids(client: Any, experiment: str) -> set[str]:
    """Ids of every run of an experiment (the train stage creates one per training)."""
    exp = client.get_experiment_by_name(experiment)
    return set() if exp is None else {r.info.run_id for r in client.search_runs([exp.experiment_id], max_results=1000)}
